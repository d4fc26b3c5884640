"""The build plan every data format shares: which study goes into which split, and why every other input row
is skipped.

A format module (`indiana.py`, `mimic_cxr.py`; registered in `formats.py`) reads its own layout, checks the
header of every referenced image with `probe_row` (nothing is decoded here) and hands each study's usable
images and report sections to `plan_study`, which applies the options all formats share (target section,
minimum images, views). The builder encodes the planned images afterwards. `DataFormat` is what a format
module gives the builder.

Every report (study) and every image row ends up either in a planned study or in the skipped list
(`{"uid", "filename", "reason", "detail"}`; `filename` is None for a study-level entry).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import images as img
from .text_cleaning import XXXX_TOKEN, clean_text, join_sections

# study-level skip reasons every format uses (image-level ones live in images.py, format-specific ones in
# the format's module)
REASON_EMPTY_SECTION = "empty target section"
REASON_DUPLICATE_ROW = "duplicate projection row"
REASON_TOO_FEW_IMAGES = "too few usable images"
REASON_NO_FRONTAL = "no frontal view"
REASON_VIEW_NOT_SELECTED = "view not selected"


def read_csv_checked(
    path: Path,
    required: tuple[str, ...],
    hint: str = "",
    only_required: bool = False,
    header_only: bool = False,
) -> pd.DataFrame:
    """Reads a CSV (or a `.csv.gz`) as strings ("" for empty cells; quoted multi-line fields are supported).

    Args:
        path (`Path`): the file.
        required (`tuple[str, ...]`): the columns it must have.
        hint (`str`, defaults to ""): what the data folder should hold, for the not-found message.
        only_required (`bool`, defaults to False): read only the required columns (bounds the memory of wide
            files).
        header_only (`bool`, defaults to False): read the header and no row (to check the columns of a large
            table without holding it).

    Raises:
        FileNotFoundError: when the file is absent.
        ValueError: naming the file and the missing columns.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {hint}" if hint else f"{path} not found")
    usecols = (lambda column: column.strip() in required) if only_required else None
    try:
        df = pd.read_csv(
            path,
            dtype=str,
            keep_default_na=False,
            na_values=[],
            encoding="utf-8",
            usecols=usecols,
            nrows=0 if header_only else None,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, EOFError, OSError) as err:
        raise ValueError(f"{path} is not a readable CSV ({err}); expected columns {list(required)}") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path} is missing required column(s) {missing}; it has {list(df.columns)} and needs {list(required)}"
        )
    for col in df.columns:
        df[col] = df[col].astype(str)
    if "uid" in df.columns:
        df["uid"] = df["uid"].str.strip()
    return df


@dataclass(slots=True)
class PlannedStudy:
    """A study that goes into a split: its chosen images (not yet encoded) and its texts.

    With `report_file` set the texts are "" here: the study is planned from its report, and the encoding reads
    that file again (`DataFormat.texts_of`), so the plan held for every study is its ids and file names only.
    """

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
    report_file: str = ""

    def texts(self) -> dict[str, str]:
        """The example's text columns, as planned (all "" when they are read from `report_file`)."""
        return {name: getattr(self, name) for name in TEXT_COLUMNS}


TEXT_COLUMNS = ("findings", "impression", "report", "mesh", "problems", "indication")


def study_texts(
    cfg,
    findings: str,
    impression: str,
    *,
    mesh: str = "",
    problems: str = "",
    indication: str = "",
    token: re.Pattern = XXXX_TOKEN,
) -> dict[str, str]:
    """The text columns of an example (`TEXT_COLUMNS`): the raw sections stripped and `report`, the cleaned
    target section of `cfg.section` ("" when the study has none)."""
    clean_findings = clean_text(findings, cfg.xxxx, token)
    clean_impression = clean_text(impression, cfg.xxxx, token)
    target = {
        "findings": clean_findings,
        "impression": clean_impression,
        "findings+impression": join_sections(clean_findings, clean_impression),
    }[cfg.section]
    return {
        "findings": findings.strip(),
        "impression": impression.strip(),
        "report": target,
        "mesh": mesh.strip(),
        "problems": problems.strip(),
        "indication": indication.strip(),
    }


def skip_entry(uid: str, filename: str | None, reason: str, detail: str = "") -> dict:
    """One entry of the build report's `skipped` list (`filename` None: the study-level entry)."""
    return {"uid": uid, "filename": filename, "reason": reason, "detail": detail}


