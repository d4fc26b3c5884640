"""Evaluation of a trained model: beam-search reports for a split, their scores, the prediction files.

`generate_reports` runs on every process and gathers each study's report exactly once; `nearest_train_reports`
is the retrieval floor (each test study gets the report of the train study with the closest encoder features);
`score` runs the `radiology_report` metric; `write_predictions` and `write_samples` write `predictions.jsonl` and
`samples.png` / `samples.html` into the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metrics.radiology_report.labeler import label_reports
from processing_xraycap import XrayCapProcessor

from .data import model_inputs
from .figures import write_samples_sheet


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
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        ids = unwrapped.generate(**model_inputs(batch), do_sample=False, **generate_kwargs)
        ids = accelerator.pad_across_processes(ids, dim=1, pad_index=pad_id)
        indices, ids = accelerator.gather_for_metrics((batch["index"], ids))
        for index, text in zip(indices.tolist(), processor.batch_decode(ids, skip_special_tokens=True)):
            reports[index] = text.strip()
    unwrapped.train(was_training)
    return reports


def nearest_train_reports(
    train_vectors: dict[int, torch.Tensor], test_vectors: dict[int, torch.Tensor], train_reports: list[str]
) -> dict[int, str]:
    """The retrieval floor: each test study gets the report of the train study with the most similar images.

    Similarity is the cosine of the encoder's pooled features (`precompute_features(..., pooled=True)`); ties go to
    the lower row.

    Args:
        train_vectors (`dict[int, torch.Tensor]`), test_vectors (`dict[int, torch.Tensor]`): pooled features by
            row index of the train and test splits.
        train_reports (`list[str]`): the train split's reports, by row index.

    Returns:
        `dict[int, str]`: the retrieved report of each test study, by its row index.
    """
    train_rows, test_rows = sorted(train_vectors), sorted(test_vectors)
    train = torch.nn.functional.normalize(torch.stack([train_vectors[i] for i in train_rows]).float(), dim=1)
    test = torch.nn.functional.normalize(torch.stack([test_vectors[i] for i in test_rows]).float(), dim=1)
    nearest = (test @ train.T).argmax(dim=1).tolist()
    return {row: train_reports[train_rows[j]] for row, j in zip(test_rows, nearest)}


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
