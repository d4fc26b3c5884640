"""`--help` of every command a user runs prints its options (argparse formats help strings with `%`, so a
stray "5 %" in one of them crashes the whole `--help`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# `xraycap-caption` is the console script `caption:main`; running it through Python keeps this checkout's code.
XRAYCAP_CAPTION = [
    "-c",
    "import sys; from xraycap.caption import main; sys.argv[0] = 'xraycap-caption'; main()",
]

ENTRY_POINTS = {
    "run_captioning": (
        ["run_captioning.py"],
        ["--output_dir", "--augment", "--mixed_precision", "--ddp_timeout"],
    ),
    "dataset_builder": (["-m", "dataset_builder"], ["synthesize", "build", "download"]),
    "dataset_builder synthesize": (
        ["-m", "dataset_builder", "synthesize"],
        ["--output_dir", "--num_studies"],
    ),
    "dataset_builder build": (["-m", "dataset_builder", "build"], ["--output_dir", "--views"]),
    "dataset_builder download": (["-m", "dataset_builder", "download"], ["--output_dir"]),
    "metrics.radiology_report": (["-m", "metrics.radiology_report"], ["--predictions", "--references"]),
    "xraycap-caption": (XRAYCAP_CAPTION, ["--model", "--trust_remote_code"]),
    "app": (["app.py"], ["--model", "--port"]),
    "benchmarks/run.py": (["benchmarks/run.py"], ["--sections", "--output"]),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_of_every_entry_point_lists_its_options(name: str):
    command, options = ENTRY_POINTS[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout, done.stdout[-2000:]
    missing = [option for option in options if option not in done.stdout]
    assert not missing, f"{name} --help lacks {missing}:\n{done.stdout[-3000:]}"
