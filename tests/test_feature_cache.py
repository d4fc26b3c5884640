"""The on-disk feature cache (`xraycap/training/feature_cache.py`) and the nearest-train floor computed from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from testing_utils import (
    FINDINGS,
    PHANTOM_REPORTS,
    SMALL_RUN,
    make_phantom_image,
    make_tiny_model_and_processor,
    reset_accelerate_state,
)

from xraycap.training.data import StudyCollator
from xraycap.training.evaluation import nearest_train_rows
from xraycap.training.feature_cache import FeatureCache, feature_fingerprint, features_from_storage

FAST = ["--max_steps", "2", "--num_beams", "1", "--max_new_tokens", "8", "--per_device_eval_batch_size", "16"]


def image_split(count: int, start: int = 0) -> datasets.Dataset:
    """Studies as dataset_builder stores them: `uid`, `report`, a list of "L" images."""
    findings = [FINDINGS[i % len(FINDINGS)] for i in range(start, start + count)]
    return datasets.Dataset.from_dict(
        {
            "uid": [str(i) for i in range(start, start + count)],
            "report": [PHANTOM_REPORTS[f] for f in findings],
            "images": [[make_phantom_image(f, seed=i)] for i, f in enumerate(findings, start)],
        },
        features=datasets.Features(
            {
                "uid": datasets.Value("string"),
                "report": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )


@pytest.fixture
def fresh_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_features_are_encoded_once_and_read_back_exactly(precision, tmp_path: Path, fresh_state, monkeypatch):
    """An entry holds exactly what the encoder gave under the run's autocast (bf16 bit for bit), one row per study
    in the split's order; asking again reads the entry and runs no encoder."""
    model, processor = make_tiny_model_and_processor(image_size=64, max_views=1)
    model.eval()
    split = image_split(5)
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    collator = StudyCollator(processor, 1, 32, with_text=False)
    cache = FeatureCache(tmp_path, accelerator, collator, batch_size=2)
    entry = cache.features(model, split, desc="train")
    assert len(entry) == 5 and len(list(tmp_path.iterdir())) == 1
    items = list(enumerate(split))
    expected, masks = [], []
    for start in range(
        0, 5, 2
    ):  # the cache's batches (kernels may round differently with another batch size)
        batch = collator(items[start : start + 2])
        with torch.no_grad(), accelerator.autocast():
            expected.append(model.get_image_features(batch["pixel_values"], batch["view_mask"]))
        masks += batch["view_mask"].tolist()
    expected = torch.cat(expected)
    stored = entry.with_format("numpy")[:]
    features = features_from_storage(stored["image_features"])
    assert features.dtype == expected.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert torch.equal(features, expected)
    assert stored["view_mask"].tolist() == masks

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the entry exists")

    monkeypatch.setattr(model, "get_image_features", no_encoder)
    again = cache.features(model, split, desc="train")
    assert np.array_equal(again.with_format("numpy")[:]["image_features"], stored["image_features"])


@pytest.fixture
def started_worker_sets(monkeypatch) -> list[int]:
    """The `num_workers` of every set of DataLoader worker processes started while the test runs."""
    from torch.utils.data import dataloader

    started = []
    start_workers = dataloader._MultiProcessingDataLoaderIter.__init__

    def counted(self, loader):
        started.append(loader.num_workers)
        start_workers(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counted)
    return started


def test_encoding_starts_one_set_of_loader_workers(tmp_path: Path, fresh_state, started_worker_sets):
    """Encoding a split with DataLoader workers starts them once: no second, idle set of worker processes (each a
    copy of the training process holding prefetched batches) lives beside the one that decodes."""
    model, processor = make_tiny_model_and_processor(image_size=32, max_views=1)
    collator = StudyCollator(processor, 1, 32, with_text=False)
    cache = FeatureCache(tmp_path, Accelerator(cpu=True), collator, batch_size=2, num_workers=1)
    assert len(cache.features(model, image_split(3), desc="train")) == 3
    assert started_worker_sets == [1]


