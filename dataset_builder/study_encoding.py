"""Encoding the planned studies, in shards, and accounting afterwards for every image that failed.

The builder hands `datasets` its planned studies as a list of shards (consecutive runs of studies, in plan
order: `shard_studies`, each held pickled as a `StudyShard`, cut by `plan_in_shards` where the plan is made);
with `num_proc` > 1 each worker process encodes a consecutive group of shards, so
the rows and their order are the same whatever `num_proc` is. `encode_study` opens each chosen image once
(`images.encode_image`) and builds the example, leaving out an image that fails and returning None for a
study left with too few images.

Nothing is recorded on the side (a worker process's memory does not come back): once the splits are written,
`skips_found_while_encoding` compares the plan with what the shards hold (the `uid` and `image_filenames`
columns, read from the Arrow files) and re-reads only the images that are missing there to name their reason.
The skipped entries are therefore exact, and in plan order, for any `num_proc`.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from . import images as img
from .splits import SPLIT_NAMES
from .study_plan import REASON_TOO_FEW_IMAGES, PlannedStudy, skip_entry

# shards hold at least this many studies (tiny builds stay in one process) and a split gets about four
# shards per process (a slow shard does not leave the other processes idle for long)
MIN_SHARD_STUDIES = 8
SHARDS_PER_PROCESS = 4


def shard_studies(studies: list[PlannedStudy], num_proc: int) -> list[list[PlannedStudy]]:
    """Cuts `studies` into consecutive shards for `num_proc` processes (`datasets` shards over this list).

    Args:
        studies (`list[PlannedStudy]`): one split's planned studies, in plan order.
        num_proc (`int`): the build's worker processes.

    Returns:
        `list[list[PlannedStudy]]`: the shards; concatenated, they are `studies`.
    """
    if not studies:
        return []
    size = max(MIN_SHARD_STUDIES, math.ceil(len(studies) / (max(1, num_proc) * SHARDS_PER_PROCESS)))
    return [studies[i : i + size] for i in range(0, len(studies), size)]


@dataclass(frozen=True)
class StudyShard:
    """A consecutive run of planned studies, held pickled: one bytes object a shard instead of a few small
    objects a study, so the plan that the main process keeps (and that forked workers start from) is compact.

    Args:
        data (`bytes`): the pickled `list[PlannedStudy]`.
        num_studies (`int`): how many studies it holds.
    """

    data: bytes
    num_studies: int

    @classmethod
    def of(cls, studies: list[PlannedStudy]) -> StudyShard:
        return cls(pickle.dumps(studies, protocol=pickle.HIGHEST_PROTOCOL), len(studies))

    def studies(self) -> list[PlannedStudy]:
        return pickle.loads(self.data)


def plan_in_shards(
    make_plan: Callable, cfg, data_dir: Path, num_proc: int
) -> tuple[dict[str, list[StudyShard]], list[dict], dict]:
    """A format's `make_plan`, its studies cut into shards per split (`shard_studies`) and held pickled.

    Returns:
        `tuple[dict[str, list[StudyShard]], list[dict], dict]`: each split's shards (in plan order), the
        skipped entries and the plan's stats.
    """
    studies, skipped, stats = make_plan(cfg, data_dir)
    shards = {
        name: [
            StudyShard.of(shard) for shard in shard_studies([s for s in studies if s.split == name], num_proc)
        ]
        for name in SPLIT_NAMES
    }
    return shards, skipped, stats


def _min_images(study: PlannedStudy, cfg) -> int:
    """A study keeps at least min(min_images, number selected) readable images (and at least 1)."""
    return max(1, min(cfg.min_images, len(study.filenames)))


def encode_study(
    study: PlannedStudy,
    image_dir: Path,
    cfg,
    texts_of: Callable[[PlannedStudy], dict[str, str]] | None = None,
) -> dict | None:
    """Encodes the chosen images of `study` into its example (the builder's `FEATURES`).

    Args:
        study (`PlannedStudy`): the planned study.
        image_dir (`Path`): the folder its filenames are relative to.
        cfg (`ChestXrayConfig`): the build options (`image_size`, `max_image_pixels`, `min_images`).
        texts_of (`Callable[[PlannedStudy], dict[str, str]]`, *optional*): the study's text columns (the
            format's `example_texts`, which reads a study planned from a report file again); by default the
            texts the plan holds. Called only for a study that is kept.

    Returns:
        `dict | None`: the example, or None when fewer than `min(min_images, chosen)` images could be read.
    """
    encoded, projections, names = [], [], []
    for filename, projection in zip(study.filenames, study.projections):
        try:
            data, _ = img.encode_image(image_dir / filename, cfg.image_size, cfg.max_image_pixels)
        except img.ImageProblem:
            continue  # named afterwards by skips_found_while_encoding
        encoded.append({"bytes": data, "path": None})
        projections.append(projection)
        names.append(filename)
    if len(encoded) < _min_images(study, cfg):
        return None
    texts = texts_of(study) if texts_of is not None else study.texts()
    return {
        "uid": study.uid,
        "images": encoded,
        "projections": projections,
        "image_filenames": names,
        **texts,
    }


def _problem_of(path: Path, cfg) -> img.ImageProblem | None:
    """Why `path` cannot be encoded (None when it can)."""
    try:
        img.encode_image(path, cfg.image_size, cfg.max_image_pixels)
    except img.ImageProblem as problem:
        return problem
    return None


def _written(split: datasets.Dataset) -> dict[str, list[str]]:
    """uid -> image_filenames of the examples written to `split` (two columns read, no image decoded)."""
    table = split.data
    return dict(zip(table.column("uid").to_pylist(), table.column("image_filenames").to_pylist()))


def skips_found_while_encoding(
    planned: dict[str, list[StudyShard]], ds: datasets.DatasetDict, image_dir: Path, cfg
) -> tuple[list[dict], int]:
    """The skipped entries of the images (and studies) that the encoding left out, in plan order.

    Args:
        planned (`dict[str, list[StudyShard]]`): each split's shards, as handed to the encoding.
        ds (`datasets.DatasetDict`): the splits as written.
        image_dir (`Path`): the folder the planned filenames are relative to.
        cfg (`ChestXrayConfig`): the build options.

    Returns:
        `tuple[list[dict], int]`: the entries (an image that failed: its reason; a study with too few readable
        images: a study-level entry plus one per readable image, as `too few usable images`) and the number of
        images decoded successfully (those in the examples and the readable ones of the dropped studies).
    """
    skipped: list[dict] = []
    num_decoded = 0
    for name in SPLIT_NAMES:
        written = _written(ds[name]) if name in ds else {}
        for study in (study for shard in planned.get(name, []) for study in shard.studies()):
            kept = set(written.get(study.uid, ()))
            readable = []
            for filename in study.filenames:
                if filename in kept:
                    readable.append(filename)
                    continue
                problem = _problem_of(image_dir / filename, cfg)
                if problem is None and study.uid in written:
                    problem = img.ImageProblem(
                        img.REASON_UNREADABLE, f"{filename} failed while building, reads now"
                    )
                if problem is not None:
                    skipped.append(skip_entry(study.uid, filename, problem.reason, problem.detail))
                else:
                    readable.append(filename)
            num_decoded += len(readable)
            if study.uid not in written:
                detail = f"{len(readable)} readable image(s) after decoding"
                skipped.append(skip_entry(study.uid, None, REASON_TOO_FEW_IMAGES, detail))
                skipped.extend(skip_entry(study.uid, fn, REASON_TOO_FEW_IMAGES, detail) for fn in readable)
    return skipped, num_decoded
