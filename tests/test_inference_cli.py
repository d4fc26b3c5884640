"""The caption command runs only the model the user named, through the model folder's pipeline, and loses nothing."""

import csv
import json
import shutil

import pytest
import transformers
from huggingface_hub import ModelCard
from usage_testing_utils import png_header_only, write_model_card, write_phantom_pngs

import caption
from training.model_card import SYNTHETIC_DATASET

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")


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
