#!/usr/bin/env python
"""Measure the embedded demo (the README's first command) and write `benchmarks/results/demo.json`.

    python benchmarks/demo.py                       # the main job (as is, and as on AVX2 in fp32), launchers, 3 seeds
    python benchmarks/demo.py --num_seeds 0         # without the seeds
    python benchmarks/demo.py --write_readme        # refresh the README's demo table from the results file

Four measurements, each timed from the outside (wall seconds, and the CPU seconds of the process tree, whose
ratio is the number of cores kept busy):
- `main_job`: `accelerate launch run_captioning.py` with no arguments from a fresh cache folder, synthesis and
  build included, with its evaluation results (per observation too) and the build report's `finding_sets` (how
  many test studies show a set of findings that no training study shows);
- `main_job_avx2_fp32`: the same main job from its own fresh cache, as a CPU without bf16 hardware runs it:
  torch's kernels and oneDNN restricted to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`) and
  `--mixed_precision no`. Same cores, clock and caches as the machine measured, so it isolates the instruction
  set and the precision, not the slower clock an older AVX2-only CPU may have;
- `launchers`: the same training, `--launcher_steps` steps without evaluation on the now-built data, under
  `accelerate launch` and under `python`: on a CPU both must keep the same cores busy;
- `seeds`: `--num_seeds` runs (seeds 42, 43, ... on one split), whose `eval_summary.json` gives mean ± sample std
  per metric for the test split beside both floors (`test_image_ablated`: every image mid-grey;
  `test_nearest_train`: each study given its nearest training study's report).
The results file names the commit and the machine; the README's demo table is generated from it
(`--write_readme`) and a test checks that the two agree.
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

from xraycap.radiology_report.clinical_efficacy import observation_key  # noqa: E402
from xraycap.radiology_report.labeler import CHEXPERT_OBSERVATIONS  # noqa: E402

from benchmarks.run import machine_info  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "demo.json"
README = REPO_ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- demo-table:start -->", "<!-- demo-table:end -->"
TABLE_SPLITS = ("test", "test_image_ablated", "test_nearest_train")
LAUNCHERS = {
    "accelerate launch": ["accelerate", "launch"],  # as the README runs it (no config: one process)
    "python": [sys.executable],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_seeds", type=int, default=3, help="Seeds of the repeated run (0: none).")
    parser.add_argument(
        "--launcher_steps",
        type=int,
        default=60,
        help="Training steps of each launcher's run (0: no comparison).",
    )
    parser.add_argument(
        "--avx2_fp32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also time the main job restricted to AVX2 kernels in fp32 (a CPU without bf16 hardware).",
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


AVX2_FP32 = {
    "env": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "args": ["--mixed_precision", "no"],
}


def timed_run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Runs `command` to completion (`env` added to the environment); its wall seconds and the CPU seconds of it
    and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(command, cwd=cwd, check=True, env={**environment, **(env or {})})
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


def cache_folder(work: Path, name: str = "main_job") -> Path:
    """The cache folder (synthesis, build, features) of the main job `name`; the launchers and the seeds reuse the
    main job's, so that they time training, not a second synthesis and build."""
    return work / name / "cache"


def main_job(
    work: Path, extra: list[str], name: str = "main_job", env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The main job under `accelerate launch`, timed from a fresh cache (`cache_folder(work, name)`); its
    evaluation results."""
    output = work / name / "outputs" / "xraycap-demo"
    os.environ["XRAYCAP_CACHE"] = str(cache_folder(work, name))
    command = [
        *LAUNCHERS["accelerate launch"],
        str(REPO_ROOT / "run_captioning.py"),
        "--output_dir",
        str(output),
    ]
    timing = timed_run([*command, *extra], work, env)
    results = json.loads((output / "eval_results.json").read_text())
    return {
        "command": " ".join(
            [*(f"{k}={v}" for k, v in (env or {}).items()), "accelerate launch run_captioning.py", *extra]
        ),
        **timing,
        "finding_sets": results["run"].get("finding_sets"),
        "scores": {split: results[split] for split in TABLE_SPLITS if split in results},
        "per_observation": {
            split: per_observation(results[split]) for split in TABLE_SPLITS if split in results
        },
    }


def launcher_runs(steps: int, work: Path, extra: list[str]) -> dict[str, Any]:
    """The same `steps` training steps (no evaluation, data already built by the main job) under each launcher,
    timed."""
    os.environ["XRAYCAP_CACHE"] = str(cache_folder(work))
    runs = {}
    for launcher, prefix in LAUNCHERS.items():
        output = work / "launchers" / launcher.replace(" ", "-")
        options = ["--output_dir", str(output), "--max_steps", str(steps), "--do_eval", "false", *extra]
        runs[launcher] = {
            "steps": steps,
            **timed_run([*prefix, str(REPO_ROOT / "run_captioning.py"), *options], work),
        }
    return runs


def repeated(num_seeds: int, work: Path, extra: list[str]) -> dict[str, Any]:
    """The `--num_seeds` run (data already built by the main job); its `eval_summary.json`."""
    output = work / "seeds" / "outputs"
    os.environ["XRAYCAP_CACHE"] = str(cache_folder(work))
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
    """The README's demo table: per split (test beside both floors), the macro F1 and each observation's F1 with
    support in the test split, mean ± std over the seeds."""
    summary = results["seeds"]["summary"]
    test = summary["test"]
    keys = [
        observation_key(name)
        for name in CHEXPERT_OBSERVATIONS
        if test.get(f"ce_support_{observation_key(name)}", {}).get("mean", 0) > 0
    ]
    names = {observation_key(name): name for name in CHEXPERT_OBSERVATIONS}
    header = ["", "macro F1", *(names[key] for key in keys)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for split in TABLE_SPLITS:
        cells = [summary[split][metric] for metric in ("ce_macro_f1", *(f"ce_f1_{key}" for key in keys))]
        lines.append(f"| {split} | " + " | ".join(f"{c['mean']:.2f} ± {c['std']:.2f}" for c in cells) + " |")
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
    extra = args.extra_args.split()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="xraycap-demo-"))
    results: dict[str, Any] = {"machine": machine_info(), "main_job": main_job(work, extra)}
    if args.avx2_fp32:
        avx2 = [*AVX2_FP32["args"], *extra]
        results["main_job_avx2_fp32"] = main_job(work, avx2, "main_job_avx2_fp32", AVX2_FP32["env"])
    if args.launcher_steps:
        results["launchers"] = launcher_runs(args.launcher_steps, work, extra)
    if args.num_seeds:
        results["seeds"] = repeated(args.num_seeds, work, extra)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    run = results["main_job"]
    print(
        f"main job: {run['wall_s']} s wall, {run['cores_busy']} cores busy, test ce_macro_f1 "
        f"{run['scores']['test']['ce_macro_f1']:.3f}"
    )
    if "main_job_avx2_fp32" in results:
        run = results["main_job_avx2_fp32"]
        print(
            f"main job, AVX2 and fp32: {run['wall_s']} s wall, test ce_macro_f1 {run['scores']['test']['ce_macro_f1']:.3f}"
        )
    for launcher, timing in results.get("launchers", {}).items():
        print(
            f"{launcher}: {timing['steps']} steps in {timing['wall_s']} s, {timing['cores_busy']} cores busy"
        )
    if "seeds" in results:
        print(readme_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
