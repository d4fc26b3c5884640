"""The transformers pipeline for XrayCap: `pipeline("image-to-text", model=dir, trust_remote_code=True)`.

transformers 5 removed the built-in "image-to-text" task: `pipeline("image-to-text", ...)` is redirected
to "image-text-to-text", a pipeline for `AutoModelForImageTextToText` chat models (a prompt, a chat
template, the prompt's tokens stripped from the output). XrayCap is registered for that Auto class, so it
loads there too and writes the same report from an empty prompt (`text=""`), one image at a time; studies
(several views each) need this pipeline. transformers keeps the custom-pipeline route: a model folder whose
`config.json` holds

    "custom_pipelines": {"image-to-text": {"impl": "pipeline_xraycap.XrayCapImageToTextPipeline",
                                           "pt": ["AutoModel"], "type": "multimodal"}}

and which holds this file makes `pipeline("image-to-text", model=dir, trust_remote_code=True)` (and
`pipeline(model=dir, trust_remote_code=True)`) build the class below; custom tasks are looked up before
the built-in ones, so the redirect never happens. `add_pipeline_to_folder(dir)` writes both.

This file travels alone with the model folder (the remote-code loader copies it into its module cache):
it imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import torch
from transformers import Pipeline
from transformers.utils import logging

logger = logging.get_logger(__name__)

PIPELINE_TASK = "image-to-text"
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {
        "impl": "pipeline_xraycap.XrayCapImageToTextPipeline",
        "pt": ["AutoModel"],
        "type": "multimodal",
    }
}

# An image URL is fetched with this timeout (seconds) unless the call passes `timeout=`, and at most this
# many bytes are read from it.
URL_TIMEOUT_S = 30.0
URL_MAX_BYTES = 200_000_000

__all__ = [
    "XrayCapImageToTextPipeline",
    "add_pipeline_to_folder",
    "fetch_image_bytes",
    "CUSTOM_PIPELINES",
    "PIPELINE_TASK",
]


def fetch_image_bytes(url: str, timeout: float = URL_TIMEOUT_S) -> bytes:
    """
    The encoded bytes of an image URL, for the processor to decode as it decodes files (16-bit kept).

    Args:
        url (`str`): an http(s) URL.
        timeout (`float`, *optional*, defaults to `URL_TIMEOUT_S`): seconds to wait for the server.

    Raises:
        `ValueError` naming the URL when it sends more than `URL_MAX_BYTES`.
    """
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only, checked by caller
        data = response.read(URL_MAX_BYTES + 1)
    if len(data) > URL_MAX_BYTES:
        raise ValueError(f"{url} sent more than {URL_MAX_BYTES:,} bytes: download and downscale it first.")
    return data


def _views_of(item: Any) -> list[Any]:
    """One study -> its list of views (frontal first)."""
    if isinstance(item, dict):
        if "images" in item:
            views = list(item["images"])
        elif "frontal" in item:
            views = [item["frontal"]] + ([item["lateral"]] if item.get("lateral") is not None else [])
        else:
            raise ValueError(
                f"A study dict needs 'frontal' (and optionally 'lateral') or 'images', got keys {sorted(item)}."
            )
        if not views:
            raise ValueError("A study dict holds no image.")
        return views
    if isinstance(item, tuple):  # (frontal, lateral): a tuple is one study, a list is a batch
        return [view for view in item if view is not None]
    return [item]


class XrayCapImageToTextPipeline(Pipeline):
    """
    Chest X-ray -> radiology report.

    Inputs: an image (PIL image, numpy array, local path or http(s) URL, fetched with `timeout=` seconds,
    default `URL_TIMEOUT_S`), a study `{"frontal": img, "lateral": img}`
    (lateral optional) or a `(frontal, lateral)` tuple, or a list of those (a batch; `batch_size=` groups
    them for the model). Every `generate()` keyword (`num_beams`, `max_new_tokens`, `do_sample`,
    `no_repeat_ngram_size`, `num_return_sequences`, ...) passes through, at construction or per call, or
    as `generate_kwargs={...}`.

    Returns, per input, a list of `{"generated_text": report}` (one per returned sequence), the same text
    as `processor.batch_decode(model.generate(**processor(images=...)), skip_special_tokens=True)`.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-to-text", model="outputs/xraycap-demo", trust_remote_code=True)
    >>> captioner("chest.png", num_beams=3)
    [{'generated_text': 'The heart is enlarged. No pneumothorax or pleural effusion.'}]
    >>> captioner({"frontal": "frontal.png", "lateral": "lateral.png"})
    ```
    """

    # Optional for transformers' loader; when it loads none (a model object without a folder, or a folder
    # saved before XrayCapProcessor dropped pipeline kwargs such as `dtype`), __init__ loads it from the model.
    _load_processor = None
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(
        self, *args: Any, trust_remote_code: bool | None = None, revision: str | None = None, **kwargs: Any
    ):
        """
        Args:
            trust_remote_code (`bool`, *optional*):
                Whether the processor, when it has to be loaded here, may run its folder's code. Defaults to what
                the caller already allowed for the model: true only when the model's own class was loaded as
                remote code (`pipeline(..., trust_remote_code=True)`).
            revision (`str`, *optional*):
                The Hub commit of that processor; defaults to the commit the model was loaded from.
        """
        super().__init__(*args, **kwargs)
        if self.processor is None:
            source = getattr(self.model, "name_or_path", None) or getattr(
                self.model.config, "_name_or_path", None
            )
            if not source:
                raise ValueError(
                    "XrayCapImageToTextPipeline needs the model's processor: pass processor=XrayCapProcessor(...)."
                )
            from transformers import AutoProcessor

            if trust_remote_code is None:
                trust_remote_code = type(self.model).__module__.startswith("transformers_modules.")
            revision = revision or getattr(self.model.config, "_commit_hash", None)
            self.processor = AutoProcessor.from_pretrained(
                source, trust_remote_code=trust_remote_code, revision=revision
            )
        if self.tokenizer is None:
            self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.image_processor is None:
            self.image_processor = getattr(self.processor, "image_processor", None)

    def _sanitize_parameters(
        self,
        max_new_tokens: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
        skip_special_tokens: bool | None = None,
        **kwargs: Any,
    ):
        preprocess_params: dict[str, Any] = {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        forward_generate = dict(generate_kwargs or {})
        # Any other keyword is a generation parameter (num_beams, do_sample, ...).
        forward_generate.update(kwargs)
        if max_new_tokens is not None:
            if "max_new_tokens" in forward_generate:
                raise ValueError(
                    "max_new_tokens is given twice (directly and in generate_kwargs): give it once."
                )
            forward_generate["max_new_tokens"] = max_new_tokens
        forward_params = {"generate_kwargs": forward_generate} if forward_generate else {}
        postprocess_params = {}
        if skip_special_tokens is not None:
            postprocess_params["skip_special_tokens"] = skip_special_tokens
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, inputs: Any, timeout: float | None = None) -> dict[str, torch.Tensor]:
        views = _views_of(inputs)
        loaded = []
        for view in views:
            if isinstance(view, str) and view.startswith(("http://", "https://")):
                view = fetch_image_bytes(view, URL_TIMEOUT_S if timeout is None else timeout)
            loaded.append(view)
        encoded = self.processor(images=[loaded], return_tensors="pt")
        model_inputs = {"pixel_values": encoded["pixel_values"].to(self.dtype or torch.float32)}
        if encoded.get("view_mask") is not None:
            model_inputs["view_mask"] = encoded["view_mask"]
        return model_inputs

    def _forward(self, model_inputs: dict[str, torch.Tensor], generate_kwargs: dict[str, Any] | None = None):
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        batch_size = model_inputs["pixel_values"].shape[0]
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        if isinstance(generated, torch.Tensor) and generated.ndim == 2 and generated.shape[0] > batch_size:
            # num_return_sequences > 1: keep the candidates of one study together when un-batching.
            generated = generated.reshape(batch_size, -1, generated.shape[-1])
        return {"generated_ids": generated}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], skip_special_tokens: bool = True):
        ids = model_outputs["generated_ids"]
        ids = ids.reshape(-1, ids.shape[-1])
        texts = self.processor.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        return [{"generated_text": text.strip()} for text in texts]


def add_pipeline_to_folder(save_directory: str | Path) -> Path:
    """
    Make a saved XrayCap folder answer `pipeline("image-to-text", model=save_directory, trust_remote_code=True)`.

    Copies this file into the folder and writes `custom_pipelines` into its `config.json`. Call it after
    `model.save_pretrained(save_directory)` and `processor.save_pretrained(save_directory)`.

    Args:
        save_directory (`str` or `Path`):
            A folder written by `save_pretrained` (it must hold `config.json`).

    Returns:
        `Path`: the copied pipeline file.
    """
    save_directory = Path(save_directory)
    config_file = save_directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: call model.save_pretrained({str(save_directory)!r}) before add_pipeline_to_folder."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["custom_pipelines"] = json.loads(json.dumps(CUSTOM_PIPELINES))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    target = save_directory / Path(__file__).name
    if Path(__file__).resolve() != target.resolve():
        shutil.copyfile(__file__, target)
    logger.info("Registered the %r pipeline in %s", PIPELINE_TASK, save_directory)
    return target
