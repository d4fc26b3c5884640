"""XrayCapImageProcessor: X-ray decoding (16-bit, luminance, the pixel cap) then resize -> crop -> normalise."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURE = Path(__file__).parent / "fixtures" / "image_processor_reference.npz"


def reference_cases(folder: Path) -> dict[str, tuple[object, dict]]:
    """Fixed inputs (seeded numpy, no project helper) and processor options, one per decoding/resize path."""
    rng = np.random.default_rng(20261208)
    portrait = rng.integers(0, 256, (57, 43), dtype=np.uint8)
    landscape = rng.integers(0, 256, (40, 90), dtype=np.uint8)
    tall = rng.integers(0, 256, (300, 257), dtype=np.uint8)
    colour = np.stack([portrait, portrait[::-1], np.roll(portrait, 5, axis=1)], axis=-1)
    sixteen = folder / "sixteen.png"
    Image.fromarray(portrait.astype(np.uint16) * 40 + 900).save(sixteen)  # a narrow 16-bit window
    rgba = Image.fromarray(colour).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return {
        "gray_bicubic": (Image.fromarray(portrait), {"size": 32}),
        "gray_bilinear_half": (Image.fromarray(portrait), {"size": 32, "resample": "bilinear",
                                                           "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
        "landscape_lanczos": (Image.fromarray(landscape), {"size": 32, "resample": "lanczos"}),
        "rounded_long_side": (Image.fromarray(tall), {"size": 64}),
        "sixteen_bit_file": (sixteen, {"size": 32}),
        "rgba_on_black": (rgba, {"size": 32}),
        "colour_array": (colour, {"size": 32}),
        "float_array": (portrait.astype(np.float32) / 255.0, {"size": 32}),
        "upscaled": (Image.fromarray(portrait[:20, :25]), {"size": 32}),
        "exact_size": (Image.fromarray(portrait[:32, :32]), {"size": 32}),
    }


def pixel_values(image, options: dict) -> np.ndarray:
    from processing_xraycap import XrayCapImageProcessor  # where it lived before the port, and still imports

    out = XrayCapImageProcessor(**options)(image, return_tensors="pt")["pixel_values"]
    return out[0].numpy()


def test_pixel_values_equal_the_reference_computed_before_the_port(tmp_path):
    """The same image and options give bit-equal pixel values to the hand-written processor this replaced
    (tests/fixtures/image_processor_reference.npz, written by it: `python tests/test_image_processing_xraycap.py`)."""
    reference = np.load(FIXTURE)
    cases = reference_cases(tmp_path)
    assert sorted(reference.files) == sorted(cases)
    for name, (image, options) in cases.items():
        got = pixel_values(image, options)
        assert got.dtype == np.float32 and got.shape == reference[name].shape, name
        assert np.array_equal(got, reference[name]), (name, float(np.abs(got - reference[name]).max()))


if __name__ == "__main__":  # (re)write the reference with the processor in this checkout
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as folder:
        arrays = {name: pixel_values(image, opts) for name, (image, opts) in reference_cases(Path(folder)).items()}
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE}: {sorted(arrays)}")
