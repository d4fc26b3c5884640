"""Agreement of the rule-based labeler with the human-coded MeSH column of the Indiana reports.

The Indiana University collection (Open-i) comes with a `MeSH` column coded by people from each report,
e.g. `"Cardiomegaly/mild;Pleural Effusion/right/small"` or `"normal"`. The labeler's rules were not
written on it, so it is an independent reference. The mapping of MeSH headings to CheXpert observations
is fixed in advance and is not tuned to the labeler:

- a study is positive for an observation when any of its MeSH terms has a heading (the part before the
  first "/") listed for that observation in `MESH_TO_CHEXPERT`;
- the labeler is positive when its label is 1; uncertain (-1) counts as **not** positive (Indiana's
  coders code what the report asserts);
- the macro F1 is the mean F1 over the observations of `MESH_TO_CHEXPERT` where F1 is defined (a MeSH or a
  labeler positive in the reports compared; all 8 on the whole sample). No Finding is left out: MeSH
  "normal" and CheXpert's No Finding mean different things.

**Held-out reports.** The labeler's rules up to commit ee554a4 were written while reading all 409 reports
of the shared sample, so the agreement on them is in-sample. From that commit on, a fixed third of the
sample is set aside (`is_held_out`: the SHA-256 of the uid, as an integer, divisible by 3; 136 of the 409
reports), chosen before any later rule was written and never read to write one. The figure is reported on
all reports, on the held-out ones and on the rest (`agreement_subsets`).

Run it from the repository root (the CSV defaults to `../shared/data/iu_xray_reports_sample`); `--output`
writes the tables with the commit, the machine and the CSV's SHA-256 (the README's figures come from
`metrics/radiology_report/results/mesh_agreement.json`, written this way):

```bash
python -m metrics.radiology_report.mesh_agreement [path/to/indiana_reports.csv] [--output results.json]
python -m metrics.radiology_report.mesh_agreement --what_if --output metrics/radiology_report/results/mesh_agreement_what_if.json
```

`--what_if` writes what the figure would be under rules the labeler does not follow (`what_if_record`: CheXpert's
"or" rule or its always-uncertain phrases switched off, uncertain counted as positive) and where the labeler and
MeSH disagree, by the labeler's label: the sources of the metric README's what-if figures. The variants are
measurements, not options: the labeler follows CheXpert.

```python
>>> from xraycap.radiology_report.mesh_agreement import agreement_table, format_table
>>> rows = agreement_table("/path/to/indiana_reports.csv")  # doctest: +SKIP
>>> print(format_table(rows))  # doctest: +SKIP
```
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import logging
import platform
import re
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

from . import labeler
from .labeler import POSITIVE, UNCERTAIN, label_reports

logger = logging.getLogger(__name__)

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
"""CheXpert observation -> the MeSH headings that make a study positive for it (fixed before any measurement)."""

MACRO_OBSERVATIONS: tuple[str, ...] = tuple(MESH_TO_CHEXPERT)
"""The 8 observations averaged into the macro F1."""

DEFAULT_REPORTS_CSV = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "iu_xray_reports_sample" / "indiana_reports.csv"
)
"""`../shared/data/iu_xray_reports_sample/indiana_reports.csv` next to the checkout."""


SUBSETS: tuple[str, ...] = ("all", "held_out", "rest")
"""The report subsets `agreement_subsets` reports: every report, the held-out third, the other two thirds ("rest")."""


def is_held_out(uid: str) -> bool:
    """Whether a report is in the fixed held-out third of the sample (never read to write a labeler rule).

    Args:
        uid (`str`): the report's `uid` cell.

    Returns:
        `bool`: True when the SHA-256 of the uid, read as an integer, is divisible by 3.
    """
    return int(hashlib.sha256(str(uid).encode("utf-8")).hexdigest(), 16) % 3 == 0


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
    reports_csv: str | Path = DEFAULT_REPORTS_CSV, uncertain: str = "negative", subset: str = "all"
) -> list[AgreementRow]:
    """Labels every non-empty report of an Indiana CSV and compares it with its MeSH column.

    Args:
        reports_csv (`str` or `Path`, *optional*): an `indiana_reports.csv`; defaults to `DEFAULT_REPORTS_CSV`.
        uncertain (`str`, *optional*, defaults to `"negative"`): whether the labeler's uncertain (-1) labels
            count as `"negative"` (the issue-21 figure) or `"positive"`.
        subset (`str`, *optional*, defaults to `"all"`): one of `SUBSETS`: every report, the held-out ones
            (`is_held_out`) or the others.

    Returns:
        `list[AgreementRow]`: one row per observation of `MACRO_OBSERVATIONS`.
    """
    if uncertain not in ("positive", "negative"):
        raise ValueError(f"uncertain={uncertain!r} is not supported: use 'negative' or 'positive'.")
    if subset not in SUBSETS:
        raise ValueError(f"subset={subset!r} is not supported: use one of {SUBSETS}.")
    positive = (POSITIVE, UNCERTAIN) if uncertain == "positive" else (POSITIVE,)
    rows = [r for r in read_reports(reports_csv) if report_text(r)]
    if subset != "all":
        rows = [r for r in rows if is_held_out(r.get("uid", "")) == (subset == "held_out")]
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


def agreement_subsets(reports_csv: str | Path = DEFAULT_REPORTS_CSV) -> dict[str, list[AgreementRow]]:
    """`agreement_table` on each subset of `SUBSETS` (uncertain counts as not positive).

    Args:
        reports_csv (`str` or `Path`, *optional*): an `indiana_reports.csv`; defaults to `DEFAULT_REPORTS_CSV`.

    Returns:
        `dict[str, list[AgreementRow]]`: subset name -> its table.
    """
    return {subset: agreement_table(reports_csv, subset=subset) for subset in SUBSETS}


def macro_f1(table: list[AgreementRow]) -> float:
    """Mean F1 over the rows of `MACRO_OBSERVATIONS` whose F1 is defined (a MeSH or a labeler positive)."""
    rows = [r for r in table if r.observation in MACRO_OBSERVATIONS and r.mesh_positive + r.labeler_positive]
    return sum(r.f1 for r in rows) / len(rows) if rows else 0.0


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
    defined = sum(1 for r in table if r.mesh_positive + r.labeler_positive)
    lines.append(f"| **macro F1 ({defined} observations)** | | | | | | **{macro_f1(table):.3f}** |")
    return "\n".join(lines)


_RESULTS_DIR = "metrics/radiology_report/results"


def _git_commit() -> str | None:
    """The checkout's commit, with "-dirty" when tracked files (results aside) differ from it; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{_RESULTS_DIR}"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one), the OS and the Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; {platform.system()} {platform.release()}; Python {platform.python_version()}"


