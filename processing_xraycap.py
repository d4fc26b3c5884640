"""XrayCap preprocessing: chest X-ray images -> normalised 3-channel tensors; reports -> GPT-2 tokens + labels.

`XrayCapImageProcessor` turns any PIL image, numpy array or file path (8/16-bit grayscale, RGB, RGBA,
palette) into a normalised `(3, size, size)` tensor (ImageNet's mean/std, or the vision tower's own). `XrayCapProcessor` pairs it with a GPT-2
byte-level BPE tokenizer and builds `bos + report + eos` inputs and labels. `train_tokenizer` trains such
a tokenizer locally (no Hub access needed).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import GPT2TokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ImagesKwargs, ProcessorMixin
from transformers.utils import cached_file, logging

logger = logging.get_logger(__name__)

# What `from_pretrained` hands to the Hub file lookups (the rest are processor settings).
_HUB_KWARGS = frozenset(
    ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
)
# The model's loading options, which pipeline() hands to the processor too; a processor has no use for them.
_LOADER_KWARGS = ("dtype", "torch_dtype", "device_map", "device")
# The saved settings `from_pretrained` reads from processor_config.json (and takes as overrides).
_PROCESSOR_SETTINGS = ("max_views", "max_length")

# The raster formats an X-ray arrives in; anything else (EPS, which runs Ghostscript; PDF; ...) is refused.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# Pixels per image at most: the dataset builder's cap (dataset_builder.images.DEFAULT_MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 50_000_000

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes


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


def _to_luminance(image: Image.Image) -> Image.Image:
    """Any PIL mode (1, L, LA, P, I;16, I, F, RGB, RGBA, CMYK, ...) -> its 8-bit luminance ("L").

    The same conversion as the dataset builder (`dataset_builder.images.to_grayscale_8bit`, which stores
    every training image as 8-bit grayscale "L"): high-bit-depth images are scaled from their own min-max
    range, transparency is composited on black, colour becomes luminance. So an RGB copy and an "L" copy of
    one film give the same tensor, as they did in training.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if high <= low:
            gray = np.zeros(array.shape, dtype=np.uint8)
        else:
            gray = np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)
        image = Image.fromarray(gray)
    elif image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # X-ray background is black
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "L" else image.convert("L")


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
    return _load_luminance(path_or_image).convert("RGB")


def _load_luminance(path_or_image: ImageLike) -> Image.Image:
    """[`load_image`] before the expansion to three channels: the 8-bit luminance ("L")."""
    if isinstance(path_or_image, Image.Image):
        _check_pixels(path_or_image.size, "image")
        return _to_luminance(path_or_image)
    if isinstance(path_or_image, torch.Tensor):
        return _to_luminance(_array_to_pil(path_or_image.detach().cpu().numpy(), "tensor"))
    if isinstance(path_or_image, np.ndarray):
        return _to_luminance(_array_to_pil(path_or_image))
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
                _check_pixels(image.size, name)
                image.load()
                return _to_luminance(image)
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


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse an image over `MAX_IMAGE_PIXELS` (read from its header, before any pixel is decoded)."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: "
            "downscale it (the training images were at most that size too)."
        )


