"""The build plan: which Indiana study goes into which split, and why every other row is skipped.

`make_plan` reads `indiana_reports.csv` and `indiana_projections.csv` (joined on `uid`; file names are never
parsed), checks the header of every referenced image without decoding it, applies the options (target
section, views, minimum images, split file) and assigns study-level splits. Nothing is encoded here: the
builder encodes the planned images afterwards.

Every report row and every projection row ends up either in a planned study or in the skipped list
(`{"uid", "filename", "reason", "detail"}`; `filename` is None for a study-level entry about a report row).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import images as img
from .configuration import IndianaXrayConfig
from .split_file import read_split_file
from .splits import SPLIT_NAMES, assign_splits, split_sizes
from .text_cleaning import clean_text, join_sections

REPORTS_CSV = "indiana_reports.csv"
PROJECTIONS_CSV = "indiana_projections.csv"
IMAGE_SUBDIR = str(Path("images", "images_normalized"))
REPORTS_REQUIRED = ("uid", "findings", "impression", "MeSH", "Problems", "indication")
PROJECTIONS_REQUIRED = ("uid", "filename", "projection")
MISSING_LAYOUT_HINT = (
    f"--data_dir must hold {REPORTS_CSV}, {PROJECTIONS_CSV} and {IMAGE_SUBDIR}/ "
    "(the Kaggle layout; `python -m dataset_builder download` fetches it)"
)

# study-level skip reasons (image-level ones live in images.py)
REASON_EMPTY_SECTION = "empty target section"
REASON_NO_PROJECTIONS = "no projection rows"
REASON_NOT_IN_REPORTS = "uid not in reports CSV"
REASON_DUPLICATE_REPORT = "duplicate uid in reports CSV"
REASON_DUPLICATE_ROW = "duplicate projection row"
REASON_TOO_FEW_IMAGES = "too few usable images"
REASON_NO_FRONTAL = "no frontal view"
REASON_VIEW_NOT_SELECTED = "view not selected"
REASON_NOT_IN_SPLIT_FILE = "not in split file"


def read_csv_checked(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Reads a CSV as strings ("" for empty cells; quoted multi-line fields are supported).

    Raises:
        FileNotFoundError: when the file is absent.
        ValueError: naming the file and the missing columns.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {MISSING_LAYOUT_HINT}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable CSV ({err}); expected columns {list(required)}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path} is missing required column(s) {missing}; it has {list(df.columns)} and needs {list(required)}"
        )
    for col in df.columns:
        df[col] = df[col].astype(str)
    df["uid"] = df["uid"].str.strip()
    return df


@dataclass
class PlannedStudy:
    """A study that goes into a split: its chosen images (not yet encoded) and its texts."""

    uid: str
    split: str
    filenames: list[str]
    projections: list[str]
    findings: str
    impression: str
    report: str
    mesh: str
    problems: str
    indication: str


def skip_entry(uid: str, filename: str | None, reason: str, detail: str = "") -> dict:
    """One entry of the build report's `skipped` list (`filename` None: the study-level entry)."""
    return {"uid": uid, "filename": filename, "reason": reason, "detail": detail}


def _select_views(rows: list[tuple[str, str]], views: str) -> list[tuple[str, str]] | None:
    """Picks the images of a study from its usable (filename, projection) rows, in CSV order.

    Returns:
        The selection, or None when `views="frontal"` and the study has no frontal view.
    """
    frontal = [r for r in rows if r[1].strip().lower() == "frontal"]
    lateral = [r for r in rows if r[1].strip().lower() == "lateral"]
    if views == "all":
        return list(rows)
    if views == "frontal":
        return frontal[:1] or None
    chosen = frontal[:1] + lateral[:1]
    return chosen or rows[:1]


def make_plan(cfg: IndianaXrayConfig, data_dir: Path) -> tuple[list[PlannedStudy], list[dict], dict]:
    """Reads the CSVs, checks every referenced file's header, applies the options and assigns splits.

    Args:
        cfg (`IndianaXrayConfig`): the build options.
        data_dir (`Path`): the folder in the Kaggle layout.

    Returns:
        `tuple[list[PlannedStudy], list[dict], dict]`: the planned studies (each with its split), the
        skipped entries, and stats (`num_reports`, `num_projection_rows`, and `split_sizes` or `split_file`).

    Raises:
        FileNotFoundError: when a CSV or the image folder is missing.
        ValueError: when a CSV lacks a required column.
    """
    reports = read_csv_checked(data_dir / REPORTS_CSV, REPORTS_REQUIRED)
    projections = read_csv_checked(data_dir / PROJECTIONS_CSV, PROJECTIONS_REQUIRED)
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
        try:
            path = img.resolve_image_path(image_dir, filename)
            img.probe_image(path, cfg.max_image_pixels)
        except img.ImageProblem as problem:
            skipped.append(skip_entry(uid, filename, problem.reason, problem.detail))
            continue
        by_uid[uid].append((filename, projection))

    all_rows_of: dict[str, int] = Counter(projections["uid"])

    def skip_study(uid: str, reason: str, detail: str = "", rows: list[tuple[str, str]] = ()) -> None:
        skipped.append(skip_entry(uid, None, reason, detail))
        skipped.extend(skip_entry(uid, fn, reason, detail) for fn, _ in rows)

    candidates: list[PlannedStudy] = []
    min_images = max(cfg.min_images, 1)
    for uid, row in report_rows.items():
        rows = by_uid.get(uid, [])
        if all_rows_of.get(uid, 0) == 0:
            skip_study(uid, REASON_NO_PROJECTIONS, f"uid {uid} has no row in {PROJECTIONS_CSV}")
            continue
        findings = clean_text(row["findings"], cfg.xxxx)
        impression = clean_text(row["impression"], cfg.xxxx)
        target = {
            "findings": findings,
            "impression": impression,
            "findings+impression": join_sections(findings, impression),
        }[cfg.section]
        if not target:
            skip_study(uid, REASON_EMPTY_SECTION, f"section={cfg.section}", rows)
            continue
        if len(rows) < min_images:
            skip_study(uid, REASON_TOO_FEW_IMAGES, f"{len(rows)} usable < min_images={min_images}", rows)
            continue
        chosen = _select_views(rows, cfg.views)
        if chosen is None:
            skip_study(uid, REASON_NO_FRONTAL, "views=frontal", rows)
            continue
        chosen_names = {fn for fn, _ in chosen}
        skipped.extend(
            skip_entry(uid, fn, REASON_VIEW_NOT_SELECTED, f"views={cfg.views}")
            for fn, _ in rows
            if fn not in chosen_names
        )
        candidates.append(
            PlannedStudy(
                uid=uid,
                split="",
                filenames=[fn for fn, _ in chosen],
                projections=[p.strip() for _, p in chosen],
                findings=row["findings"].strip(),
                impression=row["impression"].strip(),
                report=target,
                mesh=row["MeSH"].strip(),
                problems=row["Problems"].strip(),
                indication=row["indication"].strip(),
            )
        )

    stats: dict = {}
    if cfg.split_file:
        membership, unmatched, how = read_split_file(cfg.split_file, list(report_rows), projections)
        stats["split_file"] = {"path": cfg.split_file, "unmatched_ids": unmatched, "matched_by": how}
        kept = []
        for study in candidates:
            split = membership.get(study.uid)
            if split is None:
                skip_study(
                    study.uid,
                    REASON_NOT_IN_SPLIT_FILE,
                    cfg.split_file,
                    list(zip(study.filenames, study.projections)),
                )
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
