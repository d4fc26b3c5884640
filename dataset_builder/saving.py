"""Saving the built `DatasetDict` in the `save_to_disk` layout without reading it through memory.

`DatasetDict.save_to_disk` re-reads every example through the Arrow memory map; each page it touches
stays resident (and counts in the process RSS) until the dataset is closed, so saving the real set
(about 1.5 GB of 512-px PNGs) would make the RSS grow with the dataset. The splits built here are plain
Arrow cache files written by `datasets` in the very format `save_to_disk` writes, so they are copied
file to file (`shutil.copyfile`, no memory map) and the `state.json` / `dataset_info.json` /
`dataset_dict.json` metadata is written exactly as `save_to_disk` writes it. Anything else (an
in-memory or indexed split) falls back to `save_to_disk`. The result loads with `datasets.load_from_disk`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import datasets
from datasets import config

_STATE_KEYS = ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")


def _copy_split(ds: datasets.Dataset, split_dir: Path) -> None:
    files = [c["filename"] for c in ds.cache_files]
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("data-*.arrow"):
        old.unlink()
    names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    for src, name in zip(files, names):
        shutil.copyfile(src, split_dir / name)
    state = {key: ds.__dict__[key] for key in _STATE_KEYS}
    state["_split"] = str(ds.split) if ds.split is not None else None
    state["_data_files"] = [{"filename": name} for name in names]
    (split_dir / config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(ds.info)
    (split_dir / config.DATASET_INFO_FILENAME).write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2)
    )


def save_dataset_dict(ds: datasets.DatasetDict, output_dir: str | os.PathLike) -> None:
    """Writes `ds` to `output_dir` in the `DatasetDict.save_to_disk` layout, copying Arrow files.

    Args:
        ds (`datasets.DatasetDict`): the dataset to save.
        output_dir (`str` or `os.PathLike`): the target folder (created; must not hold `ds`'s own files).
    """
    out = Path(output_dir).expanduser().resolve()
    for split, d in ds.items():
        if any(Path(c["filename"]).resolve().parent == out / split for c in d.cache_files):
            raise ValueError(f"output_dir {out} holds the dataset's own cache files; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    for split, d in ds.items():
        plain = bool(d.cache_files) and d._indices is None and not d.list_indexes()
        if (
            plain
            and sum(datasets.Dataset.from_file(c["filename"]).num_rows for c in d.cache_files) == d.num_rows
        ):
            _copy_split(d, out / split)
        else:
            d.save_to_disk(str(out / split))
    (out / config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(ds)}))
