"""Chest X-ray studies (any `--format`, see `formats.py`) as a `datasets` builder, and `build_dataset`.

`ChestXrayBuilder` (`IndianaXrayBuilder` is its earlier name) is a `datasets.GeneratorBasedBuilder` used
in-process (loading scripts no longer exist in datasets >= 4). It follows the plan of its format's `make_plan`
(the Indiana Kaggle layout in `indiana.py`, MIMIC-CXR-JPG in `mimic_cxr.py`) and yields one example per study
(uid) in one schema (`FEATURES`) whatever the format, with each image decoded once, converted to 8-bit
grayscale and re-encoded as PNG bytes (never paths). The studies are planned in shards (`study_encoding.py`),
encoded by `num_proc` worker processes started once for the build (`ShardPool`) and written in plan order by this
process, the rows and their order the same for any `num_proc`.

`build_dataset` is the entry point: it fingerprints the inputs (the format's tables, a listing of its images and
reports, the split file, every option: see each format's `fingerprint`) so that rebuilding with the same inputs
and options reuses the `datasets` cache instead of re-encoding, and returns `(DatasetDict, build_report)`. With
`output_dir` it also writes the `save_to_disk` layout to `output_dir` (`saving.py`: hard links to the cache's
files) and `output_dir/build_report.json`: into a temporary folder next to it, renamed into place once complete (an earlier build there is replaced only by a
complete new one; a non-empty folder that is not an earlier build is refused without `overwrite=True`). The
cache entry is prepared under an inter-process lock, so two runs on one cache build it once, and its sidecar
JSON is written atomically.

Every report (study) and every image row ends up either in an example or in `build_report["skipped"]`;
`build_report["accounting"]` shows that the counts add up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import datasets
import pyarrow.compute as pc

from . import images as img
from .configuration import ChestXrayConfig
from .folders import folder_lock, move_into_place, refuse_non_empty, temporary_sibling, write_text_atomic
from .formats import DEFAULT_FORMAT, get_format
from .saving import save_dataset_dict
from .splits import SPLIT_NAMES
from .study_encoding import ShardPool, StudyShard, encode_study, plan_in_shards, skips_found_while_encoding
from .study_plan import finding_set_novelty

logger = logging.getLogger(__name__)

SIDECAR = "xraycap_build_report.json"
R = TypeVar("R")

FEATURES = datasets.Features(
    {
        "uid": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "projections": datasets.List(datasets.Value("string")),
        "image_filenames": datasets.List(datasets.Value("string")),
        "findings": datasets.Value("string"),
        "impression": datasets.Value("string"),
        "report": datasets.Value("string"),
        "mesh": datasets.Value("string"),
        "problems": datasets.Value("string"),
        "indication": datasets.Value("string"),
    }
)


class ChestXrayBuilder(datasets.GeneratorBasedBuilder):
    """Chest X-ray studies in the layout of `config.data_format` -> one example per study, images as PNG bytes.

    The columns are the same for every format: `uid`, `images`, `projections` ("Frontal" / "Lateral" / other),
    `image_filenames` (relative to the format's image folder), `findings` and `impression` (raw, stripped),
    `report` (the cleaned target section), `mesh`, `problems`, `indication` ("" where a format has no such
    field: MIMIC-CXR has no MeSH or Problems).
    """

    BUILDER_CONFIG_CLASS = ChestXrayConfig
    BUILDER_CONFIGS = [ChestXrayConfig(name="default")]
    DEFAULT_CONFIG_NAME = "default"
    DEFAULT_WRITER_BATCH_SIZE = 64

    def __init__(self, *args, num_proc: int | None = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.generated = False
        self.num_proc = num_proc or 1
        self.plan_skipped: list[dict] = []
        self.planned: dict[str, list[StudyShard]] = {}
        self.plan_stats: dict = {}
        self.pool: ShardPool | None = None

    def __getstate__(self):
        # the plan and the worker processes stay in this process (the shards carry the studies)
        return {k: v for k, v in self.__dict__.items() if k not in ("planned", "plan_skipped", "pool")}

    def _info(self) -> datasets.DatasetInfo:
        data_format = get_format(self.config.data_format)
        return datasets.DatasetInfo(
            description=data_format.description,
            features=FEATURES,
            homepage=data_format.homepage,
            citation=data_format.citation,
        )

    def _split_generators(self, dl_manager):
        cfg: ChestXrayConfig = self.config
        if not cfg.data_dir:
            raise ValueError(
                f"{type(self).__name__} needs data_dir= (the folder in the {cfg.data_format!r} layout, "
                "e.g. the Kaggle CSVs and images/)"
            )
        cfg.validate()
        self.generated = True
        data_format = get_format(cfg.data_format)
        self.planned, self.plan_skipped, self.plan_stats = run_apart(
            plan_in_shards, data_format.make_plan, cfg, Path(cfg.data_dir)
        )
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"split": name, "shards": self.planned[name]})
            for name in SPLIT_NAMES
        ]

    def _generate_examples(self, split: str, shards: list[StudyShard]):
        """Yields the examples of `split`'s `shards` (consecutive runs of planned studies), in plan order.

        With `num_proc` > 1 the shards are encoded by the build's `ShardPool` (started at the first split, for
        all of them; `close_pool` stops it) and come back in plan order; otherwise they are encoded here. Either
        way `datasets` writes them from this process, so the rows and their order do not depend on `num_proc`.
        Nothing is recorded on the side: an image that fails is simply left out of its example (and a study left
        with too few images is not yielded); `skips_found_while_encoding` finds both afterwards.
        """
        cfg: ChestXrayConfig = self.config
        encode = partial(
            encode_shard, image_dir=get_format(cfg.data_format).image_root(Path(cfg.data_dir)), cfg=cfg
        )
        if self.num_proc > 1:
            if self.pool is None:
                self.pool = ShardPool(encode, self.planned, self.num_proc)
            encoded = self.pool.results(split)
        else:
            encoded = (example for shard in shards for example in encode(shard))
        yield from encoded

    def close_pool(self) -> None:
        """Stops the worker processes of `_generate_examples` (if it started them)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def encode_shard(shard: StudyShard, image_dir: Path, cfg: ChestXrayConfig) -> list[tuple[str, dict]]:
    """The `(uid, example)` pairs of a shard's studies that keep enough images (`encode_study`), in plan order.
    Runs in a worker process with `num_proc` > 1 (module level, so that it pickles)."""
    data_format = get_format(cfg.data_format)
    examples = []
    for study in shard.studies():
        example = encode_study(study, image_dir, cfg, lambda s: data_format.example_texts(s, cfg))
        if example is not None:
            examples.append((study.uid, example))
    return examples


