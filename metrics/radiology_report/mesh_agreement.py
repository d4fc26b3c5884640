"""Agreement of the rule-based labeler with the human-coded MeSH column of the Indiana reports.

The Indiana University collection (Open-i) comes with a `MeSH` column coded by people from each report,
e.g. `"Cardiomegaly/mild;Pleural Effusion/right/small"` or `"normal"`. The labeler's rules were not
written on it, so it is an independent reference. The mapping of MeSH headings to CheXpert observations
is fixed in advance (issue 21) and is not tuned to the labeler:

- a study is positive for an observation when any of its MeSH terms has a heading (the part before the
  first "/") listed for that observation in `MESH_TO_CHEXPERT`;
- the labeler is positive when its label is 1; uncertain (-1) counts as **not** positive (Indiana's
  coders code what the report asserts);
- the macro F1 is the mean F1 over the 8 observations of `MESH_TO_CHEXPERT`. No Finding is left out:
  MeSH "normal" and CheXpert's No Finding mean different things.

Run it from the repository root (the CSV defaults to `../shared/data/iu_xray_reports_sample`):

```bash
python -m metrics.radiology_report.mesh_agreement [path/to/indiana_reports.csv]
```

```python
>>> from metrics.radiology_report.mesh_agreement import agreement_table, format_table
>>> rows = agreement_table("/path/to/indiana_reports.csv")  # doctest: +SKIP
>>> print(format_table(rows))  # doctest: +SKIP
```
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from .labeler import POSITIVE, UNCERTAIN, label_reports

MESH_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Cardiomegaly",),
    "Pleural Effusion": ("Pleural Effusion",),
    "Atelectasis": ("Pulmonary Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Fracture": ("Fractures, Bone",),
    "Edema": ("Pulmonary Edema", "Pulmonary Congestion"),
    "Lung Lesion": ("Nodule", "Mass"),
    "Support Devices": (
        "Catheters, Indwelling",
        "Surgical Instruments",
        "Implanted Medical Device",
        "Medical Device",
        "Tube, Inserted",
        "Pacemaker, Artificial",
    ),
}
"""CheXpert observation -> the MeSH headings that make a study positive for it (fixed, issue 21)."""

MACRO_OBSERVATIONS: tuple[str, ...] = tuple(MESH_TO_CHEXPERT)
"""The 8 observations averaged into the macro F1."""

DEFAULT_REPORTS_CSV = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "iu_xray_reports_sample" / "indiana_reports.csv"
)
"""`../shared/data/iu_xray_reports_sample/indiana_reports.csv` next to the checkout."""


def mesh_headings(mesh: str) -> set[str]:
    """The MeSH headings of one `MeSH` cell: `"Cardiomegaly/mild;Nodule/right"` -> `{"Cardiomegaly", "Nodule"}`."""
    return {term.split("/")[0].strip() for term in (mesh or "").split(";") if term.strip()}


def mesh_to_observations(mesh: str) -> set[str]:
    """The observations of `MACRO_OBSERVATIONS` a `MeSH` cell makes positive.

    Args:
        mesh (`str`): the `MeSH` cell of one report.

    Returns:
        `set[str]`: the positive observations (empty for `"normal"`).
    """
    headings = mesh_headings(mesh)
    return {obs for obs, listed in MESH_TO_CHEXPERT.items() if headings.intersection(listed)}


@dataclass
class AgreementRow:
    """Agreement of the labeler with MeSH for one observation.

    Args:
        observation (`str`): the observation.
        mesh_positive (`int`): reports MeSH codes positive.
        labeler_positive (`int`): reports the labeler calls positive.
        both (`int`): reports positive for both.
        n (`int`): reports compared.
    """

    observation: str
    mesh_positive: int
    labeler_positive: int
    both: int
    n: int

    @property
    def precision(self) -> float:
        return self.both / self.labeler_positive if self.labeler_positive else 0.0

    @property
    def recall(self) -> float:
        return self.both / self.mesh_positive if self.mesh_positive else 0.0

    @property
    def f1(self) -> float:
        denominator = self.mesh_positive + self.labeler_positive
        return 2 * self.both / denominator if denominator else 0.0


def read_reports(reports_csv: str | Path) -> list[dict[str, str]]:
    """Reads an Indiana `indiana_reports.csv` (columns uid, MeSH, findings, impression, ...).

    Args:
        reports_csv (`str` or `Path`): the CSV file.

    Returns:
        `list[dict[str, str]]`: its rows.
    """
    path = Path(reports_csv)
    if not path.is_file():
        raise FileNotFoundError(
            f"Indiana reports CSV not found at {path}: pass the path of indiana_reports.csv."
        )
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def report_text(row: dict[str, str]) -> str:
    """Findings and impression of one report row, joined (MeSH is coded from the whole report)."""
    parts = [(row.get("findings") or "").strip(), (row.get("impression") or "").strip()]
    return "\n".join(p for p in parts if p)


def agreement_table(
    reports_csv: str | Path = DEFAULT_REPORTS_CSV, uncertain: str = "negative"
) -> list[AgreementRow]:
    """Labels every non-empty report of an Indiana CSV and compares it with its MeSH column.

    Args:
        reports_csv (`str` or `Path`, *optional*): an `indiana_reports.csv`; defaults to `DEFAULT_REPORTS_CSV`.
        uncertain (`str`, *optional*, defaults to `"negative"`): whether the labeler's uncertain (-1) labels
            count as `"negative"` (the issue-21 figure) or `"positive"`.

    Returns:
        `list[AgreementRow]`: one row per observation of `MACRO_OBSERVATIONS`.
    """
    if uncertain not in ("positive", "negative"):
        raise ValueError(f"uncertain={uncertain!r} is not supported: use 'negative' or 'positive'.")
    positive = (POSITIVE, UNCERTAIN) if uncertain == "positive" else (POSITIVE,)
    rows = [r for r in read_reports(reports_csv) if report_text(r)]
    labels = label_reports([report_text(r) for r in rows])
    mesh = [mesh_to_observations(r.get("MeSH", "")) for r in rows]
    table = []
    for observation in MACRO_OBSERVATIONS:
        gold = [observation in m for m in mesh]
        pred = [lab[observation] in positive for lab in labels]
        table.append(
            AgreementRow(
                observation=observation,
                mesh_positive=sum(gold),
                labeler_positive=sum(pred),
                both=sum(g and p for g, p in zip(gold, pred)),
                n=len(gold),
            )
        )
    return table


def macro_f1(table: list[AgreementRow]) -> float:
    """Mean F1 over the rows of `MACRO_OBSERVATIONS`."""
    rows = [r for r in table if r.observation in MACRO_OBSERVATIONS]
    return sum(r.f1 for r in rows) / len(rows)


def format_table(table: list[AgreementRow]) -> str:
    """A Markdown table of the agreement rows plus the macro F1 line."""
    lines = [
        "| observation | MeSH + | labeler + | both | precision | recall | F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r.observation} | {r.mesh_positive} | {r.labeler_positive} | {r.both} | "
            f"{r.precision:.3f} | {r.recall:.3f} | {r.f1:.3f} |"
        )
    lines.append(f"| **macro F1 ({len(table)} observations)** | | | | | | **{macro_f1(table):.3f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prints the agreement table of `agreement_table` for the CSV given as the only argument."""
    argv = sys.argv[1:] if argv is None else argv
    reports_csv = Path(argv[0]) if argv else DEFAULT_REPORTS_CSV
    table = agreement_table(reports_csv)
    print(
        f"Labeler vs Indiana MeSH ({table[0].n} reports of {reports_csv}); uncertain counts as not positive:"
    )
    print(format_table(table))


if __name__ == "__main__":
    main()


__all__ = [
    "DEFAULT_REPORTS_CSV",
    "MESH_TO_CHEXPERT",
    "MACRO_OBSERVATIONS",
    "AgreementRow",
    "agreement_table",
    "format_table",
    "macro_f1",
    "main",
    "mesh_headings",
    "mesh_to_observations",
    "read_reports",
    "report_text",
]
