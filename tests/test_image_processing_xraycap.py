"""XrayCapImageProcessor: X-ray decoding (16-bit, luminance, the pixel cap) then resize -> crop -> normalise."""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "image_processor_reference.npz"


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
        "gray_bilinear_half": (
            Image.fromarray(portrait),
            {"size": 32, "resample": "bilinear", "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        ),
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


def test_settings_saved_before_the_port_still_load(tmp_path):
    """preprocessor_config.json / processor_config.json written by the hand-written processor (`size: 64`,
    `resample: "bilinear"`) load into the same settings and the same pixel values."""
    from testing_utils import make_tiny_tokenizer

    from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor

    image_folder, processor_folder = tmp_path / "image_processor", tmp_path / "processor"
    for folder, name in ((image_folder, "preprocessor_config"), (processor_folder, "processor_config")):
        folder.mkdir()
        (folder / f"{name}.json").write_text((FIXTURES / f"{name}_before_port.json").read_text())
    make_tiny_tokenizer().save_pretrained(processor_folder)
    old_image = XrayCapImageProcessor.from_pretrained(image_folder)
    assert old_image.size.shortest_edge == old_image.crop_size.height == old_image.crop_size.width == 64
    assert old_image.resample == Image.Resampling.BILINEAR and list(old_image.image_mean) == [0.5] * 3
    old_processor = XrayCapProcessor.from_pretrained(processor_folder)
    assert old_processor.max_views == 2 and old_processor.image_processor.crop_size.height == 64
    image = np.random.default_rng(0).integers(0, 256, (90, 70), dtype=np.uint8)
    today = XrayCapImageProcessor(size=64, resample="bilinear", image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert torch.equal(old_image(image)["pixel_values"], today(image)["pixel_values"])
    assert torch.equal(
        old_processor(images=image)["pixel_values"][:, 0],
        XrayCapImageProcessor(size=64)(image)["pixel_values"],
    )


def test_saved_folder_loads_with_auto_classes_in_a_fresh_process(tmp_path):
    """A saved processor folder carries both files and loads with AutoProcessor and AutoImageProcessor
    (trust_remote_code=True) in a fresh process outside the repository, giving the same pixel values."""
    from testing_utils import make_tiny_tokenizer

    from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor

    processor = XrayCapProcessor(XrayCapImageProcessor(size=48, resample="lanczos"), make_tiny_tokenizer())
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    assert {"image_decoding_xraycap.py", "image_processing_xraycap.py", "processing_xraycap.py"} <= set(
        os.listdir(folder)
    )
    saved = json.loads((folder / "preprocessor_config.json").read_text())
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_xraycap.XrayCapImageProcessor"
    image = np.random.default_rng(1).integers(0, 65535, (70, 60), dtype=np.uint16)
    np.save(tmp_path / "image.npy", image)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from transformers import AutoImageProcessor, AutoProcessor
        image = np.load({str(tmp_path / "image.npy")!r})
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        image_processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print(type(processor).__name__, type(image_processor).__name__)
        np.save({str(tmp_path / "study.npy")!r}, processor(images=[image])["pixel_values"].numpy())
        np.save({str(tmp_path / "view.npy")!r}, image_processor(image)["pixel_values"].numpy())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["XrayCapProcessor", "XrayCapImageProcessor"]
    expected = processor.image_processor(image)["pixel_values"].numpy()
    assert np.array_equal(np.load(tmp_path / "view.npy"), expected)
    assert np.array_equal(np.load(tmp_path / "study.npy")[:, 0], expected)


def test_bad_settings_are_refused_naming_them():
    from processing_xraycap import XrayCapImageProcessor

    with pytest.raises(ValueError, match="size=16 px is too small"):
        XrayCapImageProcessor(size=16)
    with pytest.raises(ValueError, match="resample='nearest' is not one of"):
        XrayCapImageProcessor(resample="nearest")


def test_a_string_is_a_local_file_never_fetched(tmp_path):
    """transformers' default fetches URL strings unchecked; here every string is a file, opened checked."""
    from processing_xraycap import XrayCapImageProcessor

    with pytest.raises(FileNotFoundError, match="http://example.invalid/film.png"):
        XrayCapImageProcessor(size=32)("http://example.invalid/film.png")


def test_builder_stores_a_transparent_grey_png_as_the_processor_reads_it(tmp_path):
    """A grey ("L") PNG with a transparent grey level (tRNS): the builder stores the luminance the processor reads
    (transparent pixels on black) as plain grey, so a reader that takes the stored pixels as they are (the
    augmentation, any viewer) sees what the model sees. Before the builder shared the processor's decoding it
    stored the file unchanged, transparency and all."""
    from xraycap.dataset_builder.images import encode_image

    from image_processing_xraycap import load_luminance

    film = np.random.default_rng(2).integers(0, 256, (40, 40), dtype=np.uint8)
    path = tmp_path / "film.png"
    Image.fromarray(film).save(path, transparency=int(film[0, 0]))
    stored_bytes, _ = encode_image(path, image_size=512)
    with Image.open(io.BytesIO(stored_bytes)) as stored:
        assert stored.mode == "L" and "transparency" not in stored.info
        assert np.array_equal(np.asarray(stored), np.asarray(load_luminance(path)))
    assert np.asarray(load_luminance(path))[0, 0] == 0  # transparent on black


if __name__ == "__main__":  # (re)write the reference with the processor in this checkout
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as folder:
        arrays = {
            name: pixel_values(image, opts) for name, (image, opts) in reference_cases(Path(folder)).items()
        }
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE}: {sorted(arrays)}")
