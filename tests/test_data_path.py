"""The path from a built dataset to batches: build options against --dataset_dir, workers, the dataset build's
processes, cached splits that decode no image, and the processor's resize before the RGB expansion."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from processing_xraycap import XrayCapImageProcessor, load_image
from xraycap.training import data
from xraycap.training.arguments import DataArguments, parse_args, resolve_build_options
from xraycap.training.data import IndexedStudies, StudyCollator, dataloader_workers


def built_dir(tmp_path: Path, **options) -> Path:
    """A --dataset_dir whose build_report.json records `options` (as `python -m dataset_builder build` does)."""
    folder = tmp_path / "built"
    folder.mkdir()
    built = {"section": "findings", "views": "pair", "min_images": 1, "image_size": 512, "r2gen": False}
    (folder / "build_report.json").write_text(
        json.dumps({"options": {**built, "split_file": None, **options}})
    )
    return folder


@pytest.mark.parametrize(
    "argument, value, key, built",
    [
        ("--section", "impression", "section", "'findings'"),
        ("--views", "all", "views", "'pair'"),
        ("--min_images", "3", "min_images", "1"),
        ("--build_image_size", "256", "image_size", "512"),
        ("--r2gen", "true", "r2gen", "False"),
    ],
)
def test_build_options_that_differ_from_the_dataset_dir_are_refused(argument, value, key, built, tmp_path):
    """Each of the build options, given with --dataset_dir and a value other than the built one: the error names
    the option, both values and the fix."""
    folder = built_dir(tmp_path)
    with pytest.raises(ValueError) as error:
        parse_args(["--dataset_dir", str(folder), argument, value, "--output_dir", str(tmp_path / "out")])
    message = str(error.value)
    assert f"{argument} " in message and f"built dataset's {key} {built}" in message
    assert "drop " + argument in message and "python -m dataset_builder build" in message


def test_split_file_is_compared_as_a_resolved_path(tmp_path: Path, monkeypatch):
    split_file = tmp_path / "annotation.json"
    folder = built_dir(tmp_path, split_file=str(split_file))
    monkeypatch.chdir(tmp_path)
    data_args = DataArguments(dataset_dir=str(folder), split_file="annotation.json")
    resolve_build_options(data_args)  # the same file, named relatively: accepted
    with pytest.raises(ValueError, match="--split_file 'other.json' differs"):
        resolve_build_options(DataArguments(dataset_dir=str(folder), split_file="other.json"))


def test_build_options_left_out_are_the_built_ones(tmp_path: Path):
    """With --dataset_dir the options not given are read from the build (the model card shows them); values equal
    to the build's are accepted (min_images as R2Gen raises it); without it they are the defaults."""
    folder = built_dir(tmp_path, section="impression", views="all", r2gen=True, min_images=2)
    data_args = DataArguments(dataset_dir=str(folder), min_images=1, r2gen=True)
    resolve_build_options(data_args)
    assert (data_args.section, data_args.views, data_args.min_images, data_args.build_image_size) == (
        "impression",
        "all",
        1,
        512,
    )
    plain = DataArguments()
    resolve_build_options(plain)
    assert (plain.section, plain.views, plain.min_images, plain.build_image_size, plain.r2gen) == (
        "findings",
        None,
        1,
        512,
        False,
    )
    (folder / "build_report.json").unlink()
    with pytest.raises(ValueError, match="has no build_report.json"):
        resolve_build_options(DataArguments(dataset_dir=str(folder), section="findings"))