def run_apart(fn: Callable[..., R], *args) -> R:
    """`fn(*args)` in a short-lived forked process, its result (pickled) returned here.

    For the fingerprint and the plan: they read whole tables, listings and reports into many small objects
    that are dropped at once, and the memory they leave behind stays with the process that read them. Done in
    a child, it leaves with it, and the encoding processes (forked from this one afterwards) do not start with
    a copy that grows with the number of studies. Runs in this process where `fork` is not available.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return fn(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(fn, *args).result()


def fingerprint_inputs(data_dir: Path, cfg: ChestXrayConfig, options: dict) -> str:
    """Hash of everything the build reads (the format's tables, its image and report listings or stats, the
    split file: see each format's `fingerprint`) and of the options. Computed without decoding any image."""
    h = hashlib.sha256()
    get_format(cfg.data_format).fingerprint(h, data_dir, cfg)
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _num_images(split: datasets.Dataset) -> int:
    """The images of a split's examples, counted in the Arrow column (no row is read into Python)."""
    column = split.data.column("projections")
    return int(pc.sum(pc.list_value_length(column)).as_py() or 0) if len(column) else 0


def _accounting(report: dict, ds: datasets.DatasetDict) -> dict:
    skipped = report["skipped"]
    study_skips = sum(1 for s in skipped if s["filename"] is None)
    row_skips = sum(1 for s in skipped if s["filename"] is not None)
    examples = sum(ds[s].num_rows for s in ds)
    images_used = sum(report["num_images"].values())
    return {
        "reports": {"in_examples": examples, "skipped": study_skips, "total": report["num_reports"]},
        "projection_rows": {
            "in_examples": images_used,
            "skipped": row_skips,
            "total": report["num_projection_rows"],
        },
        "adds_up": examples + study_skips == report["num_reports"]
        and images_used + row_skips == report["num_projection_rows"],
    }


def _is_a_build(folder: Path) -> bool:
    """True for an earlier `build_dataset` output (replaced by a new build without asking)."""
    return (folder / "build_report.json").is_file() and (
        folder / datasets.config.DATASETDICT_JSON_FILENAME
    ).is_file()


def default_num_proc() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _prepare(
    builder: ChestXrayBuilder, force_rebuild: bool, start: float
) -> tuple[datasets.DatasetDict, dict]:
    """Builds the cache entry (or reuses it when its sidecar says it is complete): the splits and the
    sidecar's content (skipped rows, plan statistics). Called under the cache entry's lock."""
    sidecar = Path(builder.cache_dir) / SIDECAR
    download_mode = (
        "force_redownload" if force_rebuild or not sidecar.is_file() else "reuse_dataset_if_exists"
    )
    try:  # datasets writes from this process: the encoding's worker processes are the builder's own
        builder.download_and_prepare(download_mode=download_mode)
    finally:
        builder.close_pool()
    ds = datasets.DatasetDict()
    for name in SPLIT_NAMES:
        # datasets cannot read back a split with no example: give it an empty Dataset with the features
        if builder.info.splits[name].num_examples:
            ds[name] = builder.as_dataset(split=name)
        else:
            ds[name] = datasets.Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)

    if builder.generated:
        cfg = builder.config
        image_dir = get_format(cfg.data_format).image_root(Path(cfg.data_dir))
        encoding_skipped, num_decoded = skips_found_while_encoding(builder.planned, ds, image_dir, cfg)
        cached = {
            "skipped": builder.plan_skipped + encoding_skipped,
            "stats": builder.plan_stats,
            "num_images_encoded": num_decoded,
            "num_proc": builder.num_proc,
            "generation_seconds": round(time.perf_counter() - start, 2),
        }
        write_text_atomic(sidecar, json.dumps(cached, indent=1))
    else:
        cached = json.loads(sidecar.read_text())
        logger.info("Reused the cached dataset at %s (no image re-encoded)", builder.cache_dir)

    return ds, cached


