"""Images at inference arrive as uploaded and are read as training read them."""

import numpy as np
import pytest
from PIL import Image, ImageOps
from testing_utils import make_phantom_image
from usage_testing_utils import png_header_only
from xraycap.dataset_builder.images import DEFAULT_MAX_IMAGE_PIXELS, to_grayscale_8bit

import processing_xraycap
from processing_xraycap import XrayCapImageProcessor, load_image


def pixels(processor: XrayCapImageProcessor, image):
    return processor(image)["pixel_values"][0]


def test_rgb_and_grayscale_copies_of_one_film_give_the_same_tensor():
    """Training stored luminance ("L"); a colour-tinted RGB upload must be read as its luminance too."""
    processor = XrayCapImageProcessor(size=32)
    gray = make_phantom_image("cardiomegaly", size=48)
    rgb = Image.merge(  # a tinted copy: unequal channels whose luminance is the film
        "RGB", [gray.point(lambda v: min(255, v + 6)), gray, gray.point(lambda v: max(0, v - 30))]
    )
    luminance = rgb.convert("L")
    assert np.asarray(rgb)[..., 0].tolist() != np.asarray(rgb)[..., 2].tolist()
    assert pixels(processor, rgb).equal(pixels(processor, luminance))
    assert pixels(processor, gray.convert("RGB")).equal(pixels(processor, gray))


def test_16bit_and_rgba_files_are_read_as_the_builder_stored_them(tmp_path):
    """A 16-bit PNG and an RGBA PNG give the tensor of the builder's 8-bit grey copy of the same file."""
    processor = XrayCapImageProcessor(size=32)
    gray = np.asarray(ImageOps.autocontrast(make_phantom_image("left_effusion", size=48)), dtype=np.uint16)
    sixteen = Image.fromarray(gray * 200 + 1000)  # a narrow 16-bit window, as detectors write
    rgba = make_phantom_image("left_effusion", size=48).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    for name, image in {"16bit.png": sixteen, "rgba.png": rgba}.items():
        path = tmp_path / name
        image.save(path)
        with Image.open(path) as opened:
            stored = to_grayscale_8bit(opened)
        assert pixels(processor, path).equal(pixels(processor, stored)), name


def test_inference_pixel_cap_is_the_builders():
    assert getattr(processing_xraycap, "MAX_IMAGE_PIXELS", None) == DEFAULT_MAX_IMAGE_PIXELS


def test_image_over_the_pixel_cap_is_refused_before_decoding(tmp_path):
    big = tmp_path / "huge.png"
    png_header_only(big, 8000, 7000)  # 56 MP: under Pillow's own limit, over the builder's 50 MP
    with pytest.raises(ValueError, match=r"huge\.png is 8000x7000 = 56,000,000 pixels.*50,000,000"):
        load_image(big)


def test_decompression_bomb_is_a_value_error_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)  # 400 MP: Pillow raises DecompressionBombError on open
    with pytest.raises(ValueError, match="bomb.png"):
        load_image(bomb)


def test_eps_is_not_opened(tmp_path):
    """EPS is decoded by running Ghostscript: never an accepted X-ray format."""
    eps = tmp_path / "film.eps"
    make_phantom_image("normal", size=40).save(eps, format="EPS")
    with pytest.raises(
        ValueError, match=r"film\.eps is not a readable image file in an accepted format \(PNG"
    ):
        load_image(eps)