def _provenance(reports_csv: Path) -> dict:
    """What produced a results file: the commit, the machine, the date, and the reports CSV with its SHA-256."""
    return {
        "commit": _git_commit(),
        "machine": _machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "reports_csv": reports_csv.name,
        "reports_csv_sha256": hashlib.sha256(reports_csv.read_bytes()).hexdigest(),
    }


def agreement_record(reports_csv: str | Path = DEFAULT_REPORTS_CSV) -> dict:
    """The tables of `agreement_subsets` with what produced them (commit, machine, the CSV's SHA-256).

    Args:
        reports_csv (`str` or `Path`, *optional*): an `indiana_reports.csv`; defaults to `DEFAULT_REPORTS_CSV`.

    Returns:
        `dict`: JSON-ready; `subsets[name]` has `n`, `macro_f1`, `no_finding_1` (reports the labeler calls
        No Finding) and one row per observation.
    """
    path = Path(reports_csv)
    tables = agreement_subsets(path)
    rows = [r for r in read_reports(path) if report_text(r)]
    labels = label_reports([report_text(r) for r in rows])
    no_finding = {
        name: sum(
            lab["No Finding"] == POSITIVE
            for r, lab in zip(rows, labels)
            if name == "all" or is_held_out(r.get("uid", "")) == (name == "held_out")
        )
        for name in SUBSETS
    }
    return {
        **_provenance(path),
        "uncertain": "negative",
        "held_out_rule": "sha256(uid) % 3 == 0, fixed before any rule written after commit ee554a4",
        "subsets": {
            name: {
                "n": table[0].n,
                "macro_f1": round(macro_f1(table), 4),
                "no_finding_1": no_finding[name],
                "rows": [asdict(r) | {"f1": round(r.f1, 4)} for r in table],
            }
            for name, table in tables.items()
        },
    }


# What-if variants: the labeler's rule patterns (module globals of `labeler`) switched off for one measurement.
_NEVER = re.compile(r"(?!)")
WHAT_IF_RULES: dict[str, tuple[str, ...]] = {
    "without_or_rule": ("_OR_BEFORE", "_OR_AFTER"),
    "without_always_uncertain_phrases": ("_ALWAYS_UNCERTAIN",),
    "without_or_rule_and_always_uncertain_phrases": ("_OR_BEFORE", "_OR_AFTER", "_ALWAYS_UNCERTAIN"),
}
"""What-if variant -> the labeler patterns it switches off: CheXpert's "A or B" rule, and its always-uncertain
phrases (vascular / pulmonary congestion, indistinctness, vascular prominence, borderline heart size)."""