def build_dataset(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    data_format: str = DEFAULT_FORMAT,
    reports_dir: str | os.PathLike | None = None,
    section: str = "findings",
    views: str = "pair",
    min_images: int = 1,
    image_size: int = 512,
    seed: int = 42,
    r2gen: bool = False,
    split_file: str | os.PathLike | None = None,
    xxxx: str = "keep",
    max_image_pixels: int = img.DEFAULT_MAX_IMAGE_PIXELS,
    cache_dir: str | os.PathLike | None = None,
    writer_batch_size: int = 64,
    force_rebuild: bool = False,
    overwrite: bool = False,
    num_proc: int | None = None,
) -> tuple[datasets.DatasetDict, dict]:
    """Builds the study-level `DatasetDict` (train / validation / test) and its build report.

    Args:
        data_dir (`str` or `os.PathLike`): the folder in the `data_format` layout: for "indiana" the Kaggle
            layout (`indiana_reports.csv`, `indiana_projections.csv`, `images/images_normalized/`), real or
            synthetic; for "mimic-cxr" the MIMIC-CXR-JPG folder (`mimic-cxr-2.0.0-split.csv.gz`,
            `mimic-cxr-2.0.0-metadata.csv.gz`, `files/`; see `mimic_cxr.py`).
        output_dir (`str` or `os.PathLike`, *optional*): when given, `DatasetDict.save_to_disk(output_dir)` and
            `output_dir/build_report.json` are written (load them with `datasets.load_from_disk`).
        data_format (`str`, defaults to "indiana"): "indiana" or "mimic-cxr" (`formats.FORMATS`). The schema and
            the build report are the same for both.
        reports_dir (`str` or `os.PathLike`, *optional*): mimic-cxr only: the folder holding the MIMIC-CXR
            reports' `files/p10/p10000032/s50414267.txt` tree (default: `data_dir`).
        section (`str`, defaults to "findings"): "findings", "impression" or "findings+impression".
        views (`str`, defaults to "pair"): "frontal", "pair" or "all" (see `ChestXrayConfig`).
        min_images (`int`, defaults to 1): minimum usable images per study.
        image_size (`int`, defaults to 512): longer side of the re-encoded PNGs, in pixels.
        seed (`int`, defaults to 42): study-level split seed (mimic-cxr keeps its official split).
        r2gen (`bool`, defaults to False): indiana only: findings only, >= 2 images, 70/10/20 (2,955 ->
            2,069/296/590).
        split_file (`str`, *optional*): indiana only: an R2Gen `annotation.json` to take split membership from.
        xxxx (`str`, defaults to "keep"): anonymisation tokens in `report` (Indiana's `XXXX`, MIMIC's `___`):
            "keep", "drop" or "marker".
        max_image_pixels (`int`, defaults to 50,000,000): images above this are skipped.
        cache_dir (`str`, *optional*): the `datasets` cache folder (default: the HF datasets cache).
        writer_batch_size (`int`, defaults to 64): examples buffered before an Arrow write; bounds the memory
            of the encoding.
        force_rebuild (`bool`, defaults to False): ignore an existing cache entry.
        overwrite (`bool`, defaults to False): replace a non-empty `output_dir` that is not an earlier build
            (an earlier build, with its `build_report.json` and `dataset_dict.json`, is always replaced).
        num_proc (`int`, *optional*): processes encoding the images (default: the CPUs this process may use,
            `default_num_proc()`). The dataset is the same rows in the same order whatever it is, and it is no
            part of the cache key.

    Returns:
        `tuple[DatasetDict, dict]`: the dataset and the build report (also saved as
        `build_report.json` when `output_dir` is given).
    """
    start = time.perf_counter()
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1 (or None for every CPU), got {num_proc} (--num_proc)")
    out = Path(output_dir).expanduser().resolve() if output_dir is not None else None
    if out is not None:  # before the (long) build
        refuse_non_empty(out, overwrite, "the built dataset", "overwrite=True (--overwrite)", _is_a_build)
    data_path = Path(data_dir).expanduser().resolve()
    fmt = get_format(data_format)
    if not data_path.is_dir():
        raise FileNotFoundError(
            f"data_dir {data_path} is not a folder; pass the folder in the {fmt.name!r} layout (--format)"
        )
    split_file_str = str(Path(split_file).expanduser().resolve()) if split_file else None
    reports_dir_str = str(Path(reports_dir).expanduser().resolve()) if reports_dir else None
    checked = ChestXrayConfig(
        name="default",
        data_format=fmt.name,
        reports_dir=reports_dir_str,
        section=section,
        views=views,
        min_images=min_images,
        image_size=image_size,
        seed=seed,
        r2gen=r2gen,
        split_file=split_file_str,
        xxxx=xxxx,
        max_image_pixels=max_image_pixels,
    )  # validates (options that do not apply to the format are refused) and applies r2gen
    fmt.check_layout(data_path, checked)  # fail fast on missing files / columns before hashing anything large
    min_images = checked.min_images
    options = {
        "data_format": fmt.name,
        "reports_dir": reports_dir_str,
        "section": section,
        "views": views,
        "min_images": min_images,
        "image_size": image_size,
        "seed": seed,
        "r2gen": r2gen,
        "split_file": split_file_str,
        "xxxx": xxxx,
        "max_image_pixels": max_image_pixels,
    }
    fingerprint = run_apart(fingerprint_inputs, data_path, checked, options)
    builder = ChestXrayBuilder(
        cache_dir=str(cache_dir) if cache_dir else None,
        dataset_name=fmt.dataset_name,
        writer_batch_size=writer_batch_size,
        hash=fingerprint,
        data_dir=str(data_path),
        fingerprint=fingerprint,
        num_proc=num_proc or default_num_proc(),
        **options,
    )
    with folder_lock(builder.cache_dir):  # another run on this cache entry waits, then reuses it
        ds, cached = _prepare(builder, force_rebuild, start)

    stats = cached["stats"]
    skipped = cached["skipped"]
    report = {
        "num_reports": stats["num_reports"],
        "num_projection_rows": stats["num_projection_rows"],
        "num_examples": {name: ds[name].num_rows for name in SPLIT_NAMES if name in ds},
        "num_images": {name: _num_images(ds[name]) for name in SPLIT_NAMES if name in ds},
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped).most_common()),
        "skipped": skipped,
        "options": {**builder.config.options(), "data_dir": str(data_path)},
        "split_arithmetic": fmt.split_rule,
        "finding_sets": finding_set_novelty({name: ds[name]["mesh"] for name in SPLIT_NAMES if name in ds}),
        "fingerprint": fingerprint,
        "cache_dir": builder.cache_dir,
        "reused_cache": not builder.generated,
        "num_images_encoded_this_run": cached["num_images_encoded"] if builder.generated else 0,
        "num_proc": builder.num_proc,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if "split_file" in stats:
        report["split_file"] = stats["split_file"]
    report["accounting"] = _accounting(report, ds)
    if not report["accounting"]["adds_up"]:
        logger.warning("build report counts do not add up: %s", report["accounting"])

    if out is not None:
        with temporary_sibling(out) as tmp:
            save_dataset_dict(ds, tmp, fingerprint)
            (tmp / "build_report.json").write_text(json.dumps(report, indent=1))
            refuse_non_empty(out, overwrite, "the built dataset", "overwrite=True (--overwrite)", _is_a_build)
            move_into_place(tmp, out)
        logger.info("Saved the dataset and build_report.json to %s", out)
    return ds, report


IndianaXrayBuilder = ChestXrayBuilder  # the name from before other formats
