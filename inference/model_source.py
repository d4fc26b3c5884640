"""Which model `--model` names, how to load it, and what its card says about its training data.

Shared by the two ways of using a trained model, `caption.py` (the command line) and `app.py` (the demo).

A name is a local folder, or, only when the user allows it with `trust_remote_code`, a Hub repo id whose
Python code is downloaded and run; `revision` (a commit sha) pins that code. A name that looks like a path
and does not exist is an error, never a download. A model card (`README.md`) whose model-index names the
synthetic phantom dataset marks a model whose reports describe phantoms only.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from training.model_card import SYNTHETIC_DATASET

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "outputs/xraycap-demo"
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PHANTOM_WARNING = (
    "This model was trained on synthetic phantom images only: its reports describe synthetic phantoms, "
    "not real radiographs. Do not read them as findings about a real film."
)


class ModelSourceError(ValueError):
    """`--model` names a Hub repo without permission to run its code, or mixes a folder with a revision."""


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
