"""The Indiana University chest X-ray collection in the Kaggle layout (`--format indiana`, the default).

```
DATA_DIR/
  indiana_reports.csv        uid,MeSH,Problems,image,indication,comparison,findings,impression
  indiana_projections.csv    uid,filename,projection   (Frontal / Lateral)
  images/images_normalized/<filename>
```

`make_plan` joins the CSVs on `uid` (file names are never parsed), checks the header of every referenced image
without decoding it, applies the shared options (`study_plan.plan_study`) and assigns study-level splits: a
seeded 70/10/20 permutation (`splits.py`), or the membership of an R2Gen `annotation.json` (`split_file.py`).
`num_reports` counts the rows of `indiana_reports.csv`, `num_projection_rows` those of
`indiana_projections.csv`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .split_file import read_split_file
from .splits import SPLIT_NAMES, assign_splits, split_sizes
from .study_plan import (
    REASON_DUPLICATE_ROW,
    DataFormat,
    PlannedStudy,
    plan_study,
    probe_row,
    read_csv_checked,
    skip_entry,
    skip_study,
)

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
IMAGE_SUBDIR = str(Path("images", "images_normalized"))
REPORTS_REQUIRED = ("uid", "findings", "impression", "MeSH", "Problems", "indication")
PROJECTIONS_REQUIRED = ("uid", "filename", "projection")
MISSING_LAYOUT_HINT = (
    f"--data_dir must hold {REPORTS_CSV}, {PROJECTIONS_CSV} and {IMAGE_SUBDIR}/ "
    "(the Kaggle layout; `python -m dataset_builder download` fetches it)"
)

# Indiana-only skip reasons (the shared ones live in study_plan.py, the image ones in images.py)
REASON_NO_PROJECTIONS = "no projection rows"
REASON_NOT_IN_REPORTS = "uid not in reports CSV"
REASON_DUPLICATE_REPORT = "duplicate uid in reports CSV"
REASON_NOT_IN_SPLIT_FILE = "not in split file"


def check_layout(data_dir: Path, cfg) -> None:
    """Both CSVs exist with their columns, and the split file (if any) exists.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the file and its missing columns.
    """
    read_csv_checked(data_dir / REPORTS_CSV, REPORTS_REQUIRED, MISSING_LAYOUT_HINT)
    read_csv_checked(data_dir / PROJECTIONS_CSV, PROJECTIONS_REQUIRED, MISSING_LAYOUT_HINT)
    if cfg.split_file and not Path(cfg.split_file).is_file():
        raise FileNotFoundError(f"split_file {cfg.split_file} not found (an R2Gen annotation.json)")


def fingerprint(h: hashlib._Hash, data_dir: Path, cfg) -> None:
    """Adds both CSVs' bytes, the image folder listing (names, sizes, mtimes) and the split file's bytes to
    `h`, without decoding any image."""
    for name in (REPORTS_CSV, PROJECTIONS_CSV):
        path = data_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {MISSING_LAYOUT_HINT}")
        h.update(name.encode())
        h.update(path.read_bytes())
    image_dir = data_dir / IMAGE_SUBDIR
    if image_dir.is_dir():
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(image_dir))
        h.update(json.dumps(entries).encode())
    if cfg.split_file:
        h.update(Path(cfg.split_file).read_bytes())


def make_plan(cfg, data_dir: Path) -> tuple[list[PlannedStudy], list[dict], dict]:
    """Reads the CSVs, checks every referenced file's header, applies the options and assigns splits.

    Args:
        cfg (`ChestXrayConfig`): the build options.
        data_dir (`Path`): the folder in the Kaggle layout.

    Returns:
        `tuple[list[PlannedStudy], list[dict], dict]`: the planned studies (each with its split), the
        skipped entries, and stats (`num_reports`, `num_projection_rows`, and `split_sizes` or `split_file`).

    Raises:
        FileNotFoundError: when a CSV or the image folder is missing.
        ValueError: when a CSV lacks a required column.
    """
    reports = read_csv_checked(data_dir / REPORTS_CSV, REPORTS_REQUIRED, MISSING_LAYOUT_HINT)
    projections = read_csv_checked(data_dir / PROJECTIONS_CSV, PROJECTIONS_REQUIRED, MISSING_LAYOUT_HINT)
    image_dir = data_dir / IMAGE_SUBDIR
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found: --data_dir must hold {IMAGE_SUBDIR}/")
    skipped: list[dict] = []

    report_rows: dict[str, dict] = {}
    for row in reports.to_dict("records"):
        uid = row["uid"]
        if uid in report_rows:
            skipped.append(skip_entry(uid, None, REASON_DUPLICATE_REPORT, "a later row with the same uid"))
            continue
        report_rows[uid] = row

    by_uid: dict[str, list[tuple[str, str]]] = defaultdict(list)
    seen_rows: set[tuple[str, str]] = set()
    probe_bar = tqdm(
        projections[["uid", "filename", "projection"]].itertuples(index=False),
        total=len(projections),
        desc="Checking image files",
        unit="img",
        disable=len(projections) < 2000 or None,
    )
    for uid, filename, projection in probe_bar:
        filename = filename.strip()
        if (uid, filename) in seen_rows:
            skipped.append(skip_entry(uid, filename, REASON_DUPLICATE_ROW))
            continue
        seen_rows.add((uid, filename))
        if uid not in report_rows:
            skipped.append(skip_entry(uid, filename, REASON_NOT_IN_REPORTS))
            continue
        if probe_row(image_dir, uid, filename, cfg.max_image_pixels, skipped):
            by_uid[uid].append((filename, projection))

    all_rows_of: dict[str, int] = Counter(projections["uid"])
    candidates: list[PlannedStudy] = []
    for uid, row in report_rows.items():
        if all_rows_of.get(uid, 0) == 0:
            skip_study(skipped, uid, REASON_NO_PROJECTIONS, f"uid {uid} has no row in {PROJECTIONS_CSV}")
            continue
        study = plan_study(
            cfg,
            uid,
            by_uid.get(uid, []),
            row["findings"],
            row["impression"],
            skipped,
            mesh=row["MeSH"],
            problems=row["Problems"],
            indication=row["indication"],
        )
        if study is not None:
            candidates.append(study)

    stats: dict = {}
    if cfg.split_file:
        membership, unmatched, how = read_split_file(cfg.split_file, list(report_rows), projections)
        stats["split_file"] = {"path": cfg.split_file, "unmatched_ids": unmatched, "matched_by": how}
        kept = []
        for study in candidates:
            split = membership.get(study.uid)
            if split is None:
                rows = list(zip(study.filenames, study.projections))
                skip_study(skipped, study.uid, REASON_NOT_IN_SPLIT_FILE, cfg.split_file, rows)
                continue
            study.split = split
            kept.append(study)
        candidates = kept
    else:
        assignment = assign_splits([s.uid for s in candidates], seed=cfg.seed)
        for study in candidates:
            study.split = assignment[study.uid]
        stats["split_sizes"] = dict(zip(SPLIT_NAMES, split_sizes(len(candidates))))
    stats["num_reports"] = len(reports)
    stats["num_projection_rows"] = len(projections)
    return candidates, skipped, stats


FORMAT = DataFormat(
    name="indiana",
    dataset_name="indiana_xray",
    description="Indiana University chest X-ray reports (Open-i, Kaggle copy): one example per study.",
    homepage="https://www.kaggle.com/datasets/raddar/chest-xrays-indiana-university",
    citation=(
        "Demner-Fushman D. et al., Preparing a collection of radiology examinations for distribution "
        "and retrieval, JAMIA 2016;23(2):304-310."
    ),
    check_layout=check_layout,
    fingerprint=fingerprint,
    make_plan=make_plan,
    image_root=lambda data_dir: data_dir / IMAGE_SUBDIR,
    split_rule="n_train = round_half_up(0.7 n), n_validation = round_half_up(0.1 n), n_test = rest",
    unsupported_options={"reports_dir": "Indiana reports are the rows of indiana_reports.csv in --data_dir"},
)
