"""Agreement of the rule-based labeler with the human-coded MeSH column of the Indiana reports.

The Indiana University collection (Open-i) comes with a `MeSH` column coded by people from each
report, e.g. `"Cardiomegaly/mild;Pleural Effusion/right/small"` or `"normal"`. Mapping MeSH headings
to CheXpert observations gives an independent reference for the labeler. The mapping
(`MESH_TO_CHEXPERT`) is ours and is stated in full so the figures can be checked:

- a MeSH term counts for an observation when its heading (the part before the first "/") is listed;
- "No Finding" is positive when no MeSH term of the report maps to one of the 12 pathology
  observations (the CheXpert definition, so devices, spine degeneration or hyperinflation do not
  break it); the stricter reading "MeSH says exactly `normal`" is reported as an extra row;
- the labeler's uncertain labels count as positive (U-Ones, the metric's CE default) or as negative
  (U-Zeros), `agreement_table(..., uncertain=...)`; Indiana's coders mostly leave hedged findings
  ("may represent atelectasis") uncoded, so U-Zeros agrees better with MeSH.

Usage:

```python
>>> from metrics.radiology_report.mesh_agreement import agreement_table, format_table
>>> rows = agreement_table("/path/to/indiana_reports.csv")  # doctest: +SKIP
>>> print(format_table(rows))  # doctest: +SKIP
```
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .labeler import CHEXPERT_OBSERVATIONS, PATHOLOGY_OBSERVATIONS, label_reports

MESH_TO_CHEXPERT: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Cardiomegaly",),
    "Cardiac Shadow": ("Cardiomegaly",),  # only coded as "Cardiac Shadow/enlarged" in the sample
    "Pleural Effusion": ("Pleural Effusion",),
    "Pulmonary Atelectasis": ("Atelectasis",),
    "Atelectases": ("Atelectasis",),
    "Pneumothorax": ("Pneumothorax",),
    "Fractures, Bone": ("Fracture",),
    "Pulmonary Edema": ("Edema",),
    "Pulmonary Congestion": ("Edema",),
    "Heart Failure": ("Edema",),
    "Nodule": ("Lung Lesion",),
    "Mass": ("Lung Lesion",),
    "Granuloma": ("Lung Lesion",),
    "Calcified Granuloma": ("Lung Lesion",),
    "Granulomatous Disease": ("Lung Lesion",),
    "Lung Neoplasms": ("Lung Lesion",),
    "Catheters, Indwelling": ("Support Devices",),
    "Implanted Medical Device": ("Support Devices",),
    "Medical Device": ("Support Devices",),
    "Stents": ("Support Devices",),
    "Tube, Inserted": ("Support Devices",),
    "Surgical Instruments": ("Support Devices",),
    "Sutures": ("Support Devices",),
    "Pacemaker, Artificial": ("Support Devices",),
    "Heart Valve Prosthesis": ("Support Devices",),
    "Prostheses and Implants": ("Support Devices",),
    "Electrodes": ("Support Devices",),
    "Consolidation": ("Consolidation",),
    "Pneumonia": ("Pneumonia",),
    "Opacity": ("Lung Opacity",),
    "Infiltrate": ("Lung Opacity",),
    "Airspace Disease": ("Lung Opacity",),
    "Pleura": ("Pleural Other",),
    "Lung Diseases, Interstitial": ("Lung Opacity",),
}
"""MeSH heading -> CheXpert observations it implies."""

MACRO_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Cardiomegaly",
    "Pleural Effusion",
    "Atelectasis",
    "Pneumothorax",
    "Fracture",
    "Edema",
    "Lung Lesion",
    "Support Devices",
)
"""The observations averaged into the macro agreement (those MeSH codes reliably)."""

EXTRA_OBSERVATIONS: tuple[str, ...] = ("Lung Opacity", "Consolidation", "Pneumonia")
"""Reported in the table but not averaged: MeSH codes them loosely ("Opacity", "Airspace Disease")."""


def mesh_to_observations(mesh: str) -> set[str]:
    """Maps a MeSH cell ("Cardiomegaly/mild;Pleural Effusion/right") to the CheXpert observations it implies.

    Args:
        mesh (`str`): the `MeSH` cell of one report.

    Returns:
        `set[str]`: the positive observations, "No Finding" included when no pathology is coded.
    """
    found: set[str] = set()
    for term in (mesh or "").split(";"):
        parts = [p.strip().lower() for p in term.split("/")]
        heading = term.split("/")[0].strip()
        found.update(MESH_TO_CHEXPERT.get(heading, ()))
        # Qualified headings: interstitial markings are a Lung Opacity in CheXpert, a prominent or
        # widened mediastinum an Enlarged Cardiomediastinum.
        if heading in ("Markings", "Lung") and "interstitial" in parts:
            found.add("Lung Opacity")
        if heading == "Mediastinum" and {"prominent", "widened", "enlarged"} & set(parts):
            found.add("Enlarged Cardiomediastinum")
    if not found.intersection(PATHOLOGY_OBSERVATIONS):
        found.add("No Finding")
    return found


@dataclass
class AgreementRow:
    """Agreement of the labeler with MeSH for one observation.

    Args:
        observation (`str`): the observation (or an extra row's name).
        mesh_positive (`int`): reports MeSH codes positive.
        labeler_positive (`int`): reports the labeler calls positive (or uncertain, under U-Ones).
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

    @property
    def accuracy(self) -> float:
        disagreements = self.mesh_positive + self.labeler_positive - 2 * self.both
        return 1.0 - disagreements / self.n if self.n else 0.0

    @property
    def kappa(self) -> float:
        """Cohen's kappa of the two binary codings."""
        if not self.n:
            return 0.0
        p_o = self.accuracy
        p_yes = (self.mesh_positive / self.n) * (self.labeler_positive / self.n)
        p_no = (1 - self.mesh_positive / self.n) * (1 - self.labeler_positive / self.n)
        p_e = p_yes + p_no
        return (p_o - p_e) / (1 - p_e) if p_e < 1 else 1.0


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


def agreement_table(reports_csv: str | Path, uncertain: str = "positive") -> list[AgreementRow]:
    """Labels every report of an Indiana CSV and compares with its MeSH column.

    Args:
        reports_csv (`str` or `Path`): an `indiana_reports.csv`.
        uncertain (`str`, *optional*, defaults to `"positive"`): whether the labeler's uncertain (-1) labels
            count as `"positive"` or `"negative"`.

    Returns:
        `list[AgreementRow]`: one row per observation of `MACRO_OBSERVATIONS`, then
        `EXTRA_OBSERVATIONS`, then "No Finding (MeSH 'normal')".
    """
    if uncertain not in ("positive", "negative"):
        raise ValueError(f"uncertain={uncertain!r} is not supported: use 'positive' or 'negative'.")
    positive = (1, -1) if uncertain == "positive" else (1,)
    rows = [r for r in read_reports(reports_csv) if report_text(r)]
    labels = label_reports([report_text(r) for r in rows])
    mesh = [mesh_to_observations(r.get("MeSH", "")) for r in rows]
    table = []
    for observation in MACRO_OBSERVATIONS + EXTRA_OBSERVATIONS:
        gold = [observation in m for m in mesh]
        pred = [lab[observation] in positive for lab in labels]
        table.append(_row(observation, gold, pred))
    gold = [(r.get("MeSH") or "").strip().lower() == "normal" for r in rows]
    pred = [lab["No Finding"] == 1 for lab in labels]
    table.append(_row("No Finding (MeSH 'normal')", gold, pred))
    return table


def _row(name: str, gold: list[bool], pred: list[bool]) -> AgreementRow:
    return AgreementRow(
        observation=name,
        mesh_positive=sum(gold),
        labeler_positive=sum(pred),
        both=sum(g and p for g, p in zip(gold, pred)),
        n=len(gold),
    )


def macro_f1(table: list[AgreementRow]) -> float:
    """Mean F1 over `MACRO_OBSERVATIONS`."""
    rows = [r for r in table if r.observation in MACRO_OBSERVATIONS]
    return sum(r.f1 for r in rows) / len(rows)


def format_table(table: list[AgreementRow]) -> str:
    """A Markdown table of the agreement rows plus the macro F1 line."""
    lines = [
        "| observation | MeSH + | labeler + | both | precision | recall | F1 | kappa |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        name = r.observation if r.observation in MACRO_OBSERVATIONS else f"*{r.observation}*"
        lines.append(
            f"| {name} | {r.mesh_positive} | {r.labeler_positive} | {r.both} | {r.precision:.3f} | "
            f"{r.recall:.3f} | {r.f1:.3f} | {r.kappa:.3f} |"
        )
    lines.append(
        f"| **macro F1 ({len(MACRO_OBSERVATIONS)} observations)** | | | | | | **{macro_f1(table):.3f}** | |"
    )
    return "\n".join(lines)


__all__ = [
    "CHEXPERT_OBSERVATIONS",
    "MESH_TO_CHEXPERT",
    "MACRO_OBSERVATIONS",
    "EXTRA_OBSERVATIONS",
    "AgreementRow",
    "agreement_table",
    "format_table",
    "macro_f1",
    "mesh_to_observations",
    "read_reports",
    "report_text",
]