@contextlib.contextmanager
def _rules_off(names: tuple[str, ...]):
    """Within the block, the labeler's patterns `names` match nothing (restored on exit)."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(labeler, name, _NEVER))
        yield


def _macro_by_subset(reports_csv: Path, uncertain: str = "negative") -> dict[str, float]:
    return {
        subset: round(macro_f1(agreement_table(reports_csv, uncertain=uncertain, subset=subset)), 4)
        for subset in SUBSETS
    }


def disagreements(reports_csv: str | Path = DEFAULT_REPORTS_CSV) -> dict[str, dict]:
    """Where the labeler and MeSH disagree on all reports, per observation: the reports MeSH codes positive that
    the labeler does not call positive, by the labeler's label ("-1", "0", "none": not mentioned), and the
    reports the labeler calls positive that MeSH does not code."""
    rows = [r for r in read_reports(reports_csv) if report_text(r)]
    labels = label_reports([report_text(r) for r in rows])
    mesh = [mesh_to_observations(r.get("MeSH", "")) for r in rows]
    found = {}
    for observation in MACRO_OBSERVATIONS:
        missed = Counter(
            str(lab[observation]).lower()
            for m, lab in zip(mesh, labels)
            if observation in m and lab[observation] != POSITIVE
        )
        extra = sum(observation not in m and lab[observation] == POSITIVE for m, lab in zip(mesh, labels))
        found[observation] = {"mesh_only_by_label": dict(sorted(missed.items())), "labeler_only": extra}
    return found


def what_if_record(reports_csv: str | Path = DEFAULT_REPORTS_CSV) -> dict:
    """The macro F1 on each subset now and under each what-if variant, with the disagreements and what produced
    them (commit, machine, the CSV's SHA-256).

    Args:
        reports_csv (`str` or `Path`, *optional*): an `indiana_reports.csv`; defaults to `DEFAULT_REPORTS_CSV`.

    Returns:
        `dict`: JSON-ready; `macro_f1[variant][subset]`, with the variants "now", `WHAT_IF_RULES`'s and
        "uncertain_positive" (the labeler's -1 counted as positive), and `disagreements` (`disagreements`).
    """
    path = Path(reports_csv)
    variants = {"now": _macro_by_subset(path)}
    for name, rules in WHAT_IF_RULES.items():
        with _rules_off(rules):
            variants[name] = _macro_by_subset(path)
    variants["uncertain_positive"] = _macro_by_subset(path, uncertain="positive")
    return {
        **_provenance(path),
        "what_if_rules": {name: list(rules) for name, rules in WHAT_IF_RULES.items()},
        "macro_f1": variants,
        "disagreements": disagreements(path),
    }


def main(argv: list[str] | None = None) -> None:
    """Prints the agreement tables (all reports, held-out, the rest); `--output` writes `agreement_record`."""
    parser = argparse.ArgumentParser(description="The labeler's agreement with the Indiana MeSH coding.")
    parser.add_argument("reports_csv", nargs="?", default=str(DEFAULT_REPORTS_CSV))
    parser.add_argument("--output", default=None, help="a JSON file for the tables, commit and machine")
    parser.add_argument(
        "--what_if",
        action="store_true",
        help="write what_if_record (the figure under rules the labeler does not follow, the disagreements) instead",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.what_if:
        record = what_if_record(args.reports_csv)
        print(json.dumps(record["macro_f1"], indent=1))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
            print(f"wrote {args.output}")
        return
    record = agreement_record(args.reports_csv)
    tables = {
        name: [AgreementRow(**{k: v for k, v in row.items() if k != "f1"}) for row in subset["rows"]]
        for name, subset in record["subsets"].items()
    }
    for name, table in tables.items():
        print(
            f"Labeler vs Indiana MeSH, {name} ({table[0].n} reports of {args.reports_csv}); "
            "uncertain counts as not positive:"
        )
        print(format_table(table) + "\n")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()


__all__ = [
    "DEFAULT_REPORTS_CSV",
    "MESH_TO_CHEXPERT",
    "MACRO_OBSERVATIONS",
    "AgreementRow",
    "SUBSETS",
    "agreement_record",
    "WHAT_IF_RULES",
    "agreement_subsets",
    "agreement_table",
    "disagreements",
    "is_held_out",
    "format_table",
    "macro_f1",
    "main",
    "mesh_headings",
    "mesh_to_observations",
    "read_reports",
    "report_text",
    "what_if_record",
]
