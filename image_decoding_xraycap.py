"""The X-ray decoding XrayCap's image processor and its dataset builder share: any image -> its 8-bit luminance.

Numpy and Pillow only, so the dataset builder's processes import it without torch or transformers. A saved model
folder carries it beside `image_processing_xraycap.py`, which imports it.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# The raster formats an X-ray arrives in; anything else (EPS, which runs Ghostscript; PDF; ...) is refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# Pixels per image at most, at inference and in the dataset builder (which imports it).
MAX_IMAGE_PIXELS = 50_000_000
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "P", "RGBa", "La")

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor", str, os.PathLike, bytes]


def to_luminance(image: Image.Image) -> Image.Image:
    """
    Any PIL mode (1, L, LA, P, I;16, I, F, RGB, RGBA, CMYK, ...) -> its 8-bit luminance ("L"): the conversion the
    dataset builder stores every training image with, and the processor reads every input with.

    High-bit-depth images are scaled linearly from their own min..max range to 0..255 (not by a fixed 257: many
    16-bit radiographs use 10-12 bits); transparency is composited on black (the radiograph background);
    colour becomes luminance; bilevel becomes 0/255. A grey image with a transparent grey level (PNG tRNS) is
    composited too, so the builder stores the values the processor reads, with no transparency left to differ.
    """
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if high <= low:
            return Image.fromarray(np.zeros(array.shape, dtype=np.uint8))
        return Image.fromarray(np.round((array - low) * (255.0 / (high - low))).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    return image if image.mode == "L" else image.convert("L")


def _array_to_pil(array: np.ndarray, name: str = "array") -> Image.Image:
    """A (H, W), (H, W, C) or (C, H, W) array of any integer/float dtype -> an 8-bit PIL image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name} has shape {array.shape}; expected an image (H, W), (H, W, 3/4) or (3/4, H, W)."
        )
    if array.dtype != np.uint8:
        array = array.astype(np.float64)
        if array.dtype.kind == "f" and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = array * 255.0  # floats in [0, 1]
        elif array.size and (array.max() > 255 or array.min() < 0):
            low, high = float(array.min()), float(array.max())  # 16-bit / HU: use the image's own range
            array = (array - low) / max(high - low, 1e-8) * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse an image over `MAX_IMAGE_PIXELS` (read from its header, before any pixel is decoded)."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: "
            "downscale it (the training images were at most that size too)."
        )


def load_luminance(path_or_image: ImageLike) -> Image.Image:
    """[`load_image`] before the expansion to three channels: the 8-bit luminance ("L")."""
    if isinstance(path_or_image, Image.Image):
        check_pixels(path_or_image.size, "image")
        return to_luminance(path_or_image)
    if type(path_or_image).__module__.startswith("torch"):  # a torch.Tensor, without importing torch here
        return to_luminance(_array_to_pil(path_or_image.detach().cpu().numpy(), "tensor"))
    if isinstance(path_or_image, np.ndarray):
        return to_luminance(_array_to_pil(path_or_image))
    if isinstance(path_or_image, bytes | bytearray):
        source, name = io.BytesIO(path_or_image), "<bytes>"
    elif isinstance(path_or_image, str | os.PathLike):
        source = name = os.fspath(path_or_image)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Image file not found: {source}")
    else:
        raise ValueError(
            f"Cannot read an image from a {type(path_or_image).__name__}: pass a path, bytes, a PIL image "
            "or a numpy array."
        )
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS is refused below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=ACCEPTED_FORMATS) as image:
                check_pixels(image.size, name)
                image.load()
                return to_luminance(image)
    except Image.DecompressionBombError as err:
        raise ValueError(
            f"{name} is too large to decode ({err}); the limit is {MAX_IMAGE_PIXELS:,} pixels: downscale it."
        ) from err
    except UnidentifiedImageError as err:
        raise ValueError(
            f"{name} is not a readable image file in an accepted format ({', '.join(ACCEPTED_FORMATS)}): {err}"
        ) from err
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{name} is not a readable image file ({err}).") from err


def load_image(path_or_image: ImageLike) -> Image.Image:
    """
    Open an image and convert it to its 8-bit luminance in RGB form, as the training images were stored.

    Args:
        path_or_image (`str`, `os.PathLike`, `bytes`, `PIL.Image.Image`, `np.ndarray` or `torch.Tensor`):
            A file path, encoded file bytes, or an image already in memory. 16-bit and float images are
            rescaled from their own min-max range; RGBA is composited on black; colour becomes luminance.
            Files are opened only as one of `ACCEPTED_FORMATS` and only up to `MAX_IMAGE_PIXELS` pixels.

    Returns:
        `PIL.Image.Image` in mode "RGB" (three equal channels).

    Raises:
        `FileNotFoundError` if the path does not exist; `ValueError` naming the file if it is not a readable
        image in an accepted format, or is larger than `MAX_IMAGE_PIXELS`.
    """
    return load_luminance(path_or_image).convert("RGB")
