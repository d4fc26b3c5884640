"""Fetching the Kaggle copy of the Indiana collection with kagglehub (pinned version).

A download holds the lock of its target folder (`folders.folder_lock`): a second `download()` into the same
folder (another process on this node, e.g. every rank of a multi-GPU run on a node-local cache) waits for the
first and then finds its files, instead of writing the same 14 GB into the same place at the same time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .folders import folder_lock

logger = logging.getLogger(__name__)

# Pinned: an unpinned handle always calls the Kaggle API, even when the files are cached.
KAGGLE_HANDLE = "raddar/chest-xrays-indiana-university/versions/2"
_EXPECTED = ("indiana_reports.csv", "indiana_projections.csv")


def _kagglehub_folder(handle: str) -> Path:
    """The folder kagglehub downloads `handle` into when no output_dir is given (its cache)."""
    cache = Path(os.environ.get("KAGGLEHUB_CACHE") or Path.home() / ".cache" / "kagglehub").expanduser()
    return cache / "datasets" / handle.split("/versions/")[0]


def _find_root(path: Path) -> Path:
    """The folder holding the two CSVs (kagglehub may add a level)."""
    if all((path / name).is_file() for name in _EXPECTED):
        return path
    for candidate in sorted(p.parent for p in path.rglob(_EXPECTED[0])):
        if (candidate / _EXPECTED[1]).is_file():
            return candidate
    raise FileNotFoundError(f"downloaded {KAGGLE_HANDLE} to {path} but found no {_EXPECTED[0]} there")


def download(
    output_dir: str | os.PathLike | None = None, handle: str = KAGGLE_HANDLE, force: bool = False
) -> Path:
    """Downloads the Kaggle "Chest X-rays (Indiana University)" dataset (about 14 GB) with kagglehub.

    Needs network access and, for Kaggle, usually credentials (`~/.kaggle/kaggle.json` or the
    `KAGGLE_USERNAME` / `KAGGLE_KEY` variables).

    Args:
        output_dir (`str` or `os.PathLike`, *optional*): where to place the files (default: kagglehub's
            cache, `~/.cache/kagglehub`).
        handle (`str`, defaults to `KAGGLE_HANDLE`): the pinned Kaggle dataset handle.
        force (`bool`, defaults to False): download again even if cached.

    Returns:
        `Path`: the folder with `indiana_reports.csv`, `indiana_projections.csv` and `images/`, to pass as
        `data_dir` to `build_dataset`.

    Raises:
        ConnectionError: when the download fails (no network, no credentials); the message names the
            `--data_dir` alternative.
    """
    try:
        import kagglehub
    except ImportError as err:  # pragma: no cover - kagglehub is a declared dependency
        raise ImportError("download() needs kagglehub: pip install kagglehub") from err
    kwargs = {"force_download": force}
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        kwargs["output_dir"] = str(output_dir)
    target = Path(output_dir).expanduser().resolve() if output_dir is not None else _kagglehub_folder(handle)
    with folder_lock(target):  # one download into a folder at a time; a second one waits, then finds it
        logger.info("Downloading %s with kagglehub", handle)
        try:
            path = kagglehub.dataset_download(handle, **kwargs)
        except Exception as err:  # noqa: BLE001 - kagglehub raises many types for network/auth failures
            raise ConnectionError(
                f"Could not download {handle!r} with kagglehub ({type(err).__name__}: {err}). Without network access "
                "(or Kaggle credentials), download the dataset elsewhere from "
                "https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university, copy the folder holding "
                "indiana_reports.csv, indiana_projections.csv and images/images_normalized/ to this machine and "
                "build from it with `python -m dataset_builder build --data_dir DIR --output_dir OUT`. "
                "For an offline demo, `python -m dataset_builder synthesize --output_dir DIR` makes phantom studies "
                "in the same layout."
            ) from err
        return _find_root(Path(path))
