"""Saving the built `DatasetDict` in the `save_to_disk` layout with memory that does not grow with the data.

`DatasetDict.save_to_disk` re-reads every example through the Arrow memory map, and every page it touches
stays in the process's resident set until the dataset is closed: saving the real set (about 1.5 GB of 512-px
PNGs) would grow the build's RSS by that much. The splits the builder prepares are Arrow files in the very
format `save_to_disk` writes, so they are placed file to file instead, and the metadata `load_from_disk` reads
(`dataset_info.json`, `state.json`, `dataset_dict.json`) is written from the datasets' public attributes. A
split with no file of its own (an empty split, held in memory) goes through `save_to_disk`.

Each Arrow file is hard-linked from the cache entry (one copy of the images on disk, however many builds
share it; nothing rewrites an Arrow file in place, and a rebuild of the cache entry writes new files), and
copied only where a link cannot be made (the cache on another file system: put `cache_dir` next to the
output to store the images once).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import datasets
from datasets import config

logger = logging.getLogger(__name__)

# errors that mean "no hard link here" (another file system, or one without links); others (disk full) raise
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Hard-links `src` to `dst` (a new name), or copies it where the file system cannot link it.

    Args:
        src (`str` or `os.PathLike`): an existing file.
        dst (`str` or `os.PathLike`): the new file (must not exist).

    Returns:
        `bool`: True when linked (no extra disk used), False when copied.
    """
    try:
        os.link(src, dst)
        return True
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
    shutil.copyfile(src, dst)
    return False


def _save_split(split: datasets.Dataset, folder: Path, fingerprint: str) -> None:
    """Writes one split as `Dataset.save_to_disk(folder)` would, copying its Arrow files.

    Args:
        split (`datasets.Dataset`): a split as `DatasetBuilder.as_dataset` returns it: its rows are its files'
            rows, in order (no `select` / `shuffle` on top; a split whose files hold other rows is saved with
            `save_to_disk`).
        folder (`Path`): the split's folder (created).
        fingerprint (`str`): the build's input fingerprint; the split's is derived from it and its name.
    """
    file_rows = sum(datasets.Dataset.from_file(f["filename"]).num_rows for f in split.cache_files)
    if not split.cache_files or file_rows != split.num_rows:
        # an empty split gets one (empty) shard: `load_from_disk` needs a file
        split.save_to_disk(str(folder), num_shards=None if len(split) else 1)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("data-*.arrow"):  # an earlier build's files
        stale.unlink()
    names = [f"data-{i:05d}-of-{len(split.cache_files):05d}.arrow" for i in range(len(split.cache_files))]
    copied = [
        not link_or_copy(cache_file["filename"], folder / name)
        for cache_file, name in zip(split.cache_files, names)
    ]
    if any(copied):
        logger.warning(
            "Copied %d Arrow file(s) of the %s split from %s: the cache and %s are on different file systems "
            "(or it has no hard links), so the images are stored twice; pass a cache_dir (--cache_dir) on the "
            "output's file system to store them once",
            sum(copied),
            split.split,
            Path(split.cache_files[0]["filename"]).parent,
            folder,
        )
    split_fingerprint = hashlib.sha256(f"{fingerprint}/{split.split}".encode()).hexdigest()[:16]
    state = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": split_fingerprint,
        "_format_type": split.format["type"],
        "_format_kwargs": split.format["format_kwargs"],
        "_format_columns": split.format["columns"],
        "_output_all_columns": split.format["output_all_columns"],
        "_split": str(split.split) if split.split is not None else None,
    }
    (folder / config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    split.info.write_to_directory(str(folder))


def save_dataset_dict(dataset: datasets.DatasetDict, output_dir: str | Path, fingerprint: str) -> None:
    """Writes `dataset` to `output_dir` in the `DatasetDict.save_to_disk` layout (loads with `load_from_disk`).

    Args:
        dataset (`datasets.DatasetDict`): the built splits, as `DatasetBuilder.as_dataset` returns them.
        output_dir (`str` or `Path`): the target folder (created).
        fingerprint (`str`): the build's input fingerprint.
    """
    out = Path(output_dir)
    for name, split in dataset.items():
        _save_split(split, out / name, fingerprint)
    (out / config.DATASETDICT_JSON_FILENAME).write_text(json.dumps({"splits": list(dataset)}))
