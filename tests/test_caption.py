"""caption.py: the `xraycap-caption` command line."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from usage_testing_utils import write_phantom_pngs

import caption
from metrics.radiology_report.labeler import label_reports

# The tiny test model generates with repetition_penalty (see usage_testing_utils.make_tiny).
pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """3 phantom studies: frontal PNGs in scans/, laterals in laterals/."""
    root = tmp_path_factory.mktemp("phantoms")
    pairs = write_phantom_pngs(root / "all", num_studies=3)
    scans, laterals = root / "scans", root / "laterals"
    scans.mkdir()
    laterals.mkdir()
    out = []
    for frontal, lateral in pairs:
        f, lat = scans / frontal.name, laterals / lateral.name
        frontal.rename(f)
        lateral.rename(lat)
        out.append((f, lat))
    return out


def _generate(loaded, studies, **kwargs):
    model, processor = loaded
    with torch.no_grad():
        ids = model.generate(**processor(images=studies, return_tensors="pt"), **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)


def test_folder_with_one_bad_file_jsonl(model_dir, loaded, phantoms, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for frontal, _ in phantoms:
        (folder / frontal.name).write_bytes(frontal.read_bytes())
    (folder / "study01_zbroken.png").write_text("this is not a PNG")  # sorts between the good ones
    (folder / "notes.txt").write_text("not an image extension: skipped, not an error")
    output = tmp_path / "out" / "reports.jsonl"

    code = caption.main(["--model", str(model_dir), str(folder), "--output", str(output), "--quiet"])

    assert code == 1  # exactly because one input failed
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == sorted(str(p) for p in folder.glob("*.png"))
    bad = [r for r in records if r["error"]]
    good = [r for r in records if not r["error"]]
    assert len(bad) == 1 and bad[0]["id"].endswith("study01_zbroken.png")
    assert "not a readable image" in bad[0]["error"] and bad[0]["report"] is None
    assert len(good) == 3
    # Every good image is captioned, with what the model itself writes for it.
    expected = _generate(loaded, [[folder / frontal.name] for frontal, _ in phantoms])
    assert [r["report"] for r in good] == expected
    assert all(r["report"] for r in good)
    # The labeler's findings per image.
    for record, labels in zip(good, label_reports(expected)):
        assert record["findings"] == {name: labels[name] for name in caption.CHEXPERT_OBSERVATIONS}
    err = capsys.readouterr().err
    assert "study01_zbroken.png" in err and "captioned 3 of 4 studies" in err and "1 failed" in err


def test_command_line_all_good_exit_zero(model_dir, phantoms, tmp_path):
    """The installed-style command, end to end in a fresh process: `python caption.py ...`."""
    output = tmp_path / "reports.jsonl"
    scans = phantoms[0][0].parent
    result = subprocess.run(
        [
            sys.executable,
            caption.__file__,
            "--model",
            str(model_dir),
            str(scans),
            "-o",
            str(output),
            "--batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 3 and all(r["report"] and r["error"] is None for r in records)
    assert "captioned 3 of 3 studies" in result.stderr


def test_pairs_csv_beams_and_csv_output(model_dir, loaded, phantoms, tmp_path):
    pairs_csv = tmp_path / "pairs.csv"
    with pairs_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "frontal", "lateral"])
        writer.writerow(["s0", phantoms[0][0], phantoms[0][1]])
        writer.writerow(["s1", phantoms[1][0], ""])  # frontal only
        writer.writerow(["s2", phantoms[2][0], tmp_path / "missing_lateral.png"])
    output = tmp_path / "reports.csv"
    code = caption.main(
        ["--model", str(model_dir), "--pairs", str(pairs_csv), "--num_beams", "2", "--max_new_tokens", "12"]
        + ["--output", str(output), "--quiet"]
    )
    assert code == 1
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"]
    expected = _generate(loaded, [list(phantoms[0]), [phantoms[1][0]]], num_beams=2, max_new_tokens=12)
    assert [rows[0]["report"], rows[1]["report"]] == expected
    assert rows[0]["lateral"] and not rows[1]["lateral"]
    assert "file not found" in rows[2]["error"] and rows[2]["report"] == ""
    assert set(caption.CHEXPERT_OBSERVATIONS) <= set(rows[0])
    assert rows[0]["Cardiomegaly"] in {"", "1", "0", "-1"}


def test_lateral_flag_text_on_stdout(model_dir, loaded, phantoms, capsys):
    frontal, lateral = phantoms[0]
    code = caption.main(["--model", str(model_dir), str(frontal), "--lateral", str(lateral), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    report = _generate(loaded, [[frontal, lateral]])[0]
    assert f"== {frontal} + {lateral}" in out
    assert report in out and "findings:" in out


def test_glob_missing_and_truncated_files(model_dir, phantoms, tmp_path, capsys):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(phantoms[0][0].read_bytes()[:60])
    scans = phantoms[0][0].parent
    code = caption.main(
        ["--model", str(model_dir), str(scans / "*_frontal.png"), str(tmp_path / "nope.png")]
        + [str(truncated), str(tmp_path / "empty-*.png"), "-o", "-", "--no_findings", "--quiet"]
    )
    assert code == 1
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == 3 + 3
    assert [bool(r["report"]) for r in records[:3]] == [True, True, True]
    assert all(r["findings"] is None for r in records)  # --no_findings
    errors = {r["id"]: r["error"] for r in records[3:]}
    assert "file not found" in errors[str(tmp_path / "nope.png")]
    assert "not a readable image" in errors[str(truncated)]
    assert "no file matches" in errors[str(tmp_path / "empty-*.png")]
    assert "3 failed" in captured.err


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no inputs
        ["x.png", "--output", "out.txt"],  # unknown output format
        ["a.png", "b.png", "--lateral", "c.png"],  # --lateral needs one frontal
        ["x.png", "--num_beams", "0"],
        ["x.png", "--no_such_flag"],
    ],
)
def test_usage_errors_exit_2(model_dir, argv, capsys):
    assert caption.main(["--model", str(model_dir), *argv]) == 2
    assert "error" in capsys.readouterr().err


def test_missing_model_folder_exit_2(tmp_path, phantoms, capsys):
    assert caption.main(["--model", str(tmp_path / "no-model"), str(phantoms[0][0])]) == 2
    assert "not found" in capsys.readouterr().err
