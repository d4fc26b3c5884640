"""Split membership from an R2Gen-style `annotation.json`.

The file looks like `{"train": [{"id": "CXR2384_IM-0942", "image_path": [...], "report": ..., "split":
"train"}, ...], "val": [...], "test": [...]}`. R2Gen's ids come from the Open-i file names
`CXR<number>_IM-<series>-<image>.png`; the Kaggle copy renamed those files `<uid>_IM-<series>-<image>.dcm.png`,
with `<uid>` = the Open-i `<number>`. Every Open-i form is read: an extra `_<n>` after the number
(`CXR1_1_IM-0001-3001`, as in R2Gen's own annotation.json), a trailing image number or extension, a folder in
front (`NLMCXR_png/CXR1_1_IM-0001-4001.png`) or behind (`CXR1_1_IM-0001/0.png`), any case, and the Kaggle
file name itself (`1_IM-0001-4001.dcm.png`).

Mapping an id to a Kaggle uid (robust to either half being off):
1. exact: a row of `indiana_projections.csv` whose uid is `<number>` and whose filename starts with
   `<uid>_IM-<series>-` (the id's number AND series agree with the projections CSV);
2. number only: `<number>` is a uid of `indiana_reports.csv` (the series is not in the projections CSV:
   logged, counted under `matched_by["number_only"]`);
3. series only: the id's `IM-<series>` appears in the filenames of exactly one uid (the number was
   wrong); counted under `matched_by["series_only"]`.
Ids that match nothing are listed in the build report (`split_file.unmatched_ids`). The split names
"train" / "val" / "test" become "train" / "validation" / "test". A uid listed in two splits is an error.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

# the id, or a path whose first part naming a study is the id: CXR<number>[_<n>...]_IM-<series>[-<image>...]
_ID = re.compile(r"(?:^|[/\\])\s*(?:CXR)?(\d+)(?:_\d+)*_(IM-\d+)", re.IGNORECASE)
_FILENAME = re.compile(r"^(\d+)_(IM-\d+)-", re.IGNORECASE)
_SPLIT_NAMES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def parse_r2gen_id(example_id: str) -> tuple[str, str] | None:
    """ "CXR2384_IM-0942" -> ("2384", "IM-0942"), "CXR1_1_IM-0001-3001.png" -> ("1", "IM-0001"); None when
    the id has another shape."""
    m = _ID.search(str(example_id))
    if not m:
        return None
    return str(int(m.group(1))), m.group(2).upper()


def read_split_file(
    path: str | Path, report_uids: list[str], projections: pd.DataFrame
) -> tuple[dict[str, str], list[str], dict[str, int]]:
    """Maps the annotation file's ids to Kaggle uids.

    Args:
        path (`str` or `Path`): the annotation.json.
        report_uids (`list[str]`): uids of indiana_reports.csv.
        projections (`pd.DataFrame`): indiana_projections.csv (`uid`, `filename` columns).

    Returns:
        `(membership, unmatched_ids, matched_by)`: uid -> split name; ids that matched nothing; counts per
        matching rule.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"split_file {path} is not valid JSON ({err}); expected an R2Gen annotation.json"
        ) from None
    if not isinstance(data, dict) or not any(k in data for k in _SPLIT_NAMES):
        raise ValueError(
            f"split_file {path} must be a JSON object with keys 'train', 'val', 'test' (R2Gen format)"
        )
    unknown = [k for k in data if k not in _SPLIT_NAMES]
    if unknown:
        raise ValueError(f"split_file {path} has unknown split key(s) {unknown}; expected train / val / test")

    uid_set = set(report_uids)
    exact: dict[tuple[str, str], str] = {}
    series_uids: dict[str, set[str]] = defaultdict(set)
    for uid, filename in zip(projections["uid"], projections["filename"]):
        m = _FILENAME.match(str(filename).strip())
        if not m:
            continue
        series = m.group(2).upper()
        exact[(str(int(m.group(1))) if m.group(1).isdigit() else m.group(1), series)] = uid
        series_uids[series].add(uid)

    membership: dict[str, str] = {}
    unmatched: list[str] = []
    matched_by = {"exact": 0, "number_only": 0, "series_only": 0}
    for key, entries in data.items():
        split = _SPLIT_NAMES[key]
        for entry in entries:
            example_id = entry.get("id") if isinstance(entry, dict) else entry
            parsed = parse_r2gen_id(example_id)
            uid = None
            if parsed:
                number, series = parsed
                if (number, series) in exact:
                    uid, rule = exact[(number, series)], "exact"
                elif number in uid_set:
                    uid, rule = number, "number_only"
                elif len(series_uids.get(series, ())) == 1:
                    uid, rule = next(iter(series_uids[series])), "series_only"
            if uid is None:
                unmatched.append(str(example_id))
                continue
            matched_by[rule] += 1
            if uid in membership and membership[uid] != split:
                raise ValueError(
                    f"split_file {path}: {example_id!r} maps to uid {uid}, already in split {membership[uid]!r}; "
                    "a study must be in one split"
                )
            membership[uid] = split
    if unmatched:
        logger.warning("%d id(s) of %s match no study (first: %s)", len(unmatched), path, unmatched[:5])
    if matched_by["number_only"] or matched_by["series_only"]:
        logger.info("split_file ids matched without an exact series match: %s", matched_by)
    return membership, unmatched, matched_by
