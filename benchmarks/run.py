"""xraycap's side-by-side benchmarks: five figures, each a ratio against a baseline timed back to back in this one
process.

    python benchmarks/run.py --quick                    # the README figures (real sizes; minutes on a CPU)
    python benchmarks/run.py                            # more repeats
    python benchmarks/run.py --sections train,beam --output /tmp/bench.json

Prints a markdown table and writes `benchmarks/results/latest.json`: the machine (CPU model, whether it has bf16
matmul hardware, GPU), the versions, and every figure with its median and spread. Where a GPU is available the
`gpu` section gives the training, compute-fraction and beam-search figures on it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import operator
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks import sections as bench  # noqa: E402
from training.precision import resolve_mixed_precision  # noqa: E402

logger = logging.getLogger("benchmarks")

SECTIONS = ("train", "beam", "data", "build", "gpu")
COMPARE = {">=": operator.ge, "<": operator.lt}
TARGETS = {
    "train_speedup_vs_seed": (">=", 1.5),
    "beam_speedup_vs_nocache": (">=", 3.0),
    "data_speedup_vs_png": (">=", 5.0),
    "build_rss_growth": ("<", 0.25),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (the README figures)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the harness itself")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset")
    parser.add_argument("--output", default=str(bench.REPO_ROOT / "benchmarks" / "results" / "latest.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    return args


def machine_info() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpus = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    git = [["git", "rev-parse", "HEAD"], ["git", "status", "--porcelain", "--untracked-files=no"]]
    commit, changes = (
        subprocess.run(c, cwd=bench.REPO_ROOT, capture_output=True, text=True).stdout for c in git
    )
    return {
        "measured_at_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpus[0] if cpus else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_matmul_hardware": resolve_mixed_precision("auto", "cpu") == "bf16",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit.strip() or None,
        "git_uncommitted_changes": bool(changes.strip()),
        "versions": {"python": platform.python_version()}
        | {module.__name__: module.__version__ for module in (torch, transformers, datasets)},
    }


def headline(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures of the sections that ran (the GPU's prefixed `gpu_`), each with its target and whether it is
    met. The training target holds where training runs in half precision (GPUs, CPUs with bf16 matmul hardware);
    in fp32 the figure is reported without a target. The compute fraction has none."""
    found = {}
    for prefix, group in (("", sections), ("gpu_", sections.get("gpu", {}))):
        for section in (value for value in group.values() if isinstance(value, dict)):
            for name, figure in section.get("figures", {}).items():
                op, bound = TARGETS.get(name, (None, None))
                if name == "train_speedup_vs_seed" and section["setup"]["precision"] == "fp32":
                    op = None
                met = None if op is None else COMPARE[op](figure["median"], bound)
                found[prefix + name] = {**figure, "target": op and f"{op} {bound}", "met": met}
    return found


def markdown_table(found: dict[str, dict[str, Any]]) -> str:
    """One row per figure: what, xraycap, its baseline, the ratio (median, min-max, n), the target and whether met."""
    rows = [
        "| Figure | xraycap | Baseline | Ratio (median, min-max, n) | Target | Met |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in found.items():
        unit = "x" if "speedup" in name else ""
        value = f"**{f['median']:+.1%}**" if name.endswith("growth") else f"**{f['median']:.2f}{unit}**"
        value += f" ({f['min']:.2f}-{f['max']:.2f}, {f['n']})" if "n" in f else ""
        met = "-" if f["met"] is None else "yes" if f["met"] else "**no**"
        rows.append(
            f"| {f['what']} | {f['xraycap']} | {f['baseline']} | {value} | {f['target'] or '-'} | {met} |"
        )
    return "\n".join(rows)


def to_json(value: Any, levels: int = 3, indent: str = "") -> str:
    """JSON with the first `levels` levels of objects one entry a line and everything deeper on one line."""
    if levels == 0 or not isinstance(value, dict) or not value:
        return json.dumps(value, default=str)
    items = [
        f"{indent} {json.dumps(key)}: {to_json(item, levels - 1, indent + ' ')}"
        for key, item in value.items()
    ]
    return "{\n" + ",\n".join(items) + f"\n{indent}}}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the chosen sections; writes the results after each one, so that an interruption keeps them."""
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = {"smoke": bench.SMOKE, "quick": bench.QUICK, "full": bench.FULL}[mode]
    results: dict[str, Any] = {"figures": {}, "table_markdown": "", "mode": mode, "machine": machine_info()}
    results |= {"settings": dataclasses.asdict(settings), "sections": {}, "section_seconds": {}}
    with tempfile.TemporaryDirectory(prefix="xraycap-bench-") as tmp:
        workdir = Path(tmp)
        runners = {  # the CPU sections build fresh weights each
            "train": lambda: bench.train_section(settings, "cpu", bench.build_model(settings.preset)),
            "beam": lambda: bench.beam_section(settings, "cpu", bench.build_model(settings.preset)),
            "data": lambda: bench.data_section(settings, workdir / "data"),
            "build": lambda: bench.build_section(settings, workdir / "build"),
            "gpu": lambda: (
                {"train": bench.train_section(settings, "cuda"), "beam": bench.beam_section(settings, "cuda")}
                if torch.cuda.is_available()
                else {"skipped": "no CUDA device"}
            ),
        }
        for name in args.sections.split(","):
            start = time.perf_counter()
            logger.info("section %s", name)
            results["sections"][name] = runners[name]()
            results["section_seconds"][name] = round(time.perf_counter() - start, 1)
            results["figures"] = headline(results["sections"])
            results["table_markdown"] = markdown_table(results["figures"])
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(to_json(results) + "\n")
            logger.info("section %s done in %.0f s", name, results["section_seconds"][name])
    return results


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmarks and prints the table; exit status 1 when beam search gave other outputs without cache."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    results = run(args)
    print(results["table_markdown"])
    seconds = sum(results["section_seconds"].values())
    print(f"\nwritten to {args.output} ({results['mode']} mode, {seconds:.0f} s)")
    beams = [results["sections"].get("beam"), (results["sections"].get("gpu") or {}).get("beam")]
    if any(beam is not None and not beam["outputs_equal"] for beam in beams):
        print("FAILED: beam search gave other outputs with the KV cache than without it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
