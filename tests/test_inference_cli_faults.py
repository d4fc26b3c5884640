"""`xraycap-caption` given a file it must not decode (over the 50 MP cap, or EPS, which Pillow decodes by running
Ghostscript): that study fails with its record naming the file, every other study is captioned, exit 1."""

from __future__ import annotations

import json

import pytest
from testing_utils import make_phantom_image
from usage_testing_utils import png_header_only, write_phantom_pngs

import caption


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One phantom frontal PNG."""
    frontal, _ = write_phantom_pngs(tmp_path_factory.mktemp("cli-fault-scans"), num_studies=1)[0]
    return frontal


def _huge_png(path):
    png_header_only(path, 8000, 7000)  # 56 MP: under Pillow's own limit, over the builder's 50 MP


def _eps(path):
    make_phantom_image("normal", size=40).save(path, format="EPS")


@pytest.mark.parametrize(
    ("name", "write", "error"), [("huge.png", _huge_png, "50,000,000"), ("film.eps", _eps, "PNG")]
)
def test_a_refused_image_fails_its_study_only_through_the_cli(
    name, write, error, model_dir, scan, tmp_path, capsys
):
    bad = tmp_path / name
    write(bad)
    argv = ["--model", str(model_dir), str(scan), str(bad), "-o", "-", "--no_findings", "--quiet"]
    assert caption.main(argv) == 1
    captured = capsys.readouterr()
    records = {r["id"]: r for r in map(json.loads, captured.out.splitlines())}
    assert records[str(scan)]["report"] and records[str(bad)]["report"] is None
    assert name in records[str(bad)]["error"] and error in records[str(bad)]["error"], records[str(bad)]
    assert "captioned 1 of 2" in captured.err
