"""Encoding the planned studies, in shards, and accounting afterwards for every image that failed.

The plan of each split is cut into shards (`shard_studies`: consecutive runs of a fixed number of studies, in plan
order, each held pickled as a `StudyShard`; the cut does not depend on `num_proc`). With `num_proc` > 1 a
`ShardPool` starts the worker processes once for the whole build and hands them the shards of every split in plan
order, one at a time: a worker that finishes a shard takes the next, so no worker idles while another has a long
run left, and the next split's shards start while the last ones of a split are still being encoded. The main
process receives the examples in plan order and writes them (`datasets`' single-writer path), so the rows and
their order are the same whatever `num_proc` is. `encode_study` opens each chosen image once
(`images.encode_image`) and builds the example, leaving out an image that fails and returning None for a
study left with too few images.

Nothing is recorded on the side: once the splits are written, `skips_found_while_encoding` compares the plan
with what was written (the `uid` and `image_filenames` columns, read from the Arrow files) and re-reads only the
images that are missing there to name their reason. The skipped entries are therefore exact, and in plan order,
for any `num_proc`.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets

from . import images as img
from .splits import SPLIT_NAMES
from .study_plan import REASON_TOO_FEW_IMAGES, PlannedStudy, skip_entry

# a shard is the unit of work a worker process takes at a time: small enough that the last shards of a build
# leave little idle time and that the examples waiting to be written stay few; large enough that handing it over
# (a few pickled file names, its examples back) costs little beside decoding its images
SHARD_STUDIES = 16
# shards handed out and not yet written, per worker process: each worker has the next one queued
SHARDS_AHEAD_PER_PROCESS = 2


def shard_studies(studies: list[PlannedStudy], size: int | None = None) -> list[list[PlannedStudy]]:
    """Cuts `studies` into consecutive shards of `size` studies (the last one shorter).

    Args:
        studies (`list[PlannedStudy]`): one split's planned studies, in plan order.
        size (`int`, *optional*): studies per shard (default: `SHARD_STUDIES`).

    Returns:
        `list[list[PlannedStudy]]`: the shards; concatenated, they are `studies`.
    """
    size = size or SHARD_STUDIES
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
    make_plan: Callable, cfg, data_dir: Path
) -> tuple[dict[str, list[StudyShard]], list[dict], dict]:
    """A format's `make_plan`, its studies cut into shards per split (`shard_studies`) and held pickled.

    Returns:
        `tuple[dict[str, list[StudyShard]], list[dict], dict]`: each split's shards (in plan order), the
        skipped entries and the plan's stats.
    """
    studies, skipped, stats = make_plan(cfg, data_dir)
    shards = {
        name: [StudyShard.of(shard) for shard in shard_studies([s for s in studies if s.split == name])]
        for name in SPLIT_NAMES
    }
    return shards, skipped, stats


class ShardPool:
    """Worker processes, started once for the build, that encode the shards of every split in plan order.

    The shards are handed out in plan order (the splits in `SPLIT_NAMES` order, as `datasets` prepares them), with
    at most `SHARDS_AHEAD_PER_PROCESS` a process handed out and not yet read back: a worker that finishes a shard
    takes the next one, whichever split it belongs to, and the examples waiting in this process are those of a
    few shards, whatever the size of the build. `results` gives a split's examples back in plan order.

    Args:
        encode (`Callable[[StudyShard], list]`): encodes one shard (pickled to the workers: a module-level
            function or a `functools.partial` of one).
        planned (`dict[str, list[StudyShard]]`): each split's shards, in plan order.
        num_proc (`int`): worker processes (forked where the OS can, so they start at once).
    """

    def __init__(
        self, encode: Callable[[StudyShard], list], planned: dict[str, list[StudyShard]], num_proc: int
    ):
        self._encode = encode
        self._planned = planned
        self._order = [(name, i) for name in SPLIT_NAMES for i in range(len(planned.get(name, [])))]
        self._next = 0
        self._pending: dict[tuple[str, int], Future] = {}
        self._ahead = SHARDS_AHEAD_PER_PROCESS * num_proc
        fork = "fork" in multiprocessing.get_all_start_methods()
        self._executor = ProcessPoolExecutor(  # no more workers than shards (a tiny build starts one)
            max(1, min(num_proc, len(self._order))),
            mp_context=multiprocessing.get_context("fork") if fork else None,
        )

    def _hand_out(self, until: tuple[str, int] | None = None) -> None:
        """Hands out shards in plan order: up to `until` (whatever the window), then while the window has room."""
        while self._next < len(self._order) and (
            (until is not None and until not in self._pending) or len(self._pending) < self._ahead
        ):
            key = self._order[self._next]
            self._pending[key] = self._executor.submit(self._encode, self._planned[key[0]][key[1]])
            self._next += 1

    def results(self, split: str) -> Iterator:
        """The encoded results of `split`'s shards, in plan order (each shard's list flattened)."""
        for index in range(len(self._planned.get(split, []))):
            self._hand_out(until=(split, index))
            result = self._pending.pop((split, index)).result()  # a worker's error is raised here
            self._hand_out()
            yield from result

    def close(self) -> None:
        """Stops the workers (shards not started are cancelled)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()


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
