"""The labeler gives the CheXpert labeler's own published output on its sample reports, cell for cell.

The file is `labeled_reports.csv` of stanfordmlgroup/chexpert-labeler (commit 33be19f), kept in the shared
data folder (`../shared/data/chexpert_labeler_sample/`); the test skips where it is absent."""

import csv

import pytest
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS, label_reports


def _cell(value: str) -> int | None:
    """CheXpert's cell: "1.0" / "0.0" / "-1.0", or empty for "not mentioned"."""
    return None if value.strip() == "" else int(float(value))


@pytest.fixture(scope="module")
def chexpert_sample(shared_data):
    path = shared_data / "chexpert_labeler_sample" / "labeled_reports.csv"
    if not path.is_file():
        pytest.skip(f"the CheXpert labeler's sample output not found at {path}")
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_cell_equals_chexperts_output(chexpert_sample):
    """All 56 cells (4 reports x 14 observations) equal CheXpert's, blank = None (No Finding included)."""
    assert len(chexpert_sample) == 4
    assert set(CHEXPERT_OBSERVATIONS) <= set(chexpert_sample[0])
    ours = label_reports([row["Reports"] for row in chexpert_sample])
    cells = [
        (i, o, labels[o], _cell(row[o]))
        for i, (row, labels) in enumerate(zip(chexpert_sample, ours))
        for o in CHEXPERT_OBSERVATIONS
    ]
    assert len(cells) == 56
    wrong = [(i, o, got, expected) for i, o, got, expected in cells if got != expected]
    assert not wrong, f"(report, observation, ours, CheXpert's): {wrong}"
