"""`synthesize` and `build` never replace what the user did not ask them to replace.

A folder holding other files is refused without an explicit overwrite; a build writes a complete new output
next to the target and renames it into place, so a failure while saving keeps the previous output loadable.
"""

import errno
import os
import shutil
from pathlib import Path

import datasets
import pytest
from xraycap.dataset_builder import build_dataset, synthesize
from xraycap.dataset_builder.__main__ import main as cli_main

REAL_CSV = "uid,MeSH\n1,real data\n"


@pytest.fixture(scope="module")
def phantom_8(tmp_path_factory) -> Path:
    return synthesize(
        tmp_path_factory.mktemp("ph") / "data", num_studies=8, seed=2, image_size=64, num_proc=1
    )


def _real_data_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "indiana_reports.csv").write_text(REAL_CSV)
    return root


def test_synthesize_refuses_a_folder_with_other_files(tmp_path):
    data = _real_data_folder(tmp_path / "real")
    with pytest.raises(FileExistsError, match=r"(?s)real.*overwrite"):
        synthesize(data, num_studies=2, image_size=64, num_proc=1)
    assert (data / "indiana_reports.csv").read_text() == REAL_CSV
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no temporary folder left


def test_cli_synthesize_refuses_then_overwrites_on_request(tmp_path, capsys):
    data = _real_data_folder(tmp_path / "real")
    argv = ["synthesize", "--output_dir", str(data), "--num_studies", "2", "--image_size", "64"]
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (data / "indiana_reports.csv").read_text() == REAL_CSV
    assert cli_main(argv + ["--overwrite"]) == 0
    assert (data / "indiana_reports.csv").read_text().startswith("uid,MeSH,Problems")
    assert len(list((data / "images" / "images_normalized").iterdir())) == 4


def test_synthesize_again_with_the_same_settings_reuses_other_settings_refused(tmp_path):
    first = synthesize(tmp_path / "s", num_studies=3, seed=1, image_size=64, num_proc=1)
    before = {p.name: p.stat().st_mtime_ns for p in first.rglob("*")}
    assert synthesize(tmp_path / "s", num_studies=3, seed=1, image_size=64, num_proc=1) == first
    assert {p.name: p.stat().st_mtime_ns for p in first.rglob("*")} == before
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path / "s", num_studies=4, seed=1, image_size=64, num_proc=1)


def test_build_refuses_a_non_empty_folder_that_is_not_a_build(phantom_8, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"(?s)out.*overwrite"):
        build_dataset(phantom_8, out, image_size=48, cache_dir=tmp_path / "cache")
    assert (out / "notes.txt").read_text() == "mine"
    _, report = build_dataset(phantom_8, out, image_size=48, cache_dir=tmp_path / "cache", overwrite=True)
    assert not (out / "notes.txt").exists()
    assert datasets.load_from_disk(str(out))["train"].num_rows == report["num_examples"]["train"]


def test_build_failing_while_saving_keeps_the_previous_output(phantom_8, tmp_path, monkeypatch):
    """A disk-full error while saving a new build leaves the old build loadable and nothing half-written."""
    outs = tmp_path / "outs"
    out = outs / "built"
    _, old = build_dataset(phantom_8, out, image_size=48, cache_dir=tmp_path / "cache")
    old_uids = datasets.load_from_disk(str(out))["train"]["uid"]
    real_copy, real_link = shutil.copyfile, os.link

    def disk_full(real):
        def fail_in_outs(src, dst, *args, **kwargs):
            if outs in Path(dst).parents:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return real(src, dst, *args, **kwargs)

        return fail_in_outs

    # the Arrow files are hard-linked from the cache; the metadata files are written
    monkeypatch.setattr(shutil, "copyfile", disk_full(real_copy))
    monkeypatch.setattr(os, "link", disk_full(real_link))
    with pytest.raises(OSError, match="No space left"):
        build_dataset(phantom_8, out, image_size=56, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert datasets.load_from_disk(str(out))["train"]["uid"] == old_uids
    assert (out / "build_report.json").read_text().count('"image_size": 48') == 1
    assert sorted(p.name for p in outs.iterdir()) == ["built"]
    # a previous build is replaced by a complete new one without asking
    _, new = build_dataset(phantom_8, out, image_size=56, cache_dir=tmp_path / "cache")
    assert '"image_size": 56' in (out / "build_report.json").read_text()
    assert sorted(p.name for p in outs.iterdir()) == ["built"]
    assert old["fingerprint"] != new["fingerprint"]
