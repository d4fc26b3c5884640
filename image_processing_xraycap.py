"""Image processor for XrayCap: chest X-rays -> normalised 3-channel `pixel_values`.

Transformers' PIL image-processing recipe (resize the shorter side, centre-crop, rescale, normalise, as
CLIP's), with only the X-ray decoding our own: 8/16-bit, float, RGB, RGBA and palette inputs become their
8-bit luminance the way the dataset builder stored the training images (`image_decoding_xraycap.py`, which
`dataset_builder.images` imports too), files are opened only as raster formats and only up to
`MAX_IMAGE_PIXELS`, and the luminance is resized and cropped before it is expanded to three channels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

try:  # inside a package / a saved model folder (transformers' remote-code loader copies `.x` siblings)
    from .image_decoding_xraycap import (
        ImageLike,
        load_image,
        load_luminance,
        to_luminance,
    )
except ImportError:  # the repository root on sys.path (`import image_processing_xraycap`)
    from image_decoding_xraycap import (
        ImageLike,
        load_image,
        load_luminance,
        to_luminance,
    )

IMAGENET_MEAN = list(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = list(IMAGENET_DEFAULT_STD)

# The names a processor saved before it took transformers' `PILImageResampling` wrote.
RESAMPLE_NAMES = {
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
}


class XrayCapImageProcessor(PilBackend):
    r"""
    Chest X-ray image processor: the X-ray decoding ([`load_image`]), then transformers' PIL recipe: resize the
    shorter side to `size["shortest_edge"]` (the longer side rounded), centre-crop `crop_size`, rescale to
    [0, 1] and normalise with the ImageNet mean/std (what ResNet weights expect) or the vision tower's own
    ([`~XrayCapImageProcessor.from_vision_tower`]; ViTs often use 0.5). The one-band luminance is resized and
    cropped, then expanded to three equal channels: a third of the work, the same values.

    Args:
        size (`int` or `dict[str, int]`, *optional*, defaults to `{"shortest_edge": 224}`): an `int` is the
            square output side (`XrayCapConfig.image_size`): the shorter side and the crop are both set to it.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`): the output size.
        resample (`PILImageResampling` or `str`, *optional*, defaults to bicubic): `"bilinear"`, `"bicubic"`,
            `"lanczos"` or the `PILImageResampling` member.
        image_mean (`list[float]`, *optional*, defaults to ImageNet's): per-channel mean.
        image_std (`list[float]`, *optional*, defaults to ImageNet's): per-channel std.
        kwargs: the other `ImagesKwargs` (`do_resize`, `do_center_crop`, `do_normalize`, ...).
    """

    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True

    def __init__(self, **kwargs: Unpack[ImagesKwargs]):
        size = kwargs.get("size")
        if isinstance(size, dict) and "shortest_edge" not in size and "height" in size:
            size = size["height"]  # another processor's {"height", "width"}: its height is the square side
        if isinstance(
            size, int
        ):  # the square side: XrayCapConfig.image_size, and what processors saved before
            if size < 32:
                raise ValueError(f"size={size} px is too small: use at least 32.")
            kwargs["size"] = {"shortest_edge": size}
            kwargs.setdefault("crop_size", {"height": size, "width": size})
        resample = kwargs.get("resample")
        if isinstance(resample, str):
            if resample not in RESAMPLE_NAMES:
                raise ValueError(f"resample={resample!r} is not one of {sorted(RESAMPLE_NAMES)}.")
            kwargs["resample"] = RESAMPLE_NAMES[resample]
        super().__init__(**kwargs)

    @classmethod
    def from_vision_tower(
        cls, vision_model: str | os.PathLike, size: int = 224, **hub_kwargs
    ) -> XrayCapImageProcessor:
        """
        An image processor with the normalisation a pretrained vision tower was trained with: `image_mean` /
        `image_std` from its preprocessor_config.json (ViTs usually use 0.5), else the `mean` / `std` of a timm
        checkpoint's `pretrained_cfg` (config.json); ImageNet's where the tower gives neither.

        Args:
            vision_model (`str` or `os.PathLike`): the tower's Hub id or folder (`--vision_model`).
            size (`int`, *optional*, defaults to 224): output side in pixels (`XrayCapConfig.image_size`).
            **hub_kwargs: Hub access (`cache_dir`, `revision`, `token`, `local_files_only`, ...).
        """
        preprocessor = _read_json(vision_model, "preprocessor_config.json", **hub_kwargs)
        timm_cfg = _read_json(vision_model, "config.json", **hub_kwargs).get("pretrained_cfg") or {}
        normalisation = {}
        for settings, mean, std in ((preprocessor, "image_mean", "image_std"), (timm_cfg, "mean", "std")):
            if settings.get(mean) is not None and settings.get(std) is not None:
                normalisation = {"image_mean": list(settings[mean]), "image_std": list(settings[std])}
                break
        else:
            logger.info(f"{vision_model} gives no image mean/std: using ImageNet's.")
        return cls(size=size, **normalisation)

    def preprocess(
        self, images: ImageLike | Sequence[ImageLike], **kwargs: Unpack[ImagesKwargs]
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list of images: PIL images, numpy arrays, tensors, file paths or file bytes.
            kwargs: `ImagesKwargs` overriding the processor's settings for this call; `return_tensors` defaults
                to `"pt"`.

        Returns:
            `BatchFeature` with `pixel_values` of shape `(num_images, 3, crop height, crop width)`.
        """
        kwargs.setdefault("return_tensors", "pt")
        return super().preprocess(images, **kwargs)

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[ImageLike]:
        """A flat list of images. Paths and bytes stay as they are (`process_image` opens them, checked): never
        fetched as URLs or opened unchecked."""
        if (
            isinstance(images, np.ndarray | torch.Tensor)
            and images.ndim == 4
            and images.shape[-1] not in (3, 4)
        ):
            return list(images)  # a stacked batch of channels-first images
        return list(images) if isinstance(images, list | tuple) else [images]

    def process_image(self, image: ImageLike, **kwargs) -> np.ndarray:
        """The X-ray decoding: any accepted input -> its 8-bit luminance, a `(1, height, width)` uint8 array."""
        return np.asarray(load_luminance(image))[None]

    def resize(
        self, image: np.ndarray, size: SizeDict, resample: PILImageResampling | None = None, **kwargs
    ) -> np.ndarray:
        """The shorter side to `size.shortest_edge`, the longer side ROUNDED to keep the aspect ratio (transformers
        truncates it; the trained models saw it rounded). Other sizes resize as transformers does."""
        if not size.shortest_edge or size.longest_edge:
            return super().resize(image, size, resample=resample, **kwargs)
        side, (height, width) = size.shortest_edge, image.shape[-2:]
        scale = side / min(width, height)
        target = SizeDict(height=max(side, round(height * scale)), width=max(side, round(width * scale)))
        return super().resize(image, target, resample=resample, **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | None,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float] | None,
        image_std: float | Sequence[float] | None,
        return_tensors: str | None,
        **kwargs,
    ) -> BatchFeature:
        """`PilBackend`'s resize -> crop -> rescale -> normalise, with the luminance expanded to three channels
        after the crop."""
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size, resample=resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            image = np.repeat(image, 3, axis=0)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


def _read_json(path_or_repo: str | os.PathLike, filename: str, **hub_kwargs) -> dict[str, Any]:
    """A JSON file of a Hub repo or folder as a dict; empty when it has no such file or the Hub is unreachable."""
    path = cached_file(
        path_or_repo,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    if path is None:
        return {}
    with open(path, encoding="utf-8") as file:
        return json.load(file)


# Saved folders carry this file and load with AutoImageProcessor.from_pretrained(dir, trust_remote_code=True).
XrayCapImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["XrayCapImageProcessor", "load_image", "to_luminance"]