def skip_study(
    skipped: list[dict], uid: str, reason: str, detail: str = "", rows: Iterable[tuple[str, str]] = ()
) -> None:
    """Appends the study-level entry of `uid` and one entry per (filename, projection) row, all with `reason`."""
    skipped.append(skip_entry(uid, None, reason, detail))
    skipped.extend(skip_entry(uid, fn, reason, detail) for fn, _ in rows)


def probe_row(image_root: Path, uid: str, filename: str, max_image_pixels: int, skipped: list[dict]) -> bool:
    """Checks one referenced image's header without decoding it; a problem is appended to `skipped`.

    Args:
        image_root (`Path`): the folder `filename` is relative to (names escaping it are refused).
        uid (`str`): the study.
        filename (`str`): the image, relative to `image_root`.
        max_image_pixels (`int`): larger images are skipped.
        skipped (`list[dict]`): the build report's skipped list.

    Returns:
        `bool`: True when the image is usable.
    """
    try:
        img.probe_image(img.resolve_image_path(image_root, filename), max_image_pixels)
    except img.ImageProblem as problem:
        skipped.append(skip_entry(uid, filename, problem.reason, problem.detail))
        return False
    return True


def select_views(rows: list[tuple[str, str]], views: str) -> list[tuple[str, str]] | None:
    """Picks the images of a study from its usable (filename, projection) rows, in the given order.

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


def plan_study(
    cfg,
    uid: str,
    rows: list[tuple[str, str]],
    findings: str,
    impression: str,
    skipped: list[dict],
    *,
    mesh: str = "",
    problems: str = "",
    indication: str = "",
    token: re.Pattern = XXXX_TOKEN,
    report_file: str = "",
) -> PlannedStudy | None:
    """Applies the shared options to one study: the target section, `min_images` and the view selection.

    Args:
        cfg (`ChestXrayConfig`): the build options (`section`, `min_images`, `views`, `xxxx`).
        uid (`str`): the study id.
        rows (`list[tuple[str, str]]`): the study's usable (filename, projection) rows, in the order the
            views should be chosen from ("Frontal" / "Lateral" name the two views `views` knows).
        findings (`str`), impression (`str`): the raw sections (kept, stripped, in their columns).
        skipped (`list[dict]`): the build report's skipped list; a skipped study adds its entries here.
        mesh (`str`), problems (`str`), indication (`str`): the other text columns ("" where a format has none).
        token (`re.Pattern`, defaults to Indiana's `XXXX`): the format's anonymisation token.
        report_file (`str`, defaults to ""): the file the texts come from, when the encoding reads it again:
            the planned study then keeps no text (its memory is its ids and file names).

    Returns:
        `PlannedStudy | None`: the study without its split, or None when it was skipped.
    """
    texts = study_texts(
        cfg, findings, impression, mesh=mesh, problems=problems, indication=indication, token=token
    )
    if not texts["report"]:
        skip_study(skipped, uid, REASON_EMPTY_SECTION, f"section={cfg.section}", rows)
        return None
    min_images = max(cfg.min_images, 1)
    if len(rows) < min_images:
        skip_study(skipped, uid, REASON_TOO_FEW_IMAGES, f"{len(rows)} usable < min_images={min_images}", rows)
        return None
    chosen = select_views(rows, cfg.views)
    if chosen is None:
        skip_study(skipped, uid, REASON_NO_FRONTAL, "views=frontal", rows)
        return None
    chosen_names = {fn for fn, _ in chosen}
    skipped.extend(
        skip_entry(uid, fn, REASON_VIEW_NOT_SELECTED, f"views={cfg.views}")
        for fn, _ in rows
        if fn not in chosen_names
    )
    if report_file:
        texts = dict.fromkeys(TEXT_COLUMNS, "")
    return PlannedStudy(
        uid=uid,
        split="",
        filenames=[fn for fn, _ in chosen],
        projections=[p.strip() for _, p in chosen],
        report_file=report_file,
        **texts,
    )


@dataclass(frozen=True)
class DataFormat:
    """What the builder needs from one on-disk layout (`--format`); each format module defines one `FORMAT`.

    Args:
        name (`str`): the `--format` value.
        dataset_name (`str`): the `datasets` cache folder name.
        description (`str`), homepage (`str`), citation (`str`): the `DatasetInfo` fields.
        check_layout (`Callable[[Path, ChestXrayConfig], None]`): fails fast (missing files or columns) before
            anything large is read.
        fingerprint (`Callable[[hashlib._Hash, Path, ChestXrayConfig], None]`): hashes every input the build
            reads (file bytes or names, sizes and mtimes), without decoding an image.
        make_plan (`Callable[[ChestXrayConfig, Path], tuple[list[PlannedStudy], list[dict], dict]]`): the
            planned studies with their splits, the skipped entries and stats (`num_reports`,
            `num_projection_rows`, optionally `split_file`).
        image_root (`Callable[[Path], Path]`): the folder the planned filenames are relative to.
        texts_of (`Callable[[PlannedStudy, ChestXrayConfig], dict[str, str]] | None`): the text columns of a
            study planned with a `report_file` (read again by the process that encodes it); None when the plan
            keeps its texts.
        split_rule (`str`): how the splits are made, for the build report's `split_arithmetic`.
        unsupported_options (`dict[str, str]`): option -> why it does not apply; setting it is an error.
    """

    name: str
    dataset_name: str
    description: str
    homepage: str
    citation: str
    check_layout: Callable[..., None]
    fingerprint: Callable[..., None]
    make_plan: Callable[..., tuple[list[PlannedStudy], list[dict], dict]]
    image_root: Callable[[Path], Path]
    split_rule: str
    unsupported_options: dict[str, str] = field(default_factory=dict)
    texts_of: Callable[..., dict[str, str]] | None = None

    def example_texts(self, study: PlannedStudy, cfg) -> dict[str, str]:
        """The text columns of `study`'s example: read from its `report_file`, or as planned."""
        if study.report_file:
            if self.texts_of is None:
                raise ValueError(
                    f"format {self.name!r} planned study {study.uid} from a file but has no texts_of"
                )
            return self.texts_of(study, cfg)
        return study.texts()


def hash_file_stats(h: hashlib._Hash, root: Path, relpath: str) -> None:
    """Adds `relpath`'s name, size and mtime (or "missing") to the hash `h`, without reading the file."""
    try:
        st = (root / relpath).stat()
        h.update(f"{relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except (OSError, ValueError):  # absent, unreadable, or an invalid name
        h.update(f"{relpath}\0missing\n".encode())


def finding_set_novelty(mesh_by_split: dict[str, list[str]]) -> dict | None:
    """How many test studies show a set of findings that no training study shows.

    A study's finding set is the set of its MeSH terms, attributes included ("Pleural Effusion/right/small"),
    so a test study whose combination never occurs in training can only be described by reading its image;
    a retrieval floor (the nearest training study's report) gets at least one finding of it wrong. The
    clinical efficacy scores read only which observations a report names, not their sides or sizes: the
    fraction of test studies whose set of MeSH headings alone ("Pleural Effusion") no training study shows
    is what bounds a perfect retrieval floor on them.

    Args:
        mesh_by_split (`dict[str, list[str]]`): each split's MeSH column (";"-separated terms, "normal" or "").

    Returns:
        `dict | None`: `test_unseen_in_train` (the fraction), `num_test`, `num_test_unseen`,
        `distinct_train_sets` and `test_headings_unseen_in_train` (the fraction for the sets of headings,
        attributes dropped); None when the splits have no MeSH terms or no test study.
    """
    sets = {
        split: [frozenset(t.strip() for t in mesh.split(";") if t.strip()) for mesh in column]
        for split, column in mesh_by_split.items()
    }
    test = sets.get("test", [])
    if not test or not any(s for column in sets.values() for s in column):
        return None
    seen = set(sets.get("train", []))
    unseen = sum(s not in seen for s in test)

    def headings(terms: frozenset[str]) -> frozenset[str]:
        return frozenset(t.split("/")[0] for t in terms)

    seen_headings = {headings(s) for s in sets.get("train", [])}
    return {
        "test_unseen_in_train": round(unseen / len(test), 4),
        "num_test": len(test),
        "num_test_unseen": unseen,
        "distinct_train_sets": len(seen),
        "test_headings_unseen_in_train": round(
            sum(headings(s) not in seen_headings for s in test) / len(test), 4
        ),
    }
