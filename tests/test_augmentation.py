"""X-ray-safe augmentation (`--augment`): never a mirror, new draws every epoch, training images only."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from testing_utils import (
    PHANTOM_REPORTS,
    SMALL_RUN,
    make_phantom_image,
    make_tiny_model_and_processor,
    reset_accelerate_state,
)

from processing_xraycap import load_image
from xraycap.training.augmentation import ROTATION_LIMIT, SCALE_LIMITS, TRANSLATION_LIMIT, XrayAugmentation
from xraycap.training.data import StudyCollator, study_dataloader

SIZE = 96
IDENTITY = {"angle": 0.0, "translate": [0.0, 0.0], "scale": 1.0, "brightness": 1.0, "contrast": 1.0}


def _film(
    markers: list[tuple[int, int]], value: int = 255, background: int = 90, mode: str = "L"
) -> Image.Image:
    """A grey film with bright square markers centred at `markers` (x, y), 10 px a side."""
    image = Image.new("L", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for x, y in markers:
        draw.rectangle([x - 5, y - 5, x + 4, y + 4], fill=value)
    if mode == "I;16":  # 12-bit detector values, as DICOM-derived PNGs hold
        return Image.fromarray((np.asarray(image, dtype=np.uint16) * 16).astype(np.uint16))
    return image


def _centroids_x(image: Image.Image, threshold: int = 180) -> list[float]:
    """The x centroid of each bright blob, left to right on the image (blobs split at the image's centre column)."""
    bright = np.asarray(image) > threshold
    columns = np.nonzero(bright)[1]
    return sorted(
        float(c.mean()) for c in (columns[columns < SIZE // 2], columns[columns >= SIZE // 2]) if c.size
    )


# --------------------------------------------------------------------------------------------------
# Never a mirror
# --------------------------------------------------------------------------------------------------


def test_a_marker_on_the_left_stays_on_the_left_over_many_draws():
    """The patient's right (image left) never ends up on the other side: 200 draws, the marker's centroid stays
    in the left half (a flip would put it near x = 0.75 * width)."""
    augmentation = XrayAugmentation(seed=1)
    film = _film([(int(0.25 * SIZE), SIZE // 2)])
    changed = 0
    for draw in range(200):
        out = augmentation(film, augmentation.generator(draw, 0, 0))
        assert out.mode == "L" and out.size == film.size
        columns = np.nonzero(np.asarray(out) > 180)[1]
        assert columns.size > 50, "the marker left the film"
        assert columns.mean() < 0.4 * SIZE
        changed += not np.array_equal(np.asarray(out), np.asarray(film))
    assert changed == 200


def test_even_the_largest_allowed_settings_keep_left_left_of_right():
    """At the limits (30 degrees, scale 0.5-2, 20 % shifts) the map still preserves orientation: of two markers,
    the left one stays left of the right one (a mirror or a half turn would swap them)."""
    augmentation = XrayAugmentation(
        max_rotation=ROTATION_LIMIT,
        scale=SCALE_LIMITS,
        max_translation=TRANSLATION_LIMIT,
        brightness=0.0,
        contrast=0.0,
        seed=2,
    )
    film = _film([(int(0.4 * SIZE), SIZE // 2)], value=255)
    ImageDraw.Draw(film).rectangle(
        [int(0.6 * SIZE) - 5, SIZE // 2 - 5, int(0.6 * SIZE) + 4, SIZE // 2 + 4], fill=160
    )
    compared = 0
    for draw in range(200):
        out = np.asarray(augmentation(film, augmentation.generator(draw, 0, 0))).astype(int)
        left = np.nonzero(out > 220)[1]  # the 255 marker
        right = np.nonzero((out > 140) & (out < 180))[1]  # the 160 marker (bilinear edges aside)
        if left.size > 20 and right.size > 20:
            assert left.mean() < right.mean()
            compared += 1
    assert compared > 150


def test_there_is_no_flip_to_configure_and_mirroring_values_are_refused():
    parameters = inspect.signature(XrayAugmentation).parameters
    assert not [name for name in parameters if "flip" in name or "mirror" in name or "shear" in name]
    with pytest.raises(TypeError, match="horizontal_flip"):
        XrayAugmentation(horizontal_flip=True)
    with pytest.raises(TypeError):  # keyword-only: no positional slot to smuggle a flip into
        XrayAugmentation(5.0)
    for bad, message in (
        ({"scale": (-1.1, -0.9)}, "negative scale would mirror"),
        ({"scale": (0.0, 1.0)}, "scale=\\(0.0, 1.0\\)"),
        ({"max_rotation": 180}, "max_rotation=180"),
        ({"max_translation": 0.6}, "max_translation=0.6"),
        ({"brightness": 2.0}, "brightness=2.0"),
    ):
        with pytest.raises(ValueError, match=message):
            XrayAugmentation(**bad)
    film = _film([(20, 48)])
    with pytest.raises(ValueError, match="scale=-1"):
        XrayAugmentation.apply(film, {**IDENTITY, "scale": -1.0})
    with pytest.raises(ValueError, match="angle=180"):
        XrayAugmentation.apply(film, {**IDENTITY, "angle": 180.0})


def test_borders_uncovered_by_the_geometry_are_black():
    out = XrayAugmentation.apply(Image.new("L", (SIZE, SIZE), 200), {**IDENTITY, "translate": [10.0, 0.0]})
    array = np.asarray(out)
    assert (array[:, :9] == 0).all() and (array[:, 12:] == 200).all()


# --------------------------------------------------------------------------------------------------
# Image modes
# --------------------------------------------------------------------------------------------------


def test_16_bit_views_become_the_processors_8_bit_luminance_then_are_augmented():
    """An "I;16" view is converted exactly as the processor would convert it (so the identity draw changes
    nothing the model sees), then augmented as 8-bit "L"; the marker keeps its side."""
    film16 = _film([(int(0.25 * SIZE), SIZE // 2)], mode="I;16")
    assert film16.mode == "I;16"
    same = XrayAugmentation.apply(film16, IDENTITY)
    assert same.mode == "L"
    assert np.array_equal(np.asarray(same), np.asarray(load_image(film16).convert("L")))
    _, processor = make_tiny_model_and_processor(image_size=64, max_views=1)
    assert torch.equal(
        processor(images=[[same]])["pixel_values"], processor(images=[[film16]])["pixel_values"]
    )

    augmentation = XrayAugmentation(seed=3)
    for draw in range(20):
        out = augmentation(film16, augmentation.generator(draw, 0, 0))
        assert out.mode == "L" and out.size == film16.size
        assert np.nonzero(np.asarray(out) > 180)[1].mean() < 0.4 * SIZE
    collator = StudyCollator(processor, 1, 32, augmentation=augmentation)
    batch = collator([(0, {"images": [film16], "report": "Clear."})])
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and torch.isfinite(batch["pixel_values"]).all()


# --------------------------------------------------------------------------------------------------
# Randomness: new every epoch, same for the same seed
# --------------------------------------------------------------------------------------------------


def _studies(count: int) -> list[dict]:
    findings = list(PHANTOM_REPORTS)
    return [
        {"images": [make_phantom_image(findings[i % 5], seed=i)], "report": PHANTOM_REPORTS[findings[i % 5]]}
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def processor():
    return make_tiny_model_and_processor(image_size=64, max_views=1)[1]


def _epochs(processor, split, num_workers: int, epochs: int = 2, batch_size: int = 3) -> list[torch.Tensor]:
    """Each epoch's pixel_values, rows put back in study order (the shuffle differs per epoch)."""
    collator = StudyCollator(processor, 1, 32, augmentation=XrayAugmentation(seed=7))
    loader = study_dataloader(split, collator, batch_size, shuffle=True, num_workers=num_workers, seed=5)
    result = []
    for epoch in range(epochs):
        collator.set_epoch(epoch)
        batches = list(loader)
        order = torch.cat([b["index"] for b in batches]).argsort()
        result.append(torch.cat([b["pixel_values"] for b in batches])[order])
    return result


@pytest.mark.parametrize("num_workers", [0, 2])
def test_augmented_batches_differ_each_epoch_and_repeat_with_the_seed(processor, num_workers):
    split = _studies(6)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    first = _epochs(processor, split, num_workers)
    # The draws come from generators keyed on (seed, epoch, row, view): dropout's stream is untouched.
    assert torch.equal(torch.get_rng_state(), global_state)
    again = _epochs(processor, split, num_workers)
    plain = StudyCollator(processor, 1, 32)([(i, s) for i, s in enumerate(split)])["pixel_values"]
    for epoch in range(2):
        assert torch.equal(first[epoch], again[epoch]), f"epoch {epoch} not reproducible with the same seed"
        assert not torch.equal(first[epoch], plain)
    for study in range(6):  # every study sees a different image in epoch 2 than in epoch 1
        assert not torch.equal(first[0][study], first[1][study])


def test_augmented_images_depend_on_seed_epoch_and_study_only(processor):
    """Workers, batch size and shuffle order do not change what a study's image becomes in an epoch, so a run
    resumed mid-epoch (its iterator re-created, the first batches skipped) sees the uninterrupted run's images."""
    split = _studies(6)
    reference = _epochs(processor, split, num_workers=0)
    for num_workers, batch_size in ((2, 3), (0, 4), (0, 1)):
        other = _epochs(processor, split, num_workers=num_workers, batch_size=batch_size)
        assert all(torch.equal(a, b) for a, b in zip(reference, other)), (num_workers, batch_size)


def test_evaluation_and_ablation_collators_never_augment(processor):
    """Collators are plain unless given an augmentation; the grey-image ablation and the feature cache refuse
    one."""
    items = list(enumerate(_studies(2)))
    evaluation = StudyCollator(processor, 1, 32, with_text=False)
    assert evaluation.augmentation is None
    assert torch.equal(evaluation(items)["pixel_values"], evaluation(items)["pixel_values"])
    with pytest.raises(ValueError, match="ablate=True, augmentation"):
        StudyCollator(processor, 1, 32, ablate=True, augmentation=XrayAugmentation())
    cached = StudyCollator(processor, 1, 32, augmentation=XrayAugmentation())
    study = {
        "report": "Clear.",
        "image_features": np.zeros((1, 4, 8), np.float32),
        "view_mask": np.array([True]),
    }
    with pytest.raises(ValueError, match="cached encoder features with an augmentation"):
        cached([(0, study)])


# --------------------------------------------------------------------------------------------------
# run_captioning --augment
# --------------------------------------------------------------------------------------------------


def test_run_with_augment_turns_the_feature_cache_off_and_trains(tmp_path: Path, monkeypatch, caplog):
    """`--augment true --cache_features true`: a warning says why the cache is off, only the training collator
    augments (each training image, anew), the run trains and records `augment` in run_args.json."""
    import json

    import run_captioning

    collators: list[StudyCollator] = []
    original_init = StudyCollator.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        collators.append(self)

    calls = []
    original_call = XrayAugmentation.__call__

    def counting_call(self, image, generator):
        calls.append(image.size)
        return original_call(self, image, generator)

    monkeypatch.setattr(StudyCollator, "__init__", recording_init)
    monkeypatch.setattr(XrayAugmentation, "__call__", counting_call)
    monkeypatch.chdir(tmp_path)
    reset_accelerate_state()
    try:
        with caplog.at_level(logging.WARNING):
            run_captioning.main(
                [
                    *SMALL_RUN,
                    "--max_steps",
                    "2",
                    "--do_eval",
                    "false",
                    "--augment",
                    "true",
                    "--dataloader_num_workers",  # the augmentation runs in this process, where it is counted
                    "0",
                    "--cache_features",
                    "true",
                    "--freeze_vision_encoder",
                    "true",
                    "--output_dir",
                    str(tmp_path / "out"),
                    "--cache_dir",
                    str(tmp_path / "cache"),
                ]
            )
    finally:
        reset_accelerate_state()
    assert "--cache_features is off: --augment changes the training images every epoch" in caplog.text
    train = [c for c in collators if c.with_text]
    assert len(train) == 1 and isinstance(train[0].augmentation, XrayAugmentation)
    assert "Feature cache" not in caplog.text  # nothing encoded ahead: the training images change every epoch
    assert all(c.augmentation is None for c in collators if not c.with_text)
    assert len(calls) >= 2 * 4  # two steps of four studies (the loader fetches one batch ahead)
    history = json.loads((tmp_path / "out" / "trainer_history.json").read_text())
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert json.loads((tmp_path / "out" / "run_args.json").read_text())["training"]["augment"] is True
