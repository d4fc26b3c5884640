"""XrayCap processor: studies of chest X-ray views -> `pixel_values` + `view_mask`; reports -> GPT-2 tokens + labels.

`XrayCapProcessor` pairs the image processor (`image_processing_xraycap.XrayCapImageProcessor`) with a GPT-2
byte-level BPE tokenizer and builds `bos + report + eos` inputs and labels. `train_tokenizer` trains such
a tokenizer locally (no Hub access needed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from transformers import GPT2TokenizerFast
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

try:  # inside a package / a saved model folder (transformers' remote-code loader copies `.x` siblings)
    from .image_decoding_xraycap import MAX_IMAGE_PIXELS, ImageLike, load_image
    from .image_processing_xraycap import IMAGENET_MEAN, IMAGENET_STD, XrayCapImageProcessor
except ImportError:  # the repository root on sys.path (`import processing_xraycap`)
    from image_decoding_xraycap import MAX_IMAGE_PIXELS, ImageLike, load_image
    from image_processing_xraycap import IMAGENET_MEAN, IMAGENET_STD, XrayCapImageProcessor

logger = logging.get_logger(__name__)

# What `from_pretrained` hands to the Hub file lookups (the rest are processor settings).
_HUB_KWARGS = frozenset(
    ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
)
# The model's loading options, which pipeline() hands to the processor too; a processor has no use for them.
_LOADER_KWARGS = ("dtype", "torch_dtype", "device_map", "device")
# The saved settings `from_pretrained` reads from processor_config.json (and takes as overrides).
_PROCESSOR_SETTINGS = ("max_views", "max_length")

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"


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
        views = self.image_processor([view for study in studies for view in study], return_tensors="pt")
        crop = views["pixel_values"].shape[-2:]
        pixel_values = torch.zeros(len(studies), self.max_views, 3, *crop)
        view_mask = torch.zeros(len(studies), self.max_views, dtype=torch.long)
        flat = iter(views["pixel_values"])
        for i, study in enumerate(studies):
            for j in range(len(study)):
                pixel_values[i, j] = next(flat)
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
XrayCapProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "XrayCapImageProcessor",
    "XrayCapProcessor",
    "load_image",
    "train_tokenizer",
]
