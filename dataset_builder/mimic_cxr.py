"""MIMIC-CXR-JPG with the MIMIC-CXR free-text reports (`--format mimic-cxr`): credentialed PhysioNet data that
the user downloads under its data use agreement; nothing here fetches it.

```
DATA_DIR/                                  (MIMIC-CXR-JPG 2.0.0 or 2.1.0, as downloaded)
  mimic-cxr-2.0.0-split.csv.gz             dicom_id,study_id,subject_id,split  (train / validate / test)
  mimic-cxr-2.0.0-metadata.csv.gz          dicom_id,...,ViewPosition,...
  files/p10/p10000032/s50414267/<dicom_id>.jpg
REPORTS_DIR/                               (--reports_dir; defaults to DATA_DIR)
  files/p10/p10000032/s50414267.txt        (from MIMIC-CXR's mimic-cxr-reports.zip, one per study)
```

(an uncompressed `.csv` of either table is read too.) Reading, in the same study-level schema as Indiana:
- one example per study (`uid` = `study_id`, as in the CSVs); the images are the study's split-CSV rows
  (`image_filenames` relative to DATA_DIR: `files/p10/p10000032/s50414267/<dicom_id>.jpg`);
- the split is the official one (by patient): `train`, `validate` -> `validation`, `test`; no seed, no
  `--r2gen`, no `--split_file` (refused by name);
- `projections` from the metadata's `ViewPosition`: PA / AP -> "Frontal", LATERAL / LL -> "Lateral", any other
  value as written (LAO, AP AXIAL, ...; "" when absent or when the image has no metadata row), as Indiana keeps
  an unknown projection; the usable images are ordered frontal, lateral, others (the CSV order within each),
  then `--views` chooses as for Indiana;
- `findings` / `impression` / `indication` are the report's sections (`parse_report`: upper-case headers
  ending in a colon, wrapped and indented lines joined; `report` is the cleaned target section, the
  anonymisation token is MIMIC's `___`); `mesh` and `problems` (Indiana's MeSH / Problems columns) are "".

`num_reports` counts the studies of the split CSV and `num_projection_rows` its rows: each ends up in an example
or in `skipped` (a study with no report file: "report file missing"; no FINDINGS in a findings build:
"empty target section"; the image reasons of images.py). Reports of studies that the split CSV does not list,
and metadata rows of other images, are not read. A build that finds no report at all stops with an error
naming `--reports_dir`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

from .images import REASON_MISSING
from .study_plan import (
    REASON_DUPLICATE_ROW,
    DataFormat,
    PlannedStudy,
    plan_study,
    read_csv_checked,
    skip_entry,
    skip_study,
    study_texts,
)

logger = logging.getLogger(__name__)

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
IMAGE_FOLDER = "files"
SPLIT_REQUIRED = ("dicom_id", "study_id", "subject_id", "split")
METADATA_REQUIRED = ("dicom_id", "ViewPosition")
OFFICIAL_SPLITS = {"train": "train", "validate": "validation", "test": "test"}
FRONTAL_VIEWS = ("PA", "AP")
LATERAL_VIEWS = ("LATERAL", "LL")
ANON_TOKEN = re.compile(r"_{3,}")  # MIMIC's de-identification marker: "___"
MISSING_LAYOUT_HINT = (
    f"--data_dir must be the MIMIC-CXR-JPG folder holding {SPLIT_CSV}, {METADATA_CSV} and {IMAGE_FOLDER}/ "
    "(credentialed PhysioNet data: https://physionet.org/content/mimic-cxr-jpg/)"
)

T = TypeVar("T")
R = TypeVar("R")
LISTING_THREADS = 16  # directory listings, report stats and report reads in flight at once
REASON_NO_REPORT = "report file missing"
REASON_UNREADABLE_REPORT = "unreadable report file"

# upper-case section headers (normalised: inner whitespace collapsed) -> the column they fill; the last
# non-empty section of a kind wins (as in MIMIC-CXR's own section parser); other headers end a section
SECTION_NAMES = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "CONCLUSION": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "INDICATION": "indication",
    "CLINICAL INDICATION": "indication",
    "REASON FOR EXAM": "indication",
    "REASON FOR EXAMINATION": "indication",
}
_HEADER = re.compile(r"^\s*([A-Z][A-Z ()/,&-]*[A-Z)])\s*:(.*)$")


def parse_report(text: str) -> dict[str, str]:
    """Splits a MIMIC-CXR report into its sections.

    A header is an upper-case name followed by a colon at the start of a line ("FINDINGS:", " IMPRESSION: No
    acute process."); its section runs to the next header. "FINAL REPORT" and anything before the first
    header are no section.

    Args:
        text (`str`): the content of one `s<study_id>.txt`.

    Returns:
        `dict[str, str]`: "findings", "impression" and "indication" (those present), each with its lines
        stripped of their indentation and joined with newlines ("" for a header with no text).
    """
    found: dict[str, list[list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = _HEADER.match(line)
        if match:
            current = []
            name = SECTION_NAMES.get(" ".join(match.group(1).split()))
            if name:
                found.setdefault(name, []).append(current)
            if match.group(2).strip():
                current.append(match.group(2).strip())
        elif current is not None:
            current.append(line.strip())
    sections = {}
    for name, blocks in found.items():
        texts = ["\n".join(lines).strip() for lines in blocks]
        sections[name] = next((t for t in reversed(texts) if t), "")
    return sections


def projection_of(view_position: str) -> str:
    """ViewPosition -> "Frontal" (PA, AP), "Lateral" (LATERAL, LL), or the value as written."""
    view = view_position.strip()
    if view.upper() in FRONTAL_VIEWS:
        return "Frontal"
    if view.upper() in LATERAL_VIEWS:
        return "Lateral"
    return view


def _view_rank(row: tuple[str, str]) -> int:
    return {"Frontal": 0, "Lateral": 1}.get(row[1], 2)


def image_relpath(subject_id: str, study_id: str, dicom_id: str) -> str:
    """`files/p10/p10000032/s50414267/<dicom_id>.jpg` (relative to the data folder)."""
    return f"{IMAGE_FOLDER}/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_relpath(subject_id: str, study_id: str) -> str:
    """`files/p10/p10000032/s50414267.txt` (relative to the reports folder)."""
    return f"{IMAGE_FOLDER}/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


def table_path(data_dir: Path, name: str) -> Path:
    """`data_dir/name` (a `.csv.gz`), or its uncompressed `.csv` when only that one exists."""
    path = data_dir / name
    plain = data_dir / name.removesuffix(".gz")
    return plain if not path.is_file() and plain.is_file() else path


def _reports_root(data_dir: Path, cfg) -> Path:
    return Path(cfg.reports_dir) if cfg.reports_dir else data_dir


def _split_rows(data_dir: Path) -> list[tuple[str, str, str, str]]:
    table = read_csv_checked(table_path(data_dir, SPLIT_CSV), SPLIT_REQUIRED, MISSING_LAYOUT_HINT, True)
    columns = [table[c].str.strip() for c in ("study_id", "subject_id", "dicom_id", "split")]
    return list(zip(*columns))


def check_layout(data_dir: Path, cfg) -> None:
    """The split and metadata tables exist with their columns; `files/` and the reports folder exist.

    Raises:
        FileNotFoundError: naming the missing file or folder.
        ValueError: naming the table and its missing columns.
    """
    for name, required in ((SPLIT_CSV, SPLIT_REQUIRED), (METADATA_CSV, METADATA_REQUIRED)):
        read_csv_checked(table_path(data_dir, name), required, MISSING_LAYOUT_HINT, header_only=True)
    if not (data_dir / IMAGE_FOLDER).is_dir():
        raise FileNotFoundError(f"image folder {data_dir / IMAGE_FOLDER} not found: {MISSING_LAYOUT_HINT}")
    reports = _reports_root(data_dir, cfg)
    if not (reports / IMAGE_FOLDER).is_dir():
        raise FileNotFoundError(
            f"reports folder {reports / IMAGE_FOLDER} not found: the MIMIC-CXR reports (files/p10/p10000032/"
            "s50414267.txt, from mimic-cxr-reports.zip) go there; copy them into --data_dir or pass "
            "--reports_dir (reports_dir=) to the folder holding their files/"
        )


def threaded_map(fn: Callable[[T], R], items: list[T], batch: int = 256) -> Iterator[R]:
    """`map(fn, items)` on `LISTING_THREADS` threads, in order, with `batch` items a task (a task per item
    would cost more than a `stat`) and at most two tasks a thread in flight (what is read waits in memory only
    that far ahead of the consumer). For file-system calls, which release the GIL while they wait."""
    batches = (items[i : i + batch] for i in range(0, len(items), batch))
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        pending: deque = deque()
        for part in batches:
            pending.append(pool.submit(lambda p: [fn(item) for item in p], part))
            if len(pending) >= 2 * LISTING_THREADS:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _walk(folder: Path, prefix: str) -> list[str]:
    """Relative paths (`prefix/...`) of the files under `folder`, sorted, from directory listings only."""
    found: list[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        if entry.is_dir(follow_symlinks=True):
            found.extend(_walk(Path(entry.path), f"{prefix}/{entry.name}"))
        else:
            found.append(f"{prefix}/{entry.name}")
    return found


def list_files(root: Path) -> list[str]:
    """Every file under `root/files` as a path relative to `root` (`files/p10/p10000032/s50414267/x.jpg`), sorted.

    Read from directory listings only (no per-file `stat`), one patient folder per task on `LISTING_THREADS`
    threads, so a network file system answers many listings at once.

    Args:
        root (`Path`): the MIMIC-CXR-JPG folder (or the reports folder).

    Returns:
        `list[str]`: the relative paths, in sorted order (the same for the same tree).
    """
    top = root / IMAGE_FOLDER
    found = _walk_top_level(top)
    folders = [rel for rel, is_dir in found if is_dir]
    below = dict(zip(folders, threaded_map(lambda rel: _walk(root / rel, rel), folders, batch=16)))
    listing: list[str] = []
    for rel, is_dir in found:
        listing.extend(below[rel] if is_dir else [rel])
    return listing


def _walk_top_level(top: Path) -> list[tuple[str, bool]]:
    """(path relative to the data folder, is a folder) for the group folders' children (p10/p10000032) and
    any file on the way, sorted; a missing `top` gives nothing."""
    out: list[tuple[str, bool]] = []
    try:
        groups = sorted(os.scandir(top), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for group in groups:
        rel = f"{IMAGE_FOLDER}/{group.name}"
        if not group.is_dir(follow_symlinks=True):
            out.append((rel, False))
            continue
        for entry in sorted(os.scandir(group.path), key=lambda e: e.name):
            out.append((f"{rel}/{entry.name}", entry.is_dir(follow_symlinks=True)))
    return out


def _report_stat(path: Path) -> str:
    try:
        st = path.stat()
        return f"{st.st_size}\0{st.st_mtime_ns}"
    except (OSError, ValueError):
        return "missing"


def fingerprint(h: hashlib._Hash, data_dir: Path, cfg) -> None:
    """Adds both tables' bytes, the listing of `files/` (the names of the images and reports, no per-image
    `stat`) and the size and mtime of every referenced report (read on `LISTING_THREADS` threads) to `h`,
    without opening an image. An image replaced in place under the same name is not seen: rebuild with
    `force_rebuild=True` (--force_rebuild) after doing that."""
    for name in (SPLIT_CSV, METADATA_CSV):
        path = table_path(data_dir, name)
        h.update(path.name.encode())
        with path.open("rb") as table:  # in blocks: a table is never held whole
            for block in iter(lambda: table.read(1 << 20), b""):
                h.update(block)
    for i, rel in enumerate(list_files(data_dir)):
        h.update(f"{chr(10) if i else ''}{rel}".encode())
    reports = _reports_root(data_dir, cfg)
    report_names = sorted({report_relpath(subject, study) for study, subject, _, _ in _split_rows(data_dir)})
    stats = threaded_map(lambda rel: _report_stat(reports / rel), report_names)
    for rel, stat in zip(report_names, stats):
        h.update(f"{rel}\0{stat}\n".encode())


@dataclass
class _Study:
    subject_id: str
    split: str
    rows: list[tuple[str, str]] = field(default_factory=list)  # usable (filename, projection)


def _official_split(value: str, study_id: str, path: Path) -> str:
    split = OFFICIAL_SPLITS.get(value.lower())
    if split is None:
        raise ValueError(
            f"{path}: study {study_id} has split {value!r}; the official values are {list(OFFICIAL_SPLITS)}"
        )
    return split


def _read_report(path: Path) -> tuple[str | None, str | None]:
    """(text, None), (None, None) for a missing file, or (None, the error) for an unreadable one."""
    try:
        return path.read_text(encoding="utf-8"), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as err:
        return None, str(err)


def make_plan(cfg, data_dir: Path) -> tuple[list[PlannedStudy], list[dict], dict]:
    """Reads the split and metadata tables and the reports (on `LISTING_THREADS` threads), finds the images in
    the listing of `files/` (no image is opened here: `encode_image` checks each one as it decodes it) and
    applies the options.

    Args:
        cfg (`ChestXrayConfig`): the build options (`reports_dir` among them).
        data_dir (`Path`): the MIMIC-CXR-JPG folder.

    Returns:
        `tuple[list[PlannedStudy], list[dict], dict]`: the planned studies (each with its official split),
        the skipped entries, and stats (`num_reports`: studies in the split CSV, `num_projection_rows`: its rows).

    Raises:
        FileNotFoundError: when a table, `files/` or every report is missing.
        ValueError: when a table lacks a column, an id is not a number, a split value is not official, or a
            study is listed in two splits or under two patients.
    """
    split_path = table_path(data_dir, SPLIT_CSV)
    rows = _split_rows(data_dir)
    metadata = read_csv_checked(
        table_path(data_dir, METADATA_CSV), METADATA_REQUIRED, MISSING_LAYOUT_HINT, True
    )
    view_of = dict(zip(metadata["dicom_id"].str.strip(), metadata["ViewPosition"]))
    del metadata
    skipped: list[dict] = []
    studies: dict[str, _Study] = {}
    seen_rows: set[tuple[str, str]] = set()
    no_metadata = 0
    on_disk = set(list_files(data_dir))  # an image is opened once, when it is encoded
    for study_id, subject_id, dicom_id, split_value in rows:
        if not (study_id.isdigit() and subject_id.isdigit()):  # they name folders and the report file
            raise ValueError(
                f"{split_path}: the row of dicom_id {dicom_id!r} has study_id={study_id!r}, "
                f"subject_id={subject_id!r}; both must be numbers: fix the table"
            )
        split = _official_split(split_value, study_id, split_path)
        study = studies.setdefault(study_id, _Study(subject_id, split))
        if (study.split, study.subject_id) != (split, subject_id):
            raise ValueError(
                f"{split_path}: study {study_id} is listed as ({study.subject_id}, {study.split}) and as "
                f"({subject_id}, {split}); a study has one patient and one split: fix the table"
            )
        filename = image_relpath(subject_id, study_id, dicom_id)
        if (study_id, filename) in seen_rows:
            skipped.append(skip_entry(study_id, filename, REASON_DUPLICATE_ROW))
            continue
        seen_rows.add((study_id, filename))
        if dicom_id not in view_of:
            no_metadata += 1
        if filename not in on_disk:
            skipped.append(skip_entry(study_id, filename, REASON_MISSING, str(data_dir / filename)))
            continue
        study.rows.append((filename, projection_of(view_of.get(dicom_id, ""))))
    if no_metadata:
        logger.warning(
            "%d image(s) of %s have no row in %s: their projection is empty (neither frontal nor lateral)",
            no_metadata,
            split_path.name,
            table_path(data_dir, METADATA_CSV).name,
        )

    del on_disk, seen_rows
    reports = _reports_root(data_dir, cfg)
    candidates: list[PlannedStudy] = []
    num_read = 0
    paths = [reports / report_relpath(study.subject_id, study_id) for study_id, study in studies.items()]
    texts = threaded_map(_read_report, paths, batch=64)
    report_bar = tqdm(
        zip(studies.items(), paths, texts),
        total=len(studies),
        desc="Reading reports",
        unit="report",
        disable=len(studies) < 2000 or None,
    )
    for (study_id, study), path, (text, problem) in report_bar:
        usable = sorted(study.rows, key=_view_rank)  # frontal, lateral, others; CSV order within each
        if text is None:
            reason = REASON_NO_REPORT if problem is None else REASON_UNREADABLE_REPORT
            skip_study(
                skipped, study_id, reason, str(path) if problem is None else f"{path}: {problem}", usable
            )
            continue
        num_read += 1
        sections = parse_report(text)
        planned = plan_study(
            cfg,
            study_id,
            usable,
            sections.get("findings", ""),
            sections.get("impression", ""),
            skipped,
            indication=sections.get("indication", ""),
            token=ANON_TOKEN,
            report_file=report_relpath(study.subject_id, study_id),  # the encoding reads it again
        )
        if planned is not None:
            planned.split = study.split
            candidates.append(planned)
    if studies and not num_read:
        first_id, first = next(iter(studies.items()))
        raise FileNotFoundError(
            f"none of the {len(studies)} studies' reports is under {reports} (the first would be "
            f"{reports / report_relpath(first.subject_id, first_id)}); pass --reports_dir (reports_dir=) to the "
            "folder holding the MIMIC-CXR reports' files/ tree"
        )
    stats = {"num_reports": len(studies), "num_projection_rows": len(rows)}
    return candidates, skipped, stats


def texts_of(study: PlannedStudy, cfg) -> dict[str, str]:
    """The text columns of a planned study, from its report file (read again by the process that encodes it,
    so the plan held for every study keeps no text).

    Raises:
        ValueError: when the report is now missing, unreadable or without the target section (it changed
            after the build was planned: build again).
    """
    path = _reports_root(Path(cfg.data_dir), cfg) / study.report_file
    text, problem = _read_report(path)
    sections = parse_report(text) if text is not None else {}
    texts = study_texts(
        cfg,
        sections.get("findings", ""),
        sections.get("impression", ""),
        indication=sections.get("indication", ""),
        token=ANON_TOKEN,
    )
    if not texts["report"]:
        raise ValueError(
            f"report {path} of study {study.uid} changed while the dataset was built ("
            f"{problem or 'missing' if text is None else f'no {cfg.section} section now'}); build again"
        )
    return texts


FORMAT = DataFormat(
    name="mimic-cxr",
    dataset_name="mimic_cxr",
    description=(
        "MIMIC-CXR-JPG chest radiographs with the MIMIC-CXR free-text reports (PhysioNet, credentialed "
        "access): one example per study, official split."
    ),
    homepage="https://physionet.org/content/mimic-cxr-jpg/",
    citation=(
        "Johnson A.E.W. et al., MIMIC-CXR, a de-identified publicly available database of chest radiographs "
        "with free-text reports, Scientific Data 2019;6:317. Johnson A.E.W. et al., MIMIC-CXR-JPG, a large "
        "publicly available database of labeled chest radiographs, arXiv:1901.07042."
    ),
    check_layout=check_layout,
    fingerprint=fingerprint,
    make_plan=make_plan,
    image_root=lambda data_dir: data_dir,
    texts_of=texts_of,
    split_rule=f"the official split of {SPLIT_CSV} (by patient): train, validate -> validation, test",
    unsupported_options={
        "r2gen": "the R2Gen protocol is a 70/10/20 split of the Indiana studies; MIMIC-CXR has its official split",
        "split_file": f"MIMIC-CXR's split comes from {SPLIT_CSV}",
    },
)
