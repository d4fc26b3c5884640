"""The demo's figures in the README come from `benchmarks/results/demo.json`, which `benchmarks/demo.py` writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import demo  # noqa: E402


def test_readme_demo_table_is_the_results_file():
    """The table between the README's demo-table markers is the one generated from the committed results file."""
    results = json.loads(demo.RESULTS.read_text())
    readme = demo.README.read_text()
    table = readme.split(demo.TABLE_START, 1)[1].split(demo.TABLE_END, 1)[0].strip()
    assert table == demo.readme_table(results)
    assert results["machine"]["git_commit"] and results["machine"]["cpu"]


def test_results_file_holds_the_main_job_the_launchers_and_the_seeds():
    """The timed main job (wall, CPU seconds, cores busy), as is and restricted to AVX2 in fp32, both launchers'
    runs and the 3-seed summary."""
    results = json.loads(demo.RESULTS.read_text())
    for name in ("main_job", "main_job_avx2_fp32"):
        run = results[name]
        assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["scores"]["test"]["ce_macro_f1"] is not None
    assert results["main_job_avx2_fp32"]["command"].startswith(
        "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2"
    )
    assert "--mixed_precision no" in results["main_job_avx2_fp32"]["command"]
    assert set(results["launchers"]) == {"accelerate launch", "python"}
    assert results["seeds"]["num_runs"] == 3
    for split in demo.TABLE_SPLITS:
        assert results["seeds"]["summary"][split]["ce_macro_f1"]["n"] == 3


def test_write_readme_replaces_only_the_marked_table(tmp_path: Path):
    results = json.loads(demo.RESULTS.read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{demo.TABLE_START}\nold\n{demo.TABLE_END}\nafter\n")
    demo.write_readme(results, readme)
    assert (
        readme.read_text()
        == f"before\n{demo.TABLE_START}\n{demo.readme_table(results)}\n{demo.TABLE_END}\nafter\n"
    )
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="demo-table"):
        demo.write_readme(results, readme)


@pytest.mark.slow
def test_demo_script_times_the_main_job_and_summarizes_seeds(tmp_path: Path):
    """A tiny run of the script itself: the main job (as is and AVX2 in fp32), both launchers and two seeds, two
    steps each."""
    output = tmp_path / "demo.json"
    extra = "--synthetic_studies 40 --per_device_train_batch_size 4 --num_beams 1 --max_steps 2"
    args = ["--num_seeds", "2", "--launcher_steps", "2", "--output", str(output), "--extra_args", extra]
    assert demo.main(args) == 0
    results = json.loads(output.read_text())
    assert results["main_job"]["cores_busy"] > 0 and results["main_job_avx2_fp32"]["cores_busy"] > 0
    assert all(run["steps"] == 2 for run in results["launchers"].values())
    assert results["seeds"]["summary"]["test"]["ce_macro_f1"]["n"] == 2
    assert demo.TABLE_START not in demo.readme_table(results)
