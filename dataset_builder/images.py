"""Reading, checking and re-encoding the input radiographs.

Every image is decoded once at build time, converted to 8-bit grayscale and re-encoded as PNG with its
longer side at most `image_size`, so training never decodes the 2,000-3,000 px originals.

Conversions (`to_grayscale_8bit`, the image processor's `image_decoding_xraycap.to_luminance`): 16-bit
(and 32-bit integer / float) images are scaled linearly from their ACTUAL value range (min..max) to 0..255,
not by a fixed 257 or 65535 (many 16-bit radiographs use 10-12 bits); RGBA / LA / palette images are
composited over black (the radiograph background) then turned to luminance; RGB to luminance; bilevel to 0/255.

Problems are raised as `ImageProblem(reason, detail)` with one of the reasons below; the builder
records them in `skipped` instead of crashing.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# The X-ray decoding lives with the model's image processor, so training images are stored exactly as inference
# reads an upload: one conversion (16-bit by its own range, alpha on black, colour to luminance) and one pixel
# cap (50 M; the real Indiana PNGs are at most ~2,934 x 2,934 = 8.6 M pixels).
from image_decoding_xraycap import MAX_IMAGE_PIXELS as DEFAULT_MAX_IMAGE_PIXELS
from image_decoding_xraycap import to_luminance as to_grayscale_8bit

REASON_MISSING = "image file missing"
REASON_ESCAPES = "filename escapes the image folder"
REASON_NOT_IMAGE = "not an image"
REASON_UNREADABLE = "unreadable or truncated image"
REASON_TOO_LARGE = "image too large (decompression bomb guard)"


class ImageProblem(Exception):
    """An input image that cannot be used.

    Args:
        reason (`str`): one of the `REASON_*` constants (a stable category for the build report).
        detail (`str`, defaults to ""): what exactly went wrong.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def resolve_image_path(image_dir: Path, filename: str) -> Path:
    """Joins `filename` to `image_dir`, refusing names that escape it (`../`, absolute paths, links out).

    Raises:
        ImageProblem: with `REASON_ESCAPES` or `REASON_MISSING`.
    """
    if not filename or "\x00" in filename:
        raise ImageProblem(REASON_MISSING, f"empty or invalid filename {filename!r}")
    root = image_dir.resolve()
    candidate = (image_dir / filename).resolve()
    if os.path.isabs(filename) or (candidate != root and root not in candidate.parents):
        raise ImageProblem(REASON_ESCAPES, f"{filename!r} resolves outside {root}")
    if not candidate.is_file():
        raise ImageProblem(REASON_MISSING, str(image_dir / filename))
    return candidate


def probe_image(path: Path, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Cheap header check (no pixel decoding): the file is a non-empty image of acceptable size.

    Returns:
        `tuple[int, int]`: (width, height).

    Raises:
        ImageProblem: `REASON_NOT_IMAGE`, `REASON_TOO_LARGE` or `REASON_UNREADABLE`.
    """
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise ImageProblem(REASON_UNREADABLE, f"{type(err).__name__}: {err}") from None
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_checked(fh, path, max_image_pixels) as im:
            return im.size


def _target_size(size: tuple[int, int], image_size: int) -> tuple[int, int] | None:
    """The (width, height) with the longer side at most `image_size` (None when no shrinking is needed)."""
    w, h = size
    scale = image_size / max(w, h)
    if scale >= 1.0:
        return None
    return max(1, round(w * scale)), max(1, round(h * scale))


def _open_checked(fh, path: Path, max_image_pixels: int) -> Image.Image:
    """`Image.open` on the open file `fh`, checked: not empty, a known format, within the pixel cap (no pixel decoded)."""
    if os.fstat(fh.fileno()).st_size == 0:
        raise ImageProblem(REASON_NOT_IMAGE, f"{path.name} is an empty (zero-byte) file")
    try:
        im = Image.open(fh)
    except Image.DecompressionBombError as err:
        raise ImageProblem(REASON_TOO_LARGE, str(err)) from None
    except UnidentifiedImageError:
        raise ImageProblem(REASON_NOT_IMAGE, f"{path.name} is not a recognised image format") from None
    except Exception as err:  # noqa: BLE001 - any decoder failure is a data problem, not a crash
        raise ImageProblem(REASON_UNREADABLE, f"{type(err).__name__}: {err}") from None
    w, h = im.size
    if w * h > max_image_pixels:
        im.close()
        raise ImageProblem(
            REASON_TOO_LARGE, f"{w}x{h} = {w * h:,} px > max_image_pixels={max_image_pixels:,}"
        )
    if w < 1 or h < 1:
        im.close()
        raise ImageProblem(REASON_UNREADABLE, f"invalid size {im.size}")
    return im


def encode_image(
    path: Path, image_size: int = 512, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[bytes, tuple[int, int]]:
    """Opens `path` once, checks its header (as `probe_image`), decodes it, converts it to 8-bit grayscale,
    shrinks it so its longer side is at most `image_size` (never enlarges) and re-encodes it as PNG.

    A JPEG is decoded with `Image.draft` straight to the smallest DCT scale (1/2, 1/4, 1/8) that is still at
    least the target size, and converted to grayscale by the decoder: a 2,500 x 3,000 px radiograph built at
    512 px decodes about a sixteenth of its pixels. The final resize is the same bicubic resize as for other
    formats, from the original size's target, so the output has the same size either way.

    Returns:
        `tuple[bytes, tuple[int, int]]`: the PNG bytes and the ORIGINAL (width, height).

    Raises:
        ImageProblem: for missing, truncated, corrupt, non-image or oversized files.
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; the one open of this image
    except FileNotFoundError:
        raise ImageProblem(REASON_MISSING, str(path)) from None
    except OSError as err:
        raise ImageProblem(REASON_UNREADABLE, f"{path.name}: {type(err).__name__}: {err}") from None
    with fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_checked(fh, path, max_image_pixels) as im:
            size = im.size
            target = _target_size(size, image_size)
            try:
                if target is not None and im.format == "JPEG":
                    im.draft("L", target)
                im.load()
                gray = to_grayscale_8bit(im)
            except Exception as err:  # noqa: BLE001
                raise ImageProblem(REASON_UNREADABLE, f"{path.name}: {type(err).__name__}: {err}") from None
    if target is not None and gray.size != target:
        gray = gray.resize(target, Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    gray.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue(), size
