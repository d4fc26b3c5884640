"""xraycap's benchmarks: the CPU figures (each a ratio against a baseline timed back to back in this one process),
the GPU benchmark (absolute rates at real size) and the scale section (dataset growth towards MIMIC-CXR).

    python benchmarks/run.py --quick                    # the README figures (real sizes; minutes on a CPU)
    python benchmarks/run.py                            # more repeats
    python benchmarks/run.py --sections train,beam --output /tmp/bench.json
    python benchmarks/run.py --device cuda              # the GPU benchmark: benchmarks/results/<card>.json
    python benchmarks/run.py --sections scale           # dataset growth: benchmarks/results/scale.json
    python benchmarks/run.py --sections profile         # the training step's profile: benchmarks/results/profile.json

Prints a markdown table and writes `benchmarks/results/latest.json`: the machine (CPU model, whether it has bf16
matmul hardware, GPU), the versions, and every figure with its median and spread. `--device cuda` runs the `gpu`
section (absolute rates at real size, MFU, the loader beside the step's demand) on the GPU; the `scale` section
builds phantom MIMIC-CXR layouts of growing size (`--scale_sizes`); the `profile` section runs `torch.profiler` over
the training step. docs/PERFORMANCE.md's blocks are regenerated from the default results files (`benchmarks/report.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import operator
import os
import platform
import re
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

from benchmarks import gpu, report, scale, scale_report, step_profile  # noqa: E402
from benchmarks import sections as bench  # noqa: E402
from xraycap.training.distributed import resolve_mixed_precision  # noqa: E402

logger = logging.getLogger("benchmarks")

RESULTS = bench.REPO_ROOT / "benchmarks" / "results"
SCALE_SIZES = (1000, 4000, 16000)

SECTIONS = ("train", "beam", "data", "build", "scale", "gpu", "profile")
DEFAULT_SECTIONS = {"cpu": "train,beam,data,build", "cuda": "gpu"}
COMPARE = {">=": operator.ge, "<": operator.lt}
TARGETS = {
    "train_speedup_vs_seed": (">=", 1.5),
    "beam_speedup_vs_nocache": (">=", 3.0),
    "data_speedup_vs_png": (">=", 5.0),
    "build_rss_growth": ("<", 0.25),
    "build_num_proc_1_rss_growth": ("<", 0.25),
    "build_all_cores_rss_growth": ("<", 0.25),
    "train_cache_features_rss_growth": ("<", 0.25),
    "build_speedup_all_cores": (">=", 1.7),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (the README figures)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the harness itself")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU benchmark (default sections: gpu); cpu: the CPU sections (default: "
        f"{DEFAULT_SECTIONS['cpu']}). `--device cpu --sections gpu --smoke` runs the GPU code on CPU at toy sizes.",
    )
    parser.add_argument("--sections", default=None, help=f"a comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the GPU's dense tensor-core peak (TFLOP/s, training precision) for MFU, where benchmarks/gpu.py's "
        "table lacks the card",
    )
    parser.add_argument(
        "--scale_sizes",
        default=",".join(str(n) for n in SCALE_SIZES),
        help="phantom MIMIC-CXR studies per size of the scale section, comma-separated",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="results file. Default: benchmarks/results/<card>.json with --device cuda, scale.json / profile.json "
        "when only the scale / profile section runs, else latest.json",
    )
    args = parser.parse_args(argv)
    args.sections = args.sections or DEFAULT_SECTIONS[args.device]
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
            "with an NVIDIA GPU and a CUDA build of torch, or leave --device out for the CPU sections."
        )
    try:
        args.scale_sizes = tuple(int(n) for n in args.scale_sizes.split(","))
    except ValueError:
        parser.error(
            f"--scale_sizes {args.scale_sizes!r}: give whole numbers separated by commas, e.g. 1000,4000"
        )
    if min(args.scale_sizes) < 20:
        parser.error(f"--scale_sizes {args.scale_sizes}: each size needs >= 20 studies (three splits)")
    args.output = args.output or str(RESULTS / default_output_name(args))
    return args


def card_slug(name: str) -> str:
    """A file name for a device name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_output_name(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return card_slug(torch.cuda.get_device_name(0)) + ".json"
    return {"scale": "scale.json", "profile": "profile.json"}.get(args.sections, "latest.json")


def machine_info() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpus = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    git = [["git", "rev-parse", "HEAD"], ["git", "status", "--porcelain", "--untracked-files=no"]]
    commit, changes = (
        subprocess.run(c, cwd=bench.REPO_ROOT, capture_output=True, text=True).stdout for c in git
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    return {
        "measured_at_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpus[0] if cpus else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_matmul_hardware": resolve_mixed_precision("auto", "cpu") == "bf16",
        "cpu_flags": {flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "amx_tile")},
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit.strip() or None,
        # the harness's own outputs (results files, the generated doc table) do not count
        "git_uncommitted_changes": any(
            not line[3:].startswith(("benchmarks/results/", "docs/PERFORMANCE.md"))
            for line in changes.splitlines()
        ),
        "versions": {"python": platform.python_version()}
        | {module.__name__: module.__version__ for module in (torch, transformers, datasets)},
    }


def headline(sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The figures of the sections that ran, each with its target and whether it is met. The training target holds
    where training runs in half precision (GPUs, CPUs with bf16 matmul hardware); in fp32 the figure is reported
    without a target. The compute fraction and the GPU's absolute rates have none."""
    found = {}
    for section in (value for value in sections.values() if isinstance(value, dict)):
        for name, figure in section.get("figures", {}).items():
            op, bound = TARGETS.get(name, (None, None))
            if name == "train_speedup_vs_seed" and section["setup"]["precision"] == "fp32":
                op = None
            met = None if op is None else COMPARE[op](figure["median"], bound)
            found[name] = {**figure, "target": op and f"{op} {bound}", "met": met}
    return found


def markdown_table(found: dict[str, dict[str, Any]]) -> str:
    """One row per figure: what, xraycap, its baseline, the ratio (median, min-max, n), the target and whether met."""
    rows = [
        "| Figure | xraycap | Baseline | Value (median, min-max, n) | Target | Met |",
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
            "scale": lambda: scale.scale_section(args.scale_sizes, workdir / "scale"),
            "profile": lambda: step_profile.profile_section(settings, "cpu"),
            "gpu": lambda: gpu.gpu_section(
                gpu.GPU_SMOKE if args.smoke else gpu.GpuSettings.from_config(),
                args.device,
                workdir / "gpu",
                args.peak_tflops,
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
    output = Path(args.output).resolve()
    if "scale" in results["sections"] and output == (RESULTS / "scale.json").resolve():
        scale_report.write_doc(
            results
        )  # the committed results file: docs/PERFORMANCE.md's scale table follows it
    for name in (report.FIGURES, report.PROFILE):  # likewise the current figures and the profile paragraph
        if output == (RESULTS / name).resolve() and not args.smoke:
            report.write_doc(results, name)
    return results


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmarks and prints the table; exit status 1 when beam search gave other outputs without cache."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    results = run(args)
    print(results["table_markdown"])
    for note in (results["sections"].get("gpu") or {}).get("notes", []):
        print(f"\nnote: {note}")
    seconds = sum(results["section_seconds"].values())
    print(f"\nwritten to {args.output} ({results['mode']} mode, {seconds:.0f} s)")
    beam = results["sections"].get("beam")
    if beam is not None and not beam["outputs_equal"]:
        print("FAILED: beam search gave other outputs with the KV cache than without it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