def test_generating_reports_starts_one_set_of_loader_workers(fresh_state, started_worker_sets):
    """Evaluation's generation, like encoding, starts its loader's workers once, and every study comes back."""
    from torch.utils.data import dataloader

    from xraycap.training.data import IndexedStudies
    from xraycap.training.evaluation import generate_reports

    model, processor = make_tiny_model_and_processor(image_size=32, max_views=1)
    collator = StudyCollator(processor, 1, 32, with_text=False)
    loader = dataloader.DataLoader(
        IndexedStudies(image_split(3)), batch_size=2, collate_fn=collator, num_workers=1
    )
    reports = generate_reports(model, loader, processor, Accelerator(cpu=True), "test", max_new_tokens=3)
    assert sorted(reports) == [0, 1, 2] and started_worker_sets == [1]


def test_another_tower_image_size_or_split_makes_a_new_entry():
    """The entry's name follows the tower's weights, the image options and the split; nothing else."""
    model, processor = make_tiny_model_and_processor(image_size=64, max_views=1)
    split = image_split(3)
    key = feature_fingerprint(model, processor, split, "no")[0]
    assert feature_fingerprint(model, processor, split, "no")[0] == key
    assert feature_fingerprint(model, processor, split, "bf16")[0] != key
    assert feature_fingerprint(model, processor, image_split(3, start=1), "no")[0] != key
    processor.image_processor.size = 96
    assert feature_fingerprint(model, processor, split, "no")[0] != key
    processor.image_processor.size = 64
    with torch.no_grad():
        next(model.vision_model.parameters()).view(-1)[0] += 1e-3
    assert feature_fingerprint(model, processor, split, "no")[0] != key
    # The text side and the projection are not part of it: a trained decoder keeps the entry.
    other, _ = make_tiny_model_and_processor(seed=1, image_size=64, max_views=1)
    other.vision_model.load_state_dict(model.vision_model.state_dict())
    assert (
        feature_fingerprint(other, processor, split, "no")[0]
        == feature_fingerprint(model, processor, split, "no")[0]
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_nearest_train_rows_match_a_dense_argmax(chunk_size, fresh_state):
    """Chunked top-1 cosine == the full similarity matrix's argmax, ties (duplicate train studies) to the lower row."""
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(11, 6, generator=generator)
    train[7] = train[2] * 3.0  # the same direction: a tie, which row 2 wins
    test = torch.cat([torch.randn(6, 6, generator=generator), train[2:3] * 0.5])
    dense = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    expected = dict(enumerate(dense.argmax(dim=1).tolist()))
    assert expected[6] == 2
    rows = nearest_train_rows(
        datasets.Dataset.from_dict({"pooled": train.tolist()}),
        datasets.Dataset.from_dict({"pooled": test.tolist()}),
        Accelerator(cpu=True),
        chunk_size=chunk_size,
    )
    assert rows == expected


# --------------------------------------------------------------------------------------------------
# run_captioning: reuse across runs, and the floor against the old code path
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[str, str]:
    """A small pretrained-style ResNet and GPT-2 (random weights, saved locally): a frozen tower whose weights do
    not depend on the run's seed."""
    from test_configs import save_towers

    folder = tmp_path_factory.mktemp("towers")
    vision, text = save_towers(folder, real_size=False)
    return str(vision), str(text)


def run(args: list[str], caplog) -> str:
    """run_captioning in this process; its log."""
    import run_captioning

    caplog.clear()
    reset_accelerate_state()
    try:
        with caplog.at_level(logging.INFO):
            run_captioning.main(args)
    finally:
        reset_accelerate_state()
    return caplog.text


@pytest.mark.slow
def test_resume_seeds_and_folds_reuse_the_cache(towers, tmp_path: Path, monkeypatch, caplog):
    """The first run encodes train and validation once; a second seed, a resumed run and a cross-validation fold
    find every entry and run no encoder pass over them."""
    monkeypatch.chdir(tmp_path)
    vision, text = towers
    common = [*SMALL_RUN, *FAST, "--do_eval", "false", "--vision_model", vision, "--text_model", text]
    common += ["--cache_features", "true", "--cache_dir", str(tmp_path / "cache")]
    log = run([*common, "--num_seeds", "2", "--output_dir", str(tmp_path / "seeds")], caplog)
    encoded = [line for line in log.splitlines() if "Feature cache: encoding" in line]
    assert len(encoded) == 2 and "studies of train" in encoded[0] and "studies of validation" in encoded[1], (
        log
    )
    second_seed = log[log.index("Run seed-4") :]
    assert "Feature cache: encoding" not in second_seed and second_seed.count("Feature cache: reusing") == 2
    entries = list((tmp_path / "cache" / "feature_cache").iterdir())
    assert len(entries) == 2 and all((entry / "cache_info.json").is_file() for entry in entries)

    resume = [
        *common,
        "--resume_from_checkpoint",
        "latest",
        "--output_dir",
        str(tmp_path / "seeds" / "seed-3"),
    ]
    log = run(resume, caplog)
    assert "Feature cache: encoding" not in log and log.count("Feature cache: reusing") == 2, log
    log = run([*common, "--folds", "2", "--fold", "1", "--output_dir", str(tmp_path / "fold")], caplog)
    assert "Feature cache: encoding" not in log and log.count("Feature cache: reusing") == 2, log
    history = json.loads((tmp_path / "fold" / "trainer_history.json").read_text())
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert len(list((tmp_path / "cache" / "feature_cache").iterdir())) == 2


def old_nearest_train_reports(
    folder: Path, train: datasets.Dataset, test: datasets.Dataset
) -> dict[str, str]:
    """The floor as it was computed before the feature cache: the saved model's encoder in fp32 over every train
    and test study, pooled, a dense cosine matrix, its argmax. By test uid."""
    from modeling_xraycap import XrayCapForConditionalGeneration
    from processing_xraycap import XrayCapProcessor

    model = XrayCapForConditionalGeneration.from_pretrained(folder).eval()
    processor = XrayCapProcessor.from_pretrained(folder)

    def pooled(split: datasets.Dataset) -> torch.Tensor:
        vectors = []
        for start in range(0, len(split), 8):
            studies = split[start : start + 8]["images"]
            batch = processor(images=[views[: processor.max_views] for views in studies], return_tensors="pt")
            with torch.no_grad():
                features = model.get_image_features(batch["pixel_values"], batch["view_mask"]).float()
            weights = batch["view_mask"].float()[:, :, None]
            vectors.append((features.mean(dim=2) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1))
        return torch.nn.functional.normalize(torch.cat(vectors), dim=1)

    nearest = (pooled(test) @ pooled(train).T).argmax(dim=1).tolist()
    return {uid: train[j]["report"] for uid, j in zip(test["uid"], nearest)}


def built_splits(cache: Path, views: str) -> datasets.DatasetDict:
    """The phantom build a SMALL_RUN job trained on (its cached build is reused)."""
    from xraycap.training.arguments import DataArguments, resolve_build_options
    from xraycap.training.data import load_studies

    data_args = DataArguments(synthetic_studies=40, cache_dir=str(cache))
    resolve_build_options(data_args)
    reset_accelerate_state()
    try:
        return load_studies(data_args, views, 3, Accelerator(cpu=True))[0]
    finally:
        reset_accelerate_state()


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["demo", "frozen_cached"])
def test_floor_gives_the_old_reports_without_a_second_encoder_pass(
    setup, towers, tmp_path, monkeypatch, caplog
):
    """The nearest-train floor of a run equals the old code path's, study for study: the demo (a trained tower:
    one fp32 pass, pooled only, scratch removed) and a frozen tower with --cache_features in fp32 (the train
    studies' cached features serve the floor: train is encoded once in the whole run)."""
    monkeypatch.chdir(tmp_path)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*SMALL_RUN, *FAST, "--output_dir", str(out), "--cache_dir", str(cache)]
    if setup == "frozen_cached":
        vision, text = towers
        args += ["--vision_model", vision, "--text_model", text, "--cache_features", "true"]
        args += ["--mixed_precision", "no"]
    log = run(args, caplog)
    train_passes = [
        line for line in log.splitlines() if "Feature cache: encoding" in line and "of train" in line
    ]
    assert len(train_passes) == 1, log
    assert not (out / "floor_features").exists()
    views = "frontal" if setup == "demo" else "pair"
    dataset = built_splits(cache, views)
    expected = old_nearest_train_reports(out, dataset["train"], dataset["test"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {row["id"]: row["prediction_nearest_train"] for row in rows} == expected
