"""Evaluation of a trained model: beam-search reports for a split, their scores, the prediction files.

`evaluate_validation` is run_captioning's per-epoch validation (scores kept for the training curves);
`evaluate_test` its final test evaluation beside the two floors (grey images, nearest train report).

`generate_reports` runs on every process and gathers each study's report exactly once; `nearest_train_floor` is
the retrieval floor (each test study gets the report of the train study with the closest encoder features, found
by `nearest_train_rows` from the feature cache);
`score` runs the `radiology_report` metric; `write_predictions` and `write_samples` write `predictions.jsonl` and
`samples.png` / `samples.html` into the output folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

from processing_xraycap import XrayCapProcessor
from xraycap.radiology_report.labeler import label_reports

from .feature_cache import FeatureCache, process_rows
from .figures import write_samples_sheet
from .model_card import format_value
from .models import vision_tower_is_frozen

logger = logging.get_logger(__name__)

# Validation scores kept per epoch (for training_curves.png); METEOR and BERTScore are left to the test split.
CURVE_METRICS = ("bleu_1", "bleu_4", "rouge_l", "cider", "ce_micro_f1", "ce_macro_f1", "ce_example_f1")


@torch.no_grad()
def generate_reports(
    model: torch.nn.Module,
    dataloader: DataLoader,
    processor: XrayCapProcessor,
    accelerator: Accelerator,
    desc: str,
    **generate_kwargs,
) -> dict[int, str]:
    """Generates a report for every study of a (sharded) split; every study comes back exactly once.

    Args:
        model (`XrayCapForConditionalGeneration`): the prepared model; it is put back in its training mode.
        dataloader (`DataLoader`): the prepared loader of the split (images or features, no text).
        processor (`XrayCapProcessor`): decodes the generated ids.
        accelerator (`Accelerator`): the run's accelerator.
        desc (`str`): the progress bar's label.
        generate_kwargs: passed to `model.generate` (`num_beams`, `max_new_tokens`, ...).

    Returns:
        `dict[int, str]`: the report of each study, by its row index in the split.
    """
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = unwrapped.training
    unwrapped.eval()
    pad_id = processor.tokenizer.pad_token_id
    reports: dict[int, str] = {}
    # One iterator, handed to tqdm: given the loader itself, tqdm.auto opens a second one (a second, idle set of
    # worker processes, each a copy of this one).
    batches = tqdm(
        iter(dataloader),
        total=len(dataloader),
        desc=desc,
        disable=not accelerator.is_local_main_process,
        leave=False,
    )
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "index"}  # the row indices stay with the batch
        ids = unwrapped.generate(**inputs, do_sample=False, **generate_kwargs)
        ids = accelerator.pad_across_processes(ids, dim=1, pad_index=pad_id)
        indices, ids = accelerator.gather_for_metrics((batch["index"], ids))
        for index, text in zip(indices.tolist(), processor.batch_decode(ids, skip_special_tokens=True)):
            reports[index] = text.strip()
    unwrapped.train(was_training)
    return reports


def nearest_train_rows(
    train_vectors: datasets.Dataset,
    test_vectors: datasets.Dataset,
    accelerator: Accelerator,
    chunk_size: int = 4096,
) -> dict[int, int]:
    """Each test study's most similar train study: the top-1 cosine of their `pooled` vectors.

    Each process takes a block of the test rows and scans the train vectors chunk by chunk on its device, keeping
    each test row's best so far; memory is bounded by the chunks, whatever the number of studies. Ties go to the
    lower train row. Every process gets every test row's answer.

    Args:
        train_vectors (`datasets.Dataset`), test_vectors (`datasets.Dataset`): a `pooled` column, one row per study
            of the train and test splits (a feature cache entry, or a split carrying one).
        accelerator (`Accelerator`): the run's accelerator.
        chunk_size (`int`, *optional*, defaults to 4096): rows of either side compared at once.

    Returns:
        `dict[int, int]`: the nearest train row of each test row.
    """
    train_vectors = train_vectors.select_columns(["pooled"]).with_format("torch")
    test_vectors = test_vectors.select_columns(["pooled"]).with_format("torch")
    device = accelerator.device

    def normalized(vectors: datasets.Dataset, rows: slice) -> torch.Tensor:
        return torch.nn.functional.normalize(vectors[rows]["pooled"].to(device, torch.float32), dim=1)

    own_rows = process_rows(len(test_vectors), accelerator)
    nearest = []
    for start in range(0, len(own_rows), chunk_size):
        rows = own_rows[start : start + chunk_size]
        test = normalized(test_vectors, slice(rows.start, rows.stop))
        best = torch.full((len(rows),), -torch.inf, device=device)
        best_row = torch.zeros(len(rows), dtype=torch.long, device=device)
        for offset in range(0, len(train_vectors), chunk_size):
            scores = test @ normalized(train_vectors, slice(offset, offset + chunk_size)).T
            index = scores.argmax(dim=1)  # the first of equal maxima: the lower row
            score = scores.gather(1, index[:, None])[:, 0]
            better = score > best  # strictly: an earlier chunk's equal score keeps its lower row
            best = torch.where(better, score, best)
            best_row = torch.where(better, index + offset, best_row)
        nearest += zip(rows, best_row.tolist())
    return dict(gather_object(nearest))


def nearest_train_floor(
    model: torch.nn.Module,
    train_split: datasets.Dataset,
    test_split: datasets.Dataset,
    cache: FeatureCache,
    scratch_dir: Path,
) -> dict[int, str]:
    """The retrieval floor: each test study gets the report of the train study with the most similar images.

    Similarity is the cosine of the model's own encoder features, pooled over tokens and present views. A train
    split that carries cached features (`--cache_features`) gives its vectors as they are, so the train studies are
    not encoded again; the test split's come from the same cache. Otherwise the final encoder runs once over both
    splits in fp32 and keeps the pooled vectors only: in the cache when the encoder is frozen (another seed or fold
    reuses them), else in `scratch_dir`, removed afterwards.

    Args:
        model (`XrayCapForConditionalGeneration`): the trained model (prepared or not).
        train_split (`datasets.Dataset`), test_split (`datasets.Dataset`): the run's splits.
        cache (`FeatureCache`): the run's feature cache.
        scratch_dir (`Path`): where a trained encoder's vectors are kept while the floor is computed.

    Returns:
        `dict[int, str]`: the retrieved report of each test study, by its row index.
    """
    accelerator = cache.accelerator
    if "pooled" in train_split.column_names:
        train_vectors, test_vectors = train_split, cache.features(model, test_split, desc="test")
    else:
        frozen = vision_tower_is_frozen(accelerator.unwrap_model(model, keep_torch_compile=False))
        floor_cache = (
            cache if frozen else FeatureCache(scratch_dir, accelerator, cache.collator, cache.batch_size)
        )
        train_vectors, test_vectors = (
            floor_cache.features(model, split, pooled_only=True, autocast=False, desc=name)
            for split, name in ((train_split, "train"), (test_split, "test"))
        )
    nearest = nearest_train_rows(train_vectors, test_vectors, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and scratch_dir.exists():
        shutil.rmtree(scratch_dir)
    retrieved = sorted(set(nearest.values()))  # only these train reports are read
    reports = dict(zip(retrieved, train_split.select_columns(["report"])[retrieved]["report"]))
    return {row: reports[train_row] for row, train_row in nearest.items()}


def score(metric, split: datasets.Dataset, reports: dict[int, str], **options) -> dict[str, Any]:
    """The `radiology_report` metrics of generated reports (by row index) against the split's references.

    Args:
        metric (`evaluate.EvaluationModule`): `evaluate.load("metrics/radiology_report")`.
        split (`datasets.Dataset`): the split the reports were generated for (its `report` column is read).
        reports (`dict[int, str]`): generated reports by row index.
        options: passed to `metric.compute` (`bertscore=False`, `meteor=False` for quick validation).
    """
    references = list(split["report"])  # the text column alone: no image is decoded
    order = sorted(reports)
    return metric.compute(
        predictions=[reports[i] for i in order], references=[references[i] for i in order], **options
    )


def write_predictions(path: Path, split: datasets.Dataset, reports: dict[str, dict[int, str]]) -> None:
    """`predictions.jsonl`: one line per study, `{"id", "reference", "prediction", ...}`.

    Args:
        path (`Path`): the file to write.
        split (`datasets.Dataset`): the split the reports are for (`uid` and `report` are read).
        reports (`dict[str, dict[int, str]]`): each evaluation's reports by row index, as
            `{"test": ..., "test_image_ablated": ..., "test_nearest_train": ...}`; `test` gives the rows and the
            `prediction` field, the others `prediction_image_ablated` and `prediction_nearest_train`.
    """
    uids, references = list(split["uid"]), list(split["report"])
    with open(path, "w") as f:
        for index in sorted(reports["test"]):
            row = {"id": uids[index], "reference": references[index]}
            for name, by_row in reports.items():
                row["prediction" + name.removeprefix("test")] = by_row.get(index)
            f.write(json.dumps(row) + "\n")


def write_samples(
    output_dir: Path, split: datasets.Dataset, reports: dict[int, str], count: int = 12
) -> None:
    """`samples.png` / `samples.html`: test images with reference, prediction and the findings that differ."""
    indices = sorted(reports)[:count]
    examples = [split[i] for i in indices]  # decodes only these studies' images
    predictions = [reports[i] for i in indices]
    ref_labels = label_reports([example["report"] for example in examples])
    pred_labels = label_reports(predictions)
    records = [
        {
            "id": example["uid"],
            "image": example["images"][0],
            "reference": example["report"],
            "prediction": prediction,
            "differing_findings": [name for name in ref_l if (ref_l[name] == 1) != (pred_l[name] == 1)],
        }
        for example, prediction, ref_l, pred_l in zip(examples, predictions, ref_labels, pred_labels)
    ]
    write_samples_sheet(records, output_dir / "samples.png", output_dir / "samples.html")


def evaluate_validation(
    model: torch.nn.Module,
    dataloader: DataLoader,
    split: datasets.Dataset,
    processor: XrayCapProcessor,
    accelerator: Accelerator,
    metric,
    history: dict[str, Any],
    epoch: int,
    step: int,
    generate_kwargs: dict[str, Any],
) -> None:
    """One epoch's validation: reports generated under the run's autocast, scored without METEOR and BERTScore,
    `CURVE_METRICS` appended to `history["epoch_metrics"]` (main process) and logged (to the run's trackers too,
    with `--report_to`).

    Args:
        model, dataloader, processor, accelerator: as for [`generate_reports`] (the prepared validation loader).
        split (`datasets.Dataset`): the validation split (its references).
        metric (`evaluate.EvaluationModule`): the `radiology_report` metric.
        history (`dict[str, Any]`): the run's history, updated in place.
        epoch (`int`), step (`int`): the epoch just trained and the optimizer steps done.
        generate_kwargs (`dict[str, Any]`): passed to `model.generate` (`num_beams`, `max_new_tokens`).
    """
    with accelerator.autocast():
        reports = generate_reports(
            model, dataloader, processor, accelerator, f"validation, epoch {epoch}", **generate_kwargs
        )
    if not accelerator.is_main_process:
        return
    val_metrics = score(metric, split, reports, bertscore=False, meteor=False)
    curves = {key: val_metrics[key] for key in CURVE_METRICS if val_metrics.get(key) is not None}
    history["epoch_metrics"].append({"epoch": epoch, "step": step, **curves})
    logger.info(
        f"epoch {epoch}: validation ce_macro_f1 {format_value(val_metrics.get('ce_macro_f1'))}, "
        f"bleu_4 {format_value(val_metrics.get('bleu_4'))}"
    )
    numbers = {f"validation/{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))}
    accelerator.log(numbers, step=step)  # a no-op without trackers


def evaluate_test(
    model: torch.nn.Module,
    loaders: dict[str, DataLoader],
    splits: dict[str, datasets.Dataset],
    processor: XrayCapProcessor,
    accelerator: Accelerator,
    metric,
    features: FeatureCache,
    output_dir: Path,
    history: dict[str, Any],
    generate_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The test evaluation beside two floors: `test`, `test_image_ablated` (every image mid-grey: a model that
    ignores the image scores the same) and `test_nearest_train` (each study given the report of the train study
    with the closest encoder features). The main process scores them, adds the last epoch's validation scores
    and writes `predictions.jsonl` and `samples.png` / `samples.html` into `output_dir`.

    Args:
        model (`XrayCapForConditionalGeneration`): the trained, prepared model.
        loaders (`dict[str, DataLoader]`): the run's loaders (`test`, `test_image_ablated`; not yet prepared).
        splits (`dict[str, datasets.Dataset]`): the run's `train` and `test` splits.
        processor, accelerator: as for [`generate_reports`].
        metric (`evaluate.EvaluationModule`): the `radiology_report` metric.
        features (`FeatureCache`): the run's feature cache (the nearest-train floor).
        output_dir (`Path`): the run's output folder.
        history (`dict[str, Any]`): the run's history (its last `epoch_metrics` give `validation`).
        generate_kwargs (`dict[str, Any]`): passed to `model.generate` (`num_beams`, `max_new_tokens`).

    Returns:
        `dict[str, Any]`: each evaluation's metrics by name on the main process; empty on the others.
    """
    reports = {
        name: generate_reports(
            model, accelerator.prepare(loaders[name]), processor, accelerator, name, **generate_kwargs
        )
        for name in ("test", "test_image_ablated")
    }
    test_split = splits["test"]
    reports["test_nearest_train"] = nearest_train_floor(
        model, splits["train"], test_split, features, output_dir / "floor_features"
    )
    if not accelerator.is_main_process:
        return {}
    results = {name: score(metric, test_split, by_row) for name, by_row in reports.items()}
    if history["epoch_metrics"]:
        last = history["epoch_metrics"][-1]
        results["validation"] = {k: v for k, v in last.items() if k not in ("epoch", "step")}
    write_predictions(output_dir / "predictions.jsonl", test_split, reports)
    write_samples(output_dir, test_split, reports["test"])
    return results