class XrayCapImageProcessor(ImageProcessingMixin):
    r"""
    Chest X-ray image preprocessing: to RGB, resize the shorter side to `size`, centre-crop `size` x `size`,
    scale to [0, 1] and normalise with the ImageNet mean/std (what ResNet weights expect), or the vision tower's
    own ([`~XrayCapImageProcessor.from_vision_tower`]; ViTs often use 0.5).

    Args:
        size (`int`, *optional*, defaults to 224): output side in pixels (`XrayCapConfig.image_size`).
        image_mean (`list[float]`, *optional*, defaults to ImageNet's): per-channel mean.
        image_std (`list[float]`, *optional*, defaults to ImageNet's): per-channel std.
        resample (`str`, *optional*, defaults to `"bicubic"`): `"bilinear"`, `"bicubic"` or `"lanczos"`.
    """

    model_input_names = ["pixel_values"]
    # Read by AutoProcessor / pipeline() when they pass loading options (dtype=...).
    valid_kwargs = ImagesKwargs
    _RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}

    def __init__(
        self,
        size: int = 224,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        resample: str = "bicubic",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(size, dict):  # {"height": h, "width": w} / {"shortest_edge": s} from other processors
            size = size.get("shortest_edge") or size.get("height")
        if int(size) < 32:
            raise ValueError(f"size={size} px is too small: use at least 32.")
        if resample not in self._RESAMPLE:
            raise ValueError(f"resample={resample!r} is not one of {sorted(self._RESAMPLE)}.")
        self.size = int(size)
        self.image_mean = list(image_mean) if image_mean is not None else list(IMAGENET_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(IMAGENET_STD)
        self.resample = resample

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
                normalisation = {"image_mean": settings[mean], "image_std": settings[std]}
                break
        else:
            logger.info(f"{vision_model} gives no image mean/std: using ImageNet's.")
        return cls(size=size, **normalisation)

    def process_image(self, image: ImageLike) -> torch.Tensor:
        """One image (anything `load_image` reads) -> a normalised `(3, size, size)` float32 tensor.

        The luminance is resized and cropped, then expanded to three channels: a third of the work of resizing
        three equal channels, with the same values."""
        image = _load_luminance(image)
        width, height = image.size
        scale = self.size / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self._RESAMPLE[self.resample])
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None].expand(3, -1, -1)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (array - mean) / std

    def __call__(self, images: ImageLike | Sequence[ImageLike], return_tensors: str | None = "pt", **kwargs):
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(
        self, images: ImageLike | Sequence[ImageLike], return_tensors: str | None = "pt", **kwargs
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list of images.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"`, `"np"` or None (lists).

        Returns:
            `BatchFeature` with `pixel_values` of shape `(num_images, 3, size, size)`.
        """
        if kwargs:
            logger.warning("XrayCapImageProcessor ignores arguments %s.", sorted(kwargs))
        if not isinstance(images, list | tuple):
            images = [images]
        pixel_values = torch.stack([self.process_image(image) for image in images])
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=None).convert_to_tensors(
            return_tensors
        )


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


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> GPT2TokenizerFast:
    """
    Train a GPT-2-style byte-level BPE tokenizer on local texts (no Hub access needed).

    Args:
        texts (`Iterable[str]`): training corpus (e.g. the training reports).
        vocab_size (`int`, *optional*, defaults to 2000): target vocabulary size, special tokens included.

    Returns:
        `GPT2TokenizerFast` with bos = eos = unk = `<|endoftext|>` (id 0) and pad = `<|pad|>` (id 1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 256 + 2 tokens."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((str(text) for text in texts), trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return GPT2TokenizerFast(
        vocab=state["vocab"],
        merges=merges,
        unk_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=PAD,
    )


class XrayCapProcessor(ProcessorMixin):
    r"""
    Images + reports -> model inputs, and generated ids -> text.

    Args:
        image_processor ([`XrayCapImageProcessor`]): the image pipeline.
        tokenizer (`GPT2TokenizerFast`): byte-level BPE with bos/eos and a pad token distinct from eos.
        max_views (`int`, *optional*, defaults to 2): views per study; `pixel_values` is padded to it.
        max_length (`int`, *optional*): longest `bos + report + eos` in tokens. Longer reports are
            TRUNCATED with a warning (the eos is kept). Set it to `n_positions - image prefix length` so a
            sequence always fits the decoder (the model raises a ValueError otherwise).
    """

    def __init__(
        self, image_processor, tokenizer, max_views: int = 2, max_length: int | None = None, **kwargs
    ):
        super().__init__(image_processor, tokenizer, **kwargs)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError(
                f"The tokenizer's pad token ({tokenizer.pad_token!r}) must exist and differ from eos "
                f"({tokenizer.eos_token!r}): use train_tokenizer or XrayCapProcessor.from_tokenizer."
            )
        if max_views not in (1, 2):
            raise ValueError(f"max_views={max_views!r}: use 1 or 2.")
        self.max_views = int(max_views)
        self.max_length = None if max_length is None else int(max_length)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: GPT2TokenizerFast | str = "gpt2",
        image_size: int = 224,
        max_views: int = 2,
        max_length: int | None = None,
        vision_model: str | os.PathLike | None = None,
    ) -> XrayCapProcessor:
        """
        Build a processor around a GPT-2 tokenizer (object, Hub id or folder), adding `<|pad|>` if it has no
        pad token (GPT-2's pad then gets id 50257, as `from_pretrained_towers` expects).

        Args:
            tokenizer (`GPT2TokenizerFast` or `str`, *optional*, defaults to `"gpt2"`): the tokenizer.
            image_size (`int`, *optional*, defaults to 224): `XrayCapConfig.image_size`.
            max_views (`int`, *optional*, defaults to 2): `XrayCapConfig.max_views`.
            max_length (`int`, *optional*): see the class docstring.
            vision_model (`str` or `os.PathLike`, *optional*): the pretrained vision tower (Hub id or folder);
                its image mean/std are used (see `XrayCapImageProcessor.from_vision_tower`). Default: ImageNet's.
        """
        if isinstance(tokenizer, str | os.PathLike):
            tokenizer = GPT2TokenizerFast.from_pretrained(tokenizer)
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            tokenizer.add_special_tokens({"pad_token": PAD})
        if vision_model is None:
            image_processor = XrayCapImageProcessor(size=image_size)
        else:
            image_processor = XrayCapImageProcessor.from_vision_tower(vision_model, size=image_size)
        return cls(image_processor, tokenizer, max_views=max_views, max_length=max_length)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> XrayCapProcessor:
        """
        Load a saved processor: the image processor and tokenizer with their own classes, so
        `XrayCapProcessor.from_pretrained(dir)` works without `trust_remote_code` (AutoProcessor with
        `trust_remote_code=True` ends here too). `ProcessorMixin.from_pretrained` is not used: from transformers
        5.25 it resolves the image processor through AutoImageProcessor, which asks for `trust_remote_code`.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or Hub id with `processor_config.json`.
            kwargs: Hub access (`cache_dir`, `revision`, `token`, `local_files_only`, `subfolder`, ...) and
                overrides of the saved `max_views` / `max_length`; anything else is ignored with a warning.
        """
        for ignored in (
            *_LOADER_KWARGS,
            "trust_remote_code",
            "code_revision",
            "_from_auto",
            "_from_pipeline",
        ):
            kwargs.pop(ignored, None)
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        processor_dict, _ = cls.get_processor_dict(pretrained_model_name_or_path, **hub)
        image_processor, tokenizer = cls._load_parts(pretrained_model_name_or_path, processor_dict, **hub)
        settings = {**processor_dict, **kwargs}
        init = {k: settings[k] for k in _PROCESSOR_SETTINGS if k in settings}
        # ProcessorMixin ignores what it does not use; so do we, naming it.
        unused = {k: v for k, v in kwargs.items() if k not in _PROCESSOR_SETTINGS}
        if unused and not return_unused_kwargs:
            logger.warning(
                f"XrayCapProcessor.from_pretrained ignores {sorted(unused)}: it takes Hub arguments "
                f"{sorted(_HUB_KWARGS)} and {list(_PROCESSOR_SETTINGS)}."
            )
        processor = cls(image_processor, tokenizer, **init)
        return (processor, unused) if return_unused_kwargs else processor

    @staticmethod
    def _load_parts(
        pretrained_model_name_or_path: str | os.PathLike, processor_dict: dict[str, Any], **hub
    ) -> tuple[XrayCapImageProcessor, GPT2TokenizerFast]:
        """The image processor (from the processor config's `image_processor` entry, or its own file) and the
        tokenizer of a saved processor."""
        config = processor_dict.get("image_processor")
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in ("auto_map", "image_processor_type")}
            image_processor = XrayCapImageProcessor(**config)
        else:
            image_processor = XrayCapImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub)
        tokenizer = GPT2TokenizerFast.from_pretrained(pretrained_model_name_or_path, **hub)
        return image_processor, tokenizer

    # ----------------------------------------------------------------------------------------- images
    def _studies(self, images: Any) -> list[list[ImageLike]]:
        """Normalise `images` to a list of studies, each a list of views."""
        if (
            isinstance(images, np.ndarray | torch.Tensor)
            and images.ndim == 4
            and images.shape[-1] not in (3, 4)
        ):
            images = list(images)  # a stacked batch of single images
        if not isinstance(images, list | tuple):
            return [[images]]
        studies = []
        for study in images:
            views = list(study) if isinstance(study, list | tuple) else [study]
            if not views:
                raise ValueError("A study in `images` has no views: give each study at least one image.")
            if len(views) > self.max_views:
                raise ValueError(
                    f"A study has {len(views)} views but the processor takes at most max_views={self.max_views}:"
                    " keep the frontal (and one lateral) view."
                )
            studies.append(views)
        return studies

    def _process_studies(self, images: Any) -> dict[str, torch.Tensor]:
        studies = self._studies(images)
        size = self.image_processor.size
        pixel_values = torch.zeros(len(studies), self.max_views, 3, size, size)
        view_mask = torch.zeros(len(studies), self.max_views, dtype=torch.long)
        for i, views in enumerate(studies):
            for j, view in enumerate(views):
                pixel_values[i, j] = self.image_processor.process_image(view)
                view_mask[i, j] = 1
        if self.max_views == 1:
            pixel_values = pixel_values[:, 0]  # (batch, 3, size, size): the natural single-view layout
        return {"pixel_values": pixel_values, "view_mask": view_mask}

    # ----------------------------------------------------------------------------------------- text
    def _encode_text(self, text: str | Sequence[str], max_length: int | None) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"text must be a string or a list of strings, got a {type(t).__name__}.")
        tok = self.tokenizer
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        rows = []
        truncated = 0
        for body in tok(texts, add_special_tokens=False)["input_ids"]:
            ids = [bos, *body, eos]
            if max_length is not None and len(ids) > max_length:
                ids = ids[: max_length - 1] + [eos]
                truncated += 1
            rows.append(ids)
        if truncated:
            logger.warning(
                "%d of %d reports were longer than max_length=%d tokens and were truncated.",
                truncated,
                len(rows),
                max_length,
            )
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, 0] = -100  # bos is the prompt, never a target
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images (*optional*): one image, a list of images (one per study), or a list of lists of views per
                study (frontal first). An image is a PIL image, a numpy array, a tensor or a file path.
            text (`str` or `list[str]`, *optional*): reports, one per study.
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.
            max_length (`int`, *optional*): overrides `self.max_length` (truncate with a warning).

        Returns:
            `BatchFeature` with `pixel_values` `(batch, max_views, 3, size, size)` (`(batch, 3, size, size)`
            when `max_views=1`) and `view_mask` `(batch, max_views)` (1 = real view) when images are given; `input_ids` (`bos + report + eos`,
            right-padded with the pad id), `attention_mask` and `labels` (-100 on padding and on the bos)
            when text is given.
        """
        if kwargs:
            logger.warning("XrayCapProcessor ignores arguments %s.", sorted(kwargs))
        if images is None and text is None:
            raise ValueError("Pass images, text, or both.")
        data: dict[str, torch.Tensor] = {}
        if images is not None:
            data.update(self._process_studies(images))
        if text is not None:
            data.update(self._encode_text(text, max_length if max_length is not None else self.max_length))
        if images is not None and text is not None and len(data["pixel_values"]) != len(data["input_ids"]):
            raise ValueError(
                f"{len(data['pixel_values'])} studies of images but {len(data['input_ids'])} texts: pass one "
                "report per study."
            )
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """
        Token ids (e.g. `model.generate(...)`) -> stripped report strings.

        Args:
            sequences (`torch.Tensor` or `list[list[int]]`): ids, one row per report.
            skip_special_tokens (`bool`, *optional*, defaults to `True`): drop bos/eos/pad.
        """
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [t.strip() for t in texts]

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """One row of ids -> a stripped report string."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).strip()

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "view_mask", "input_ids", "attention_mask"]


# Saved folders carry this file and load with AutoProcessor.from_pretrained(dir, trust_remote_code=True).
XrayCapImageProcessor.register_for_auto_class("AutoImageProcessor")
XrayCapProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["XrayCapImageProcessor", "XrayCapProcessor", "load_image", "train_tokenizer"]
