"""The options of a build: `ChestXrayConfig`, the `datasets.BuilderConfig` of `ChestXrayBuilder` (any
`data_format`; `IndianaXrayConfig` is its earlier name).

Every option is part of the cache key, so two builds with the same inputs and options share one cache entry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import datasets

from .formats import DEFAULT_FORMAT, get_format
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .text_cleaning import XXXX_MODES

SECTIONS = ("findings", "impression", "findings+impression")
VIEWS = ("frontal", "pair", "all")


@dataclass
class ChestXrayConfig(datasets.BuilderConfig):
    """Options of the builder (all part of the cache key).

    Args:
        data_dir (`str`, *optional*): the folder in the layout of `data_format` (required to build).
        data_format (`str`, defaults to "indiana"): the layout: "indiana" (the Kaggle copy) or "mimic-cxr"
            (MIMIC-CXR-JPG; see `formats.py`).
        reports_dir (`str`, *optional*): mimic-cxr only: the folder holding the reports' `files/` tree
            (default: `data_dir`).
        section (`str`, defaults to "findings"): the `report` target: "findings", "impression" or
            "findings+impression" (joined with a space; skipped only when both are empty).
        views (`str`, defaults to "pair"): "frontal" (the first frontal view), "pair" (the first frontal
            and the first lateral; a study with one of them keeps one) or "all" (every usable image).
        min_images (`int`, defaults to 1): studies with fewer usable images (before view selection) are
            skipped. `r2gen=True` raises it to 2.
        image_size (`int`, defaults to 512): re-encoded images have their longer side at most this.
        seed (`int`, defaults to 42): seed of the study-level split permutation (mimic-cxr uses its official
            split and ignores it).
        r2gen (`bool`, defaults to False): indiana only: the R2Gen population (findings only, >= 2 images) and
            70/10/20.
        split_file (`str`, *optional*): indiana only: an R2Gen `annotation.json` giving the split membership.
        xxxx (`str`, defaults to "keep"): anonymisation tokens in `report` (Indiana's `XXXX`, MIMIC's `___`):
            "keep", "drop" or "marker".
        max_image_pixels (`int`, defaults to 50,000,000): larger images are skipped (decompression bombs).
        fingerprint (`str`, defaults to ""): hash of the inputs, set by `build_dataset`.
    """

    data_dir: str | None = None
    data_format: str = DEFAULT_FORMAT
    reports_dir: str | None = None
    section: str = "findings"
    views: str = "pair"
    min_images: int = 1
    image_size: int = 512
    seed: int = 42
    r2gen: bool = False
    split_file: str | None = None
    xxxx: str = "keep"
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    fingerprint: str = ""

    def __post_init__(self):
        super().__post_init__()
        self.validate()

    def validate(self) -> None:
        """Checks the options and applies `r2gen` (section findings, min_images >= 2).

        `datasets` sets config keyword arguments with `setattr` after construction, so the builder calls this
        again before building.

        Raises:
            ValueError: naming the bad option, its value and the accepted values, or an option that does not
                apply to `data_format`.
        """
        data_format = get_format(self.data_format)
        for option, why in data_format.unsupported_options.items():
            if getattr(self, option):
                raise ValueError(
                    f"{option}={getattr(self, option)!r} (--{option}) does not apply to "
                    f"data_format={self.data_format!r} (--format {self.data_format}): {why}. Drop --{option}."
                )
        if self.section not in SECTIONS:
            raise ValueError(f"section must be one of {SECTIONS}, got {self.section!r}")
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {self.views!r}")
        if self.xxxx not in XXXX_MODES:
            raise ValueError(f"xxxx must be one of {XXXX_MODES}, got {self.xxxx!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 px, got {self.image_size}")
        if self.min_images < 0:
            raise ValueError(f"min_images must be >= 0, got {self.min_images}")
        if self.r2gen:
            if self.section != "findings":
                raise ValueError(
                    f"r2gen=True reproduces the findings-only protocol; got section={self.section!r} "
                    "(drop --r2gen or use --section findings)"
                )
            self.min_images = max(self.min_images, 2)

    def options(self) -> dict:
        """The build options as plain JSON values (for the build report), without name, data_dir or
        fingerprint."""
        skip = ("name", "version", "data_files", "description", "data_dir", "fingerprint")
        plain = (int, float, str, bool, type(None))
        return {
            key: value if isinstance(value, plain) else str(value)
            for key, value in asdict(self).items()
            if key not in skip
        }


IndianaXrayConfig = ChestXrayConfig  # the name from before other formats
