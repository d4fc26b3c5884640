"""Reading generated and reference reports from JSONL or CSV files, for scoring any system's output.

`read_report_pairs` returns the predictions and references that `compute_radiology_report_scores` takes,
from one file with a prediction and a reference column (our `predictions.jsonl`), or from a predictions
file and a references file joined by an id column when both have one, else by row order.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)


class ReportFileError(ValueError):
    """A predictions or references file that cannot be read as asked (the message names the file and the fix)."""


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a JSONL (one JSON object per line) or CSV (header row) file.

    Args:
        path (`str` or `Path`): a `.jsonl` / `.ndjson` / `.json` (JSON Lines) or `.csv` file.

    Returns:
        `list[tuple[int, dict]]`: `(line number, row)` pairs in file order; blank JSONL lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ReportFileError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = []
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ReportFileError(
                        f"{path}, line {line_number}: not valid JSON ({error.msg}); JSON Lines files hold one "
                        "JSON object per line."
                    ) from error
                if not isinstance(row, dict):
                    raise ReportFileError(
                        f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}."
                    )
                records.append((line_number, row))
        return records
    if suffix in CSV_SUFFIXES:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ReportFileError(f"{path}: empty CSV file (a header row naming the columns is needed).")
            return [(line_number, row) for line_number, row in enumerate(reader, start=2)]
    raise ReportFileError(
        f"{path}: unknown file type {suffix!r}; use JSON Lines ({', '.join(JSONL_SUFFIXES)}) or CSV (.csv)."
    )


def _check_column(path: Path, records: list[tuple[int, dict]], column: str, option: str) -> None:
    if not records:
        raise ReportFileError(f"{path}: no rows to score.")
    for line_number, row in records:
        if column not in row:
            available = ", ".join(repr(k) for k in row) or "none"
            raise ReportFileError(
                f"{path}, line {line_number}: no {column!r} column/key (it has {available}); name the "
                f"right one with {option}."
            )


def _prediction(path: Path, line_number: int, value: Any) -> str:
    if value is None:  # a null prediction is an empty generation: scored, never dropped
        return ""
    if not isinstance(value, str):
        raise ReportFileError(
            f"{path}, line {line_number}: the prediction must be a string, got {type(value).__name__}."
        )
    return value


def _reference(path: Path, line_number: int, value: Any) -> str | list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):
        # A CSV cell cannot hold a list: several references are written as a JSON list of strings.
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(r, str) for r in parsed):
            value = parsed
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(r, str) for r in value):
        return value
    raise ReportFileError(
        f"{path}, line {line_number}: the reference must be a string or a non-empty list of strings, "
        f"got {value!r}."
    )


def _ids(path: Path, records: list[tuple[int, dict]], id_column: str) -> list[str] | None:
    """The ids of every row as strings (JSON `1` and CSV `"1"` match), or None if the file has no id column."""
    if not any(id_column in row for _, row in records):
        return None
    for line_number, row in records:
        if row.get(id_column) in (None, ""):
            raise ReportFileError(
                f"{path}, line {line_number}: empty {id_column!r}; give every row an id, or none (then "
                "the files are paired by row order)."
            )
    return [str(row[id_column]) for _, row in records]


def _unique_index(path: Path, ids: list[str], id_column: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, key in enumerate(ids):
        if key in index:
            raise ReportFileError(
                f"{path}: {id_column} {key!r} appears more than once; ids must be unique to join the "
                "predictions with the references (put several references of one study in one list)."
            )
        index[key] = position
    return index


def _sample(keys: list[str], count: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")


def read_report_pairs(
    predictions_path: str | Path,
    references_path: str | Path | None = None,
    prediction_column: str = "prediction",
    reference_column: str = "reference",
    id_column: str = "id",
) -> tuple[list[str], list[str | list[str]]]:
    """Predictions and their references, ready for `compute_radiology_report_scores`.

    Args:
        predictions_path (`str` or `Path`): JSONL or CSV with a `prediction_column`; without
            `references_path` it must hold a `reference_column` too.
        references_path (`str` or `Path`, *optional*): JSONL or CSV with a `reference_column`. Joined
            with the predictions by `id_column` when both files have it (every id once in each file, every
            id in both), else by row order (the counts must match).
        prediction_column (`str`, *optional*, defaults to `"prediction"`): the generated report's column/key;
            a missing (null) or empty value is an empty prediction, scored as such.
        reference_column (`str`, *optional*, defaults to `"reference"`): the reference's column/key; a
            string, or a list of strings for several references (in a CSV cell: a JSON list).
        id_column (`str`, *optional*, defaults to `"id"`): the study id used to join two files.

    Returns:
        `tuple[list[str], list[str | list[str]]]`: predictions and their references, in the predictions
        file's order.
    """
    predictions_path = Path(predictions_path)
    prediction_records = read_records(predictions_path)
    _check_column(predictions_path, prediction_records, prediction_column, "--prediction_column")
    predictions = [_prediction(predictions_path, n, row[prediction_column]) for n, row in prediction_records]

    if references_path is None:
        _check_column(predictions_path, prediction_records, reference_column, "--reference_column")
        references = [_reference(predictions_path, n, row[reference_column]) for n, row in prediction_records]
        return predictions, references

    references_path = Path(references_path)
    reference_records = read_records(references_path)
    _check_column(references_path, reference_records, reference_column, "--reference_column")
    references = [_reference(references_path, n, row[reference_column]) for n, row in reference_records]
    prediction_ids = _ids(predictions_path, prediction_records, id_column)
    reference_ids = _ids(references_path, reference_records, id_column)

    if prediction_ids is None or reference_ids is None:
        if len(predictions) != len(references):
            raise ReportFileError(
                f"{predictions_path} has {len(predictions)} predictions but {references_path} has "
                f"{len(references)} references; without an {id_column!r} column in both files they are "
                f"paired by row order, so the counts must match (or add ids, named by --id_column)."
            )
        logger.info("%r is not a column of both files: the files are paired by row order.", id_column)
        return predictions, references

    prediction_index = _unique_index(predictions_path, prediction_ids, id_column)
    reference_index = _unique_index(references_path, reference_ids, id_column)
    missing = [key for key in prediction_ids if key not in reference_index]
    if missing:
        raise ReportFileError(
            f"{references_path}: no reference for {len(missing)} {id_column}(s) of {predictions_path}: "
            f"{_sample(missing)}."
        )
    unscored = [key for key in reference_ids if key not in prediction_index]
    if unscored:
        raise ReportFileError(
            f"{predictions_path}: no prediction for {len(unscored)} {id_column}(s) of {references_path}: "
            f"{_sample(unscored)}. Every study must be scored (write an empty prediction for a system that "
            "produced nothing), or remove those studies from the references file."
        )
    return predictions, [references[reference_index[key]] for key in prediction_ids]


__all__ = ["ReportFileError", "read_records", "read_report_pairs"]
