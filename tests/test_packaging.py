"""What `pip install -e .` puts on a user's path: the model files and one `xraycap` package, no generic names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = {
    "configuration_xraycap",
    "modeling_xraycap",
    "image_decoding_xraycap",
    "image_processing_xraycap",
    "processing_xraycap",
    "pipeline_xraycap",
}
GENERIC_NAMES = ["training", "metrics", "inference", "app", "caption", "dataset_builder", "run_captioning"]


def test_installed_distribution_has_one_package_beside_the_model_files(tmp_path):
    """The installed distribution's own list of top-level names (read outside the checkout, where a stale
    `*.egg-info` folder could answer instead)."""
    probe = "import importlib.metadata as m; print(m.distribution('xraycap').read_text('top_level.txt'))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    top_level = set(result.stdout.split())
    assert top_level - MODEL_FILES == {"xraycap"}, f"installed top-level names: {sorted(top_level)}"


def test_outside_the_repository_only_the_xraycap_names_import(tmp_path):
    """From another project's folder, no generic name resolves to us, and every helper package imports under xraycap."""
    probe = (
        "import importlib.util, json\n"
        f"generic = {{name: importlib.util.find_spec(name) is not None for name in {GENERIC_NAMES!r}}}\n"
        "import xraycap.training.data, xraycap.inference.model_source, xraycap.caption\n"
        "import xraycap.dataset_builder.builder, xraycap.radiology_report.labeler\n"
        "print(json.dumps({'generic': generic, 'labeler': xraycap.radiology_report.labeler.__file__,\n"
        "                  'builder': xraycap.dataset_builder.builder.__file__}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not any(found["generic"].values()), f"generic top-level names importable: {found['generic']}"
    # The two folders the model card names are the ones installed (not copies).
    assert Path(found["labeler"]).parent.samefile(REPO_ROOT / "metrics" / "radiology_report")
    assert Path(found["builder"]).parent.samefile(REPO_ROOT / "dataset_builder")


@pytest.mark.slow
def test_wheel_holds_one_package_beside_the_model_files(tmp_path):
    """A regular (non-editable) install gets the same names: the wheel's top-level entries."""
    source = tmp_path / "source"  # a copy, so the build's `build/` folder is not written into the checkout
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the wheel is built from the tracked files")
    for name in listed.stdout.splitlines():
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("xraycap-*.whl")
    names = {Path(name).parts[0] for name in zipfile.ZipFile(wheel).namelist() if ".dist-info" not in name}
    assert {name.removesuffix(".py") for name in names} == MODEL_FILES | {"xraycap"}, sorted(names)
    assert {"xraycap/dataset_builder/builder.py", "xraycap/radiology_report/labeler.py"} <= set(
        zipfile.ZipFile(wheel).namelist()
    )
