"""Which model `--model` names, how to load it, and what its card says about its training data.

Shared by the two ways of using a trained model, `xraycap.caption` (the command line) and `app.py` (the demo):
both take `--model` / `--trust_remote_code` / `--revision` (`add_model_arguments`) and both caption through
the pipeline that ships in the model folder (`load_pipeline`, the `pipeline_xraycap.py` a saved folder
carries), so a report from either is the text `pipeline("image-to-text", model=..., trust_remote_code=True)`
writes.

A name is a local folder, or, only when the user allows it with `trust_remote_code`, a Hub repo id whose
Python code is downloaded and run; `revision` (a commit sha) pins that code. A name that looks like a path
and does not exist is an error, never a download. A model card (`README.md`) whose model-index names the
synthetic phantom dataset marks a model whose reports describe phantoms only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pipeline_xraycap import PIPELINE_TASK
from xraycap.training.model_card import SYNTHETIC_DATASET

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "outputs/xraycap-demo"
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PHANTOM_WARNING = (
    "This model was trained on synthetic phantom images only: its reports describe synthetic phantoms, "
    "not real radiographs. Do not read them as findings about a real film."
)


class ModelSourceError(ValueError):
    """`--model` names a Hub repo without permission to run its code, mixes a folder with a revision, or names a
    folder that declares no image-to-text pipeline."""


def _looks_local(name: str) -> bool:
    """A name meant as a folder: a path form no Hub id has, the default folder, or under an existing folder."""
    if name == DEFAULT_MODEL or name.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in name):
        return True
    if HUB_REPO_ID.fullmatch(name) is None:  # more than one '/', spaces, ...: not a Hub repo id
        return True
    return Path(name.split("/")[0]).is_dir()  # outputs/xraycap-iu where ./outputs exists


def resolve_model_source(
    model: str, trust_remote_code: bool = False, revision: str | None = None
) -> tuple[str, dict[str, Any]]:
    """
    Decide what `--model` names and how to load it, before anything is downloaded or run.

    Args:
        model (`str`): a saved model folder or a Hub repo id.
        trust_remote_code (`bool`, *optional*, defaults to `False`): the user allows a Hub repo's code to run.
        revision (`str`, *optional*): the Hub commit (sha, tag or branch) to load.

    Returns:
        `(name_or_path, from_pretrained keyword arguments)`.

    Raises:
        `FileNotFoundError`: `model` looks like a local path and does not exist.
        `ModelSourceError`: a Hub repo id without `trust_remote_code`, or `revision` with a local folder.
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise ModelSourceError(
                f"--revision {revision} applies to Hub repo ids; {model} is a local folder."
            )
        return str(folder), {"trust_remote_code": True}  # the folder's own code files, chosen by the user
    if _looks_local(model):
        raise FileNotFoundError(
            f"model folder {model} not found (looked in {folder.resolve()}): train one with "
            f"`python run_captioning.py` (writes {DEFAULT_MODEL}), or pass --model DIR (check the working folder)."
        )
    if not trust_remote_code:
        raise ModelSourceError(
            f"--model {model} is not a local folder. As a Hub repo id its model code would be downloaded "
            "and run on this machine: pass --trust_remote_code to allow that, with --revision <commit sha> to "
            "pin the code you reviewed (or fix the path if you meant a local folder)."
        )
    if revision is None:
        logger.warning(
            "Loading %s's code from the Hub unpinned: pass --revision <commit sha> to run a reviewed commit.",
            model,
        )
    return model, {"trust_remote_code": True, "revision": revision}


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """
    Add `--model`, `--trust_remote_code` and `--revision`, worded alike for the command line and the demo.

    Args:
        parser (`argparse.ArgumentParser`): the parser to extend.
        default (`str`, *optional*, defaults to `DEFAULT_MODEL`): `--model`'s default (None: the caller
            falls back on its own source, e.g. an environment variable).
    """
    parser.add_argument(
        "--model",
        default=default,
        help=f"Saved XrayCap folder, or a Hub repo id with --trust_remote_code (default: {default or DEFAULT_MODEL}).",
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Allow --model to be a Hub repo id: its Python code is downloaded and run here.",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="Hub commit sha (or tag/branch) to load: pinning a reviewed commit is the safe way to run Hub code.",
    )


