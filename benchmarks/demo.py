#!/usr/bin/env python
"""Measure the embedded demo (the README's first command) and write `benchmarks/results/demo.json`.

    python benchmarks/demo.py                       # the main job twice (accelerate launch, python), 3 seeds
    python benchmarks/demo.py --num_seeds 0         # the main job only
    python benchmarks/demo.py --write_readme        # refresh the README's demo table from the results file

Each main-job run starts from a fresh cache folder (synthesis and build included) and is timed from the outside:
wall seconds, and the CPU seconds of the process tree, whose ratio is the number of cores kept busy. The
`--num_seeds` run (seeds 42, 43, ... on one split) gives `eval_summary.json`, mean ± sample std per metric,
for the test split beside both floors (`test_image_ablated`: every image mid-grey; `test_nearest_train`: each
study given its nearest training study's report). The results file names the commit and the machine; the
README's demo table is generated from it (`--write_readme`) and a test checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.run import machine_info  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "demo.json"
README = REPO_ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
TABLE_SPLITS = ("test", "test_image_ablated", "test_nearest_train")
TABLE_METRICS = ("ce_macro_f1", "ce_micro_f1", "bleu_4", "cider")
LAUNCHERS = {
    "accelerate launch": ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1"],
    "python": [sys.executable],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_seeds", type=int, default=3, help="Seeds of the repeated run (0: none).")
    parser.add_argument(
        "--launchers",
        default="accelerate launch,python",
        help="Comma-separated launchers of the timed main job: 'accelerate launch', 'python' or both.",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="The results file written.")
    parser.add_argument("--work_dir", type=Path, default=None, help="Run folders (default: a temporary one).")
    parser.add_argument(
        "--extra_args", default="", help="Arguments added to every run (e.g. '--max_steps 2' in tests)."
    )
    parser.add_argument(
        "--write_readme", action="store_true", help="Only rewrite the README's demo table from --output."
    )
    return parser.parse_args(argv)


def timed_run(command: list[str], cwd: Path) -> dict[str, float]:
    """Runs `command` to completion; its wall seconds and the CPU seconds of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        command, cwd=cwd, check=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2)}


def per_observation(scores: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{observation_key: {"f1", "support"}}` of one evaluation's scores."""
    return {
        key.removeprefix("ce_f1_"): {
            "f1": value,
            "support": scores.get("ce_support_" + key.removeprefix("ce_f1_")),
        }
        for key, value in scores.items()
        if key.startswith("ce_f1_")
    }


def main_job(launcher: str, work: Path, extra: list[str]) -> dict[str, Any]:
    """One timed main job from a fresh cache; its evaluation results."""
    folder = work / launcher.replace(" ", "-")
    output, cache = folder / "outputs" / "xraycap-demo", folder / "cache"
    os.environ["XRAYCAP_CACHE"] = str(cache)
    command = [
        *LAUNCHERS[launcher],
        str(REPO_ROOT / "run_captioning.py"),
        "--output_dir",
        str(output),
        *extra,
    ]
    timing = timed_run(command, folder.parent)
    results = json.loads((output / "eval_results.json").read_text())
    return {
        "command": " ".join([launcher, "run_captioning.py", *extra]),
        **timing,
        "scores": {split: results[split] for split in TABLE_SPLITS if split in results},
        "per_observation": {
            split: per_observation(results[split]) for split in TABLE_SPLITS if split in results
        },
    }


def repeated(num_seeds: int, work: Path, extra: list[str]) -> dict[str, Any]:
    """The `--num_seeds` run; its `eval_summary.json`."""
    output = work / "seeds" / "outputs"
    os.environ["XRAYCAP_CACHE"] = str(work / "seeds" / "cache")
    command = [
        *LAUNCHERS["accelerate launch"],
        str(REPO_ROOT / "run_captioning.py"),
        "--output_dir",
        str(output),
    ]
    timing = timed_run([*command, "--num_seeds", str(num_seeds), *extra], work)
    summary = json.loads((output / "eval_summary.json").read_text())
    return {"command": f"accelerate launch run_captioning.py --num_seeds {num_seeds}", **timing, **summary}


def readme_table(results: dict[str, Any]) -> str:
    """The README's demo table: mean ± std over the seeds of each metric, test beside both floors."""
    summary = results["seeds"]["summary"]
    lines = ["| metric | " + " | ".join(TABLE_SPLITS) + " |", "|---" * (len(TABLE_SPLITS) + 1) + "|"]
    for metric in TABLE_METRICS:
        cells = [f"{summary[s][metric]['mean']:.3f} ± {summary[s][metric]['std']:.3f}" for s in TABLE_SPLITS]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(results: dict[str, Any], readme: Path = README) -> None:
    """Replaces the table between the README's demo-table markers with the one of `results`."""
    text = readme.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(
            f"{readme} has no '{TABLE_START}' ... '{TABLE_END}' markers to write the demo table into."
        )
    head, rest = text.split(TABLE_START, 1)
    tail = rest.split(TABLE_END, 1)[1]
    readme.write_text(f"{head}{TABLE_START}\n{readme_table(results)}\n{TABLE_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_readme:
        write_readme(json.loads(args.output.read_text()))
        return 0
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    unknown = [name for name in launchers if name not in LAUNCHERS]
    if unknown:
        raise SystemExit(f"--launchers {unknown} unknown: use {list(LAUNCHERS)}.")
    extra = args.extra_args.split()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="xraycap-demo-"))
    results: dict[str, Any] = {"machine": machine_info(), "main_job": {}}
    for launcher in launchers:
        results["main_job"][launcher] = main_job(launcher, work, extra)
    if args.num_seeds:
        results["seeds"] = repeated(args.num_seeds, work, extra)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    for launcher, run in results["main_job"].items():
        test = run["scores"]["test"]
        print(
            f"{launcher}: {run['wall_s']} s wall, {run['cores_busy']} cores busy, test ce_macro_f1 "
            f"{test['ce_macro_f1']:.3f}"
        )
    if "seeds" in results:
        print(readme_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
