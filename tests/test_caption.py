"""The `xraycap-caption` command line (`xraycap/caption.py`): inputs, outputs, exit codes and the faults it survives."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from testing_utils import make_phantom_image
from usage_testing_utils import png_header_only, write_model_card, write_phantom_pngs
from xraycap.radiology_report.labeler import label_reports

from xraycap import caption
from xraycap.training.model_card import SYNTHETIC_DATASET

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")


# --------------------------------------------------------------------------------------------------
# Files, folders, globs, pairs and their outputs
# --------------------------------------------------------------------------------------------------


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
    """The installed-style command, end to end in a fresh process: `python -m xraycap.caption ...`."""
    output = tmp_path / "reports.jsonl"
    scans = phantoms[0][0].parent
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xraycap.caption",
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


# --------------------------------------------------------------------------------------------------
# The caption command runs only the model the user named, through the model folder's pipeline, and loses nothing.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """3 phantom frontal PNGs in one folder."""
    root = tmp_path_factory.mktemp("cli-scans")
    pairs = write_phantom_pngs(root / "all", num_studies=3)
    folder = root / "scans"
    folder.mkdir()
    for frontal, _ in pairs:
        frontal.rename(folder / frontal.name)
    return sorted(folder.iterdir())


@pytest.fixture
def loads(monkeypatch):
    """Record every AutoConfig/AutoModel/AutoProcessor.from_pretrained call (and fail it: no download happens)."""
    calls = []

    def record(name):
        def from_pretrained(source, *args, **kwargs):
            calls.append((name, str(source), kwargs))
            raise OSError(f"{source}: not loaded in this test")

        return from_pretrained

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record("config"))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", record("model"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", record("processor"))
    return calls


# ------------------------------------------------------------------------------ which model is loaded
def test_typo_model_path_is_an_error_not_a_download(tmp_path, monkeypatch, scans, loads, capsys):
    """`--model outputs/xraycap-iu` under an existing outputs/ folder: exit 2 naming the path, nothing loaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("outputs/xraycap-iu", "./xraycap-iu", "~/no-such-xraycap-model"):
        assert caption.main(["--model", name, str(scans[0])]) == 2
        err = capsys.readouterr().err
        assert name in err and "not found" in err
    assert loads == []  # nothing was fetched, no remote code ran


def test_hub_id_needs_trust_remote_code_and_takes_revision(tmp_path, monkeypatch, scans, loads, capsys):
    monkeypatch.chdir(tmp_path)
    assert caption.main(["--model", "someone/xraycap-iu", str(scans[0])]) == 2
    assert "--trust_remote_code" in capsys.readouterr().err and loads == []

    argv = ["--model", "someone/xraycap-iu", "--trust_remote_code", "--revision", "0123abc", str(scans[0])]
    assert caption.main(argv) == 2  # the fake loader raises OSError: reported as a usage error
    assert loads[0][:2] == ("config", "someone/xraycap-iu")  # the pipeline reads the config first
    assert loads[0][2]["trust_remote_code"] is True and loads[0][2]["revision"] == "0123abc"


# ------------------------------------------------------------------------------------- nothing lost
def test_crash_mid_run_keeps_the_finished_batches(model_dir, scans, tmp_path, monkeypatch):
    real_load = caption.load_pipeline
    calls = []

    def load_then_crash_in_the_second_batch(*args, **kwargs):
        captioner = real_load(*args, **kwargs)
        real_generate = captioner.model.generate

        def generate_then_crash(*generate_args, **generate_kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected crash in the second batch")
            return real_generate(*generate_args, **generate_kwargs)

        monkeypatch.setattr(captioner.model, "generate", generate_then_crash)
        return captioner

    monkeypatch.setattr(caption, "load_pipeline", load_then_crash_in_the_second_batch)
    for suffix in (".jsonl", ".csv"):
        output = tmp_path / f"reports{suffix}"
        calls.clear()
        argv = ["--model", str(model_dir), str(scans[0].parent), "--batch_size", "1", "-o", str(output)]
        with pytest.raises(RuntimeError, match="injected crash"):
            caption.main([*argv, "--quiet"])
        if suffix == ".jsonl":
            records = [json.loads(line) for line in output.read_text().splitlines()]
        else:
            with output.open(newline="") as handle:
                records = list(csv.DictReader(handle))
        assert [r["id"] for r in records] == [str(scans[0])]
        assert records[0]["report"]


def test_decompression_bomb_fails_one_study_only(model_dir, scans, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)  # 400 MP: Pillow's DecompressionBombError on open
    argv = ["--model", str(model_dir), str(scans[0]), str(bomb), "-o", "-", "--no_findings", "--quiet"]
    assert caption.main(argv) == 1
    captured = capsys.readouterr()
    records = {r["id"]: r for r in map(json.loads, captured.out.splitlines())}
    assert records[str(scans[0])]["report"] and records[str(bomb)]["report"] is None
    assert "bomb.png" in records[str(bomb)]["error"] and "captioned 1 of 2" in captured.err


def test_pairs_csv_with_bom_is_read(model_dir, scans, tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"id,frontal,lateral\ns0,{scans[0]},\n", encoding="utf-8-sig")  # as Excel saves
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(model_dir), "--pairs", str(pairs), "-o", str(output), "--no_findings", "--quiet"]
    assert caption.main(argv) == 0
    assert [json.loads(line)["id"] for line in output.read_text().splitlines()] == ["s0"]


def test_pairs_csv_in_another_encoding_is_a_clear_error(model_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("id,frontal,lateral\nrégion,radiographie_é.png,\n".encode("latin-1"))
    assert caption.main(["--model", str(model_dir), "--pairs", str(pairs), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pairs.csv" in err and "UTF-8" in err


# ---------------------------------------------------------------------------- what the model knows
@pytest.mark.parametrize(
    "dataset_id, description, warned",
    [
        (SYNTHETIC_DATASET, "24 synthetic phantom chest radiograph studies.", True),
        ("raddar/chest-xrays-indiana-university", "Indiana University chest X-rays.", False),
    ],
)
def test_phantom_trained_model_warns_beside_every_report(
    model_dir, scans, tmp_path, capsys, dataset_id, description, warned
):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    write_model_card(folder, dataset_id, description)
    assert ModelCard.load(folder / "README.md").data.eval_results[0].dataset_type == dataset_id
    output = tmp_path / "out.jsonl"
    argv = ["--model", str(folder), str(scans[0].parent), "-o", str(output), "--no_findings", "--quiet"]
    assert caption.main(argv) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    err = capsys.readouterr().err
    assert len(records) == 3
    if warned:
        assert all("synthetic phantom" in r["warning"] for r in records)
        assert err.count(records[0]["warning"]) == 1  # stderr says it once
    else:
        assert all(r["warning"] is None for r in records) and "synthetic phantom" not in err


def test_folder_without_the_pipeline_is_a_clear_error(model_dir, scans, tmp_path, capsys):
    """A folder whose config declares no image-to-text pipeline: exit 2 with the fix, not a traceback."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["custom_pipelines"]
    (folder / "config.json").write_text(json.dumps(config))
    assert caption.main(["--model", str(folder), str(scans[0]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "add_pipeline_to_folder" in err


# --------------------------------------------------------------------------------------------------
# A file it must not decode (over the 50 MP cap, or EPS, which Pillow decodes by running Ghostscript) fails
# its study only: every other study is captioned, exit 1.
# --------------------------------------------------------------------------------------------------


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