def test_dataloader_workers_default_to_the_cores_per_local_process(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dataloader_workers(None, 1) == 8  # capped
    assert dataloader_workers(None, 4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on this node of a 16-process run
    assert dataloader_workers(None, 16) == 2
    assert dataloader_workers(3, 16) == 3  # asked for
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dataloader_workers(None, 8) == 0
    assert DataArguments().dataloader_num_workers is None


def test_num_proc_reaches_the_dataset_build(tmp_path: Path, monkeypatch):
    """--num_proc goes to dataset_builder.build_dataset (default None: all cores)."""
    from accelerate import PartialState

    calls = []

    def build_dataset(data_dir, *, num_proc=None, **options):
        calls.append(num_proc)
        return datasets.DatasetDict(), {}

    monkeypatch.setattr(data, "build_dataset", build_dataset)
    data_args = DataArguments(data_dir=str(tmp_path), num_proc=3, cache_dir=str(tmp_path / "cache"))
    resolve_build_options(data_args)
    data.load_studies(data_args, "pair", 0, PartialState())
    assert calls == [3]


def test_a_split_with_cached_features_decodes_no_image(tmp_path: Path):
    """A split carrying its features (training.feature_cache.with_features) has no image column left to decode;
    its batches hold the stored features, read a batch at a time."""
    from xraycap.training.feature_cache import with_features

    split = datasets.Dataset.from_dict(
        {"uid": ["a", "b", "c"], "report": ["x", "y", "z"], "images": [[b"not a png"]] * 3}
    )
    stored = np.arange(3 * 2 * 4 * 8, dtype=np.float32).reshape(3, 2, 4, 8)
    entry = datasets.Dataset.from_dict(
        {"image_features": stored, "view_mask": [[True, False]] * 3, "pooled": np.zeros((3, 8), np.float32)},
        features=datasets.Features(
            {
                "image_features": datasets.Array3D((2, 4, 8), "float32"),
                "view_mask": datasets.List(datasets.Value("bool"), length=2),
                "pooled": datasets.List(datasets.Value("float32"), length=8),
            }
        ),
    )
    cached = with_features(split, entry)
    assert "images" not in cached.column_names
    from testing_utils import make_tiny_model_and_processor

    _, processor = make_tiny_model_and_processor(image_size=64)
    studies = IndexedStudies(cached.select([2, 0]))
    batch = StudyCollator(processor, 2, 32)(studies.__getitems__([0, 1]))
    assert torch.equal(batch["image_features"], torch.from_numpy(stored[[2, 0]]))
    assert batch["view_mask"].tolist() == [[True, False]] * 2 and batch["index"].tolist() == [0, 1]


def test_the_collator_refuses_a_study_without_any_view():
    """A row whose view mask holds no view is refused once per batch, on the CPU, by the collator (the model's
    training forward no longer reads the mask back from the device)."""
    from testing_utils import make_tiny_model_and_processor

    _, processor = make_tiny_model_and_processor(image_size=64)
    rows = [
        {"uid": uid, "report": "x", "image_features": np.zeros((2, 4, 8), np.float32), "view_mask": mask}
        for uid, mask in (("a", [True, False]), ("b", [False, False]))
    ]
    with pytest.raises(ValueError, match=r"no view present in rows \[1\]"):
        StudyCollator(processor, 2, 32)(list(enumerate(rows)))


def processed_the_old_way(processor: XrayCapImageProcessor, image) -> torch.Tensor:
    """The processor before the change: RGB first, then resize and crop the three channels."""
    image, side = load_image(image), processor.crop_size.height
    width, height = image.size
    scale = side / min(width, height)
    new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), processor.resample)
    left, top = (new_w - side) // 2, (new_h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(processor.image_mean)[:, None, None]
    return (array - mean) / torch.tensor(processor.image_std)[:, None, None]


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos"])
def test_resizing_the_luminance_gives_the_tensors_of_resizing_rgb(resample, monkeypatch):
    """The resize runs on the single luminance band, before the expansion to three channels: the same tensors as
    resizing the RGB copy, for grayscale, RGB, colour and 16-bit inputs of any shape."""
    rng = np.random.default_rng(0)
    processor = XrayCapImageProcessor(size=64, resample=resample)
    resized_modes = []
    original_resize = Image.Image.resize

    def recording_resize(self, *args, **kwargs):
        resized_modes.append(self.mode)
        return original_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    for height, width in ((300, 257), (64, 64), (50, 90)):
        gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
        colour = np.stack([gray, gray[::-1], np.roll(gray, 3, axis=1)], axis=-1)
        for image in (
            Image.fromarray(gray),
            Image.fromarray(gray).convert("RGB"),
            Image.fromarray(colour),
            Image.fromarray(gray.astype(np.uint16) * 257),
        ):
            resized_modes.clear()
            new = processor(image)["pixel_values"][0]
            assert set(resized_modes) <= {"L"}
            assert torch.equal(new, processed_the_old_way(processor, image)), (height, width, image.mode)