def load_pipeline(
    model: str,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **model_kwargs: Any,
):
    """
    The model's own image-to-text pipeline (`pipeline_xraycap.XrayCapImageToTextPipeline`, as the folder
    ships it), its model in eval mode on `device`.

    Args:
        model (`str`): a saved model folder or Hub repo id; see `resolve_model_source`.
        device (`str`, *optional*): torch device (default: the pipeline's, the first GPU when there is one,
            else cpu).
        trust_remote_code (`bool`, *optional*, defaults to `False`): the user allows a Hub repo's code to run.
        revision (`str`, *optional*): the Hub commit to load.
        **model_kwargs: passed to the model's `from_pretrained` (e.g. `attn_implementation="eager"`).

    Returns:
        `XrayCapImageToTextPipeline`: call it on images or studies; `.model` and `.processor` are loaded.

    Raises:
        `FileNotFoundError` / `ModelSourceError`: see `resolve_model_source` (raised before anything loads).
        `ModelSourceError`: a folder whose `config.json` declares no image-to-text pipeline.
        `OSError`: the folder or Hub repo cannot be loaded.
    """
    from transformers import pipeline

    source, load_kwargs = resolve_model_source(model, trust_remote_code, revision)
    config_file = Path(source) / "config.json"
    declared = (
        json.loads(config_file.read_text()).get("custom_pipelines", {}) if config_file.is_file() else None
    )
    if declared is not None and PIPELINE_TASK not in declared:
        raise ModelSourceError(
            f"{config_file} declares no {PIPELINE_TASK!r} pipeline: run "
            f"`python -c \"from pipeline_xraycap import add_pipeline_to_folder; add_pipeline_to_folder('{source}')\"` "
            "from the xraycap repository, then load it again."
        )
    captioner = pipeline(PIPELINE_TASK, model=source, device=device, model_kwargs=model_kwargs, **load_kwargs)
    captioner.model.eval()
    return captioner


def _card_says_phantom(card) -> bool:
    """The card's model-index names the phantom dataset, or its Data section says synthetic phantom."""
    for result in card.data.eval_results or []:
        if result.dataset_type == SYNTHETIC_DATASET:
            return True
    if SYNTHETIC_DATASET in (card.data.datasets or []):
        return True
    data_section = re.search(r"^## Data\s*$(.*?)(?=^## |\Z)", card.text, flags=re.M | re.S)
    return data_section is not None and "synthetic phantom" in data_section.group(1).lower()


def training_data_warning(model: str, revision: str | None = None) -> str | None:
    """
    The warning a reader of this model's reports needs, read from its model card (the folder's README.md,
    or the Hub repo's): `PHANTOM_WARNING` for a model trained on the synthetic phantoms, else None.

    Args:
        model (`str`): a saved model folder or Hub repo id.
        revision (`str`, *optional*): the Hub commit of the card.
    """
    from huggingface_hub import ModelCard, hf_hub_download

    card_path = Path(model).expanduser() / "README.md"
    try:
        if not card_path.is_file():
            if Path(model).expanduser().is_dir() or _looks_local(model):
                return None  # a folder without a card, or no model at all: never a Hub lookup
            card_path = Path(hf_hub_download(model, "README.md", revision=revision))
        card = ModelCard.load(card_path, ignore_metadata_errors=True)
    except Exception as error:  # noqa: BLE001 - no card (or no network): nothing known, nothing claimed
        logger.info("No model card read for %s (%s): no training-data warning.", model, error)
        return None
    return PHANTOM_WARNING if _card_says_phantom(card) else None
