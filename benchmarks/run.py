"""xraycap's side-by-side performance harness.

    python benchmarks/run.py --quick      # the README figures (real sizes, few repeats; minutes on a CPU)
    python benchmarks/run.py              # more repeats
    python benchmarks/run.py --sections train,beam --output /tmp/bench.json

Prints a markdown table and writes `benchmarks/results/latest.json` (machine, versions, every figure with its
median and spread over repeats). Each ratio pairs measurements taken back to back in this one process; no
figure is compared with a figure from another run. The GPU section runs when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable as a package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.sections import (  # noqa: E402
    FULL,
    QUICK,
    SMOKE,
    BenchSettings,
    beam_section,
    build_model,
    build_section,
    data_section,
    dtype_name,
    gpu_section,
    peak_rss_mb,
    temporary_workdir,
    train_section,
)
from benchmarks.timing import REPO_ROOT, load_average, machine_info  # noqa: E402
from run_captioning import resolve_mixed_precision  # noqa: E402  (benchmarks.sections put the root on the path)

logger = logging.getLogger("benchmarks")

SECTIONS = ("train", "beam", "data", "build", "gpu")
DEFAULT_OUTPUT = REPO_ROOT / "benchmarks" / "results" / "latest.json"

# (top-level key, comparison, target) from the performance issue.
TARGETS: dict[str, tuple[str, float]] = {
    "train_speedup_vs_seed": (">=", 1.5),
    "beam_speedup_vs_nocache": (">=", 3.0),
    "data_speedup_vs_png": (">=", 5.0),
    "build_rss_growth": ("<", 0.25),
    "train_compute_fraction": (">=", 0.35),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (the README figures)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model and sizes: checks the harness itself in seconds"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="where the JSON results go")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--check", action="store_true", help="exit with status 1 when a target of the issue is missed"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    return args


def _fmt_ratio(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    if summary["n"] == 1:
        return f"{summary['median']:.2f}x"
    return f"{summary['median']:.2f}x ({summary['min']:.2f}-{summary['max']:.2f})"


def _met(key: str, value: float | None) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    op, target = TARGETS[key]
    return value >= target if op == ">=" else value < target


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's top-level numbers, from the sections that ran (None where a section did not run)."""
    sections = results["sections"]
    train, beam = sections.get("train"), sections.get("beam")
    data, build = sections.get("data"), sections.get("build")
    return {
        # the lower of the median paired ratio and the best-times ratio (load bursts cannot inflate it)
        "train_speedup_vs_seed": train["speedup_vs_seed_headline"] if train else None,
        "beam_speedup_vs_nocache": beam["speedup"]["median"] if beam else None,
        "data_speedup_vs_png": data["speedup"]["median"] if data else None,
        "build_rss_growth": build["rss_growth"] if build else None,
        "train_compute_fraction": train["compute_fraction_headline"] if train else None,
    }


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: one row per figure, xraycap vs its baseline, the ratio, the target."""
    s = results["sections"]
    rows = [
        "| Figure | xraycap | Baseline | Ratio (median, min-max) | Target | Met |",
        "|---|---|---|---|---|---|",
    ]

    def mark(key):
        met = results["targets"][key]["met"]
        return "-" if met is None else ("yes" if met else "**no**")

    if "train" in s:
        t = s["train"]
        st = t["setup"]
        rows.append(
            f"| Training throughput, {st['preset']}, batch {st['batch_size']}, {st['text_tokens']} tokens, "
            f"frozen encoder, {st['image_prefix_tokens']} image tokens | {t['samples_per_second']['xraycap']:.2f} samples/s | "
            f"{t['samples_per_second']['seed']:.2f} samples/s (a) seed loop, fp32 | "
            f"**{t['speedup_vs_seed_headline']:.2f}x** (paired {_fmt_ratio(t['speedup_vs_seed'])}; best times "
            f"{t['speedup_vs_seed_best_times']:.2f}x) | >= 1.5x | {mark('train_speedup_vs_seed')} |"
        )
        rows.append(
            f"| ... same, without the feature cache ({st['precision']} + channels_last only) | "
            f"{t['samples_per_second']['xraycap_no_cache']:.2f} samples/s | (a) | "
            f"{_fmt_ratio(t['speedup_vs_seed_no_feature_cache'])} | - | - |"
        )
        native = t.get("native_grid")
        if native:
            rows.append(
                f"| ... same, with the encoder's native grid ({native['image_prefix_tokens']} image tokens "
                f"instead of {st['image_prefix_tokens']}) | {native['samples_per_second']:.2f} samples/s | (a) | "
                f"paired {_fmt_ratio(native['speedup_vs_seed'])}; best times "
                f"{native['speedup_vs_seed_best_times']:.2f}x (compute fraction "
                f"{native['compute_fraction']['median']:.2f}) | - | - |"
            )
    if "beam" in s:
        b = s["beam"]
        st = b["setup"]
        rows.append(
            f"| Beam search, {st['num_beams']} beams, {st['new_tokens']} new tokens, batch {st['batch_size']} "
            f"({st['precision']}), outputs equal: {b.get('outputs_equal')} | "
            f"{b['reports_per_second']['kv_cache']:.2f} reports/s | "
            f"{b['reports_per_second']['no_cache']:.3f} reports/s (b) no KV cache | {_fmt_ratio(b['speedup'])} "
            f"| >= 3x | {mark('beam_speedup_vs_nocache')} |"
        )
    if "data" in s:
        d = s["data"]
        st = d["setup"]
        rows.append(
            f"| Epoch data loading, {st['studies']} studies x 2 views, {st['full_size_images']['mean_side_px']:.0f} px "
            f"originals | {d['studies_per_second']['built_dataset']:.1f} studies/s | "
            f"{d['studies_per_second']['full_size_png']:.2f} studies/s (c) full-size PNGs | "
            f"{_fmt_ratio(d['speedup'])} | >= 5x | {mark('data_speedup_vs_png')} |"
        )
    if "build" in s:
        b = s["build"]
        series = b["series"]
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in series)
        secs = " / ".join(f"{r['build_seconds']:.1f}" for r in series)
        sizes = " / ".join(f"{r['images']:,}" for r in series)
        rows.append(
            f"| Dataset build peak RSS (MB) at {sizes} images | {rss} | - | "
            f"{b['rss_growth'] * 100:+.1f}% first to last | < +25% | {mark('build_rss_growth')} |"
        )
        fit = b["time_fit"]
        rows.append(
            f"| Dataset build time (s) at {sizes} images | {secs} | - | "
            f"fit {fit['seconds_per_1000_images']:.2f} s / 1,000 images + {fit['intercept_seconds']:.1f} s, "
            f"R^2 {fit['r2']:.3f}; marginal cost last/first {b['marginal_cost_ratio_last_vs_first']:.2f} | "
            f"linear | {'yes' if fit['r2'] >= 0.98 else '**no**'} |"
        )
    if "train" in s:
        t = s["train"]
        rates = t["matmul_flops_per_second"]
        amp_name = t["setup"]["precision"]
        fp32_too = "" if amp_name == "fp32" else f" ({rates['fp32']['median'] / 1e9:.0f} fp32)"
        probe = rates.get("bf16_small_matrices")
        if probe:  # fp32 training: why (the bf16 rate this CPU offers)
            fp32_too = (
                f" (bf16: {probe['flops_per_second'] / 1e9:.1f} GFLOP/s at side {probe['matrix_side']})"
            )
        achieved = (
            t["flops_per_step"]["xraycap_cached_features"]
            / t["seconds_per_step"]["xraycap_cached_features"]["median"]
        )
        rows.append(
            f"| Compute efficiency of the training step ({t['flops_per_step']['xraycap_cached_features'] / 1e9:.0f} "
            f"GFLOP) | {achieved / 1e9:.0f} GFLOP/s | {rates[amp_name]['median'] / 1e9:.0f} GFLOP/s {amp_name} "
            f"matmul{fp32_too} | **{t['compute_fraction_headline']:.2f}** "
            f"(median {t['compute_fraction']['median']:.2f}, {t['compute_fraction']['min']:.2f}-"
            f"{t['compute_fraction']['max']:.2f}; least-loaded repeat "
            f"{t['compute_fraction_least_loaded_repeat']['fraction']:.2f} at "
            f"{t['compute_fraction_least_loaded_repeat']['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s; fastest step "
            f"at the machine's rate {t['compute_fraction_fastest_step_at_machine_rate']['fraction']:.2f}: "
            f"{t['compute_fraction_fastest_step_at_machine_rate']['seconds_per_step']:.2f} s at "
            f"{t['compute_fraction_fastest_step_at_machine_rate']['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s, "
            f"highest read in this run {rates[amp_name + '_highest_reading'] / 1e9:.0f}) | >= 0.35 | "
            f"{mark('train_compute_fraction')} |"
        )
        fp32_weights = t.get("fp32_weights")
        if fp32_weights:
            rows.append(
                f"| ... xraycap's step (bf16 weights, fp32 master weights) against the same step with fp32 weights "
                f"under autocast (--master_weights off) | {t['seconds_per_step']['xraycap_cached_features']['median']:.2f} "
                f"s/step | {fp32_weights['seconds_per_step']['median']:.2f} s/step (fp32 weights) | "
                f"{_fmt_ratio(fp32_weights['xraycap_speedup'])} (their compute fraction "
                f"{fp32_weights['compute_fraction_headline']:.2f}) | - | - |"
            )
    gpu = s.get("gpu")
    if gpu and "skipped" not in gpu:
        for name, t in gpu["train"].items():
            rows.append(
                f"| GPU {gpu['device']} training, {name} ({gpu['amp_dtype']}) | "
                f"{t['samples_per_second']['xraycap']:.1f} samples/s | {t['samples_per_second']['seed']:.1f} "
                f"samples/s (a) | {_fmt_ratio(t['speedup_vs_seed'])} (compute fraction "
                f"{t['compute_fraction']['median']:.2f}) | - | - |"
            )
        b = gpu["beam_fp32"]
        rows.append(
            f"| GPU beam search, fp32, outputs equal: {b['outputs_equal']} | "
            f"{b['reports_per_second']['kv_cache']:.1f} reports/s | {b['reports_per_second']['no_cache']:.2f} "
            f"reports/s (b) | {_fmt_ratio(b['speedup'])} | - | - |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the chosen sections and returns the results dict (also written to `args.output`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: BenchSettings = SMOKE if args.smoke else (QUICK if args.quick else FULL)
    chosen = args.sections.split(",")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    results: dict[str, Any] = {
        "schema_version": 1,
        "mode": mode,
        "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "settings": asdict(settings),
        "sections": {},
        "section_seconds": {},
    }
    start = time.perf_counter()
    model = None
    with temporary_workdir() as workdir:
        for name in chosen:
            section_start = time.perf_counter()
            logger.info("section %s", name)
            if name in ("train", "beam") and model is None:
                model = build_model(settings)
            if name == "train":
                # What `run_captioning --mixed_precision auto` trains in on this CPU: bf16 where it has bf16
                # matmul hardware, else fp32.
                amp_dtype = torch.bfloat16 if resolve_mixed_precision("auto", "cpu") == "bf16" else None
                reference = previous_reference_rate(
                    args.output, results["machine"], settings.matmul_size, amp_dtype or torch.float32
                )
                results["sections"]["train"] = train_section(
                    settings, "cpu", amp_dtype, model=model, reference_rate=reference
                )
                model = build_model(settings)  # fresh weights for generation (training moved them)
            elif name == "beam":
                results["sections"]["beam"] = beam_section(
                    settings, "cpu", None, model=model, check_equal=False
                )
            elif name == "data":
                results["sections"]["data"] = data_section(settings, Path(workdir) / "data")
            elif name == "build":
                results["sections"]["build"] = build_section(settings, Path(workdir) / "build")
            elif name == "gpu":
                model = None
                results["sections"]["gpu"] = gpu_section(replace(settings))
            results["section_seconds"][name] = round(time.perf_counter() - section_start, 1)
            _finish(results, args.output, start, complete=False)  # partial results survive an interruption
            logger.info("section %s done in %.0f s: %s", name, results["section_seconds"][name],
                        {k: v for k, v in headline(results).items() if v is not None})  # fmt: skip
    return _finish(results, args.output, start, complete=True)


# What must match for an earlier run's matmul rate to stand for this machine's.
_SAME_MACHINE_KEYS = ("cpu", "cpu_count", "torch_threads", "cpu_capability", "cuda")


def previous_reference_rate(
    path: str | Path, machine: dict[str, Any], matrix_side: int, dtype: torch.dtype = torch.bfloat16
) -> float | None:
    """
    The `dtype` matmul rate an earlier run at `path` held its training step to (the highest it read, or the
    reference it carried), when it ran on the same machine with the same matrix size; else None. On a shared
    CPU the neighbours' load can keep every reading of one run low, which would inflate its compute fraction;
    carrying the highest rate forward keeps the headline against a rate this machine has shown.

    Args:
        path (`str` or `Path`): the earlier results JSON (the one this run is about to overwrite).
        machine (`dict`): this run's `machine_info()`.
        matrix_side (`int`): this run's matmul size.
        dtype (`torch.dtype`): the precision of this run's training step (bf16 or fp32).
    """
    try:
        previous = json.loads(Path(path).read_text())
        rates = previous["sections"]["train"]["matmul_flops_per_second"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rates.get("matrix_side") != matrix_side or any(
        previous.get("machine", {}).get(key) != machine.get(key) for key in _SAME_MACHINE_KEYS
    ):
        return None
    name = dtype_name(dtype)
    # Files from before the reference was kept hold only the summary of the bracketing rates.
    rate = rates.get(f"{name}_reference") or (rates.get("bf16", {}).get("max") if name == "bf16" else None)
    return float(rate) if isinstance(rate, (int, float)) else None


def _finish(results: dict[str, Any], output: str, start: float, complete: bool) -> dict[str, Any]:
    """Adds the headline numbers, targets and table, and writes the JSON (issue's numbers first)."""
    results["complete"] = complete
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    results["machine"]["load_average_at_end"] = load_average()
    results["machine"]["peak_rss_mb"] = round(peak_rss_mb(), 1)
    top = headline(results)
    results.update(top)
    results["targets"] = {
        key: {"value": top[key], "target": f"{op} {target}", "met": _met(key, top[key])}
        for key, (op, target) in TARGETS.items()
    }
    results["table_markdown"] = markdown_table(results)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {**{k: results[k] for k in TARGETS}, **{k: v for k, v in results.items() if k not in TARGETS}}
    path.write_text(json.dumps(ordered, indent=1, default=str) + "\n")
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    results = run(args)
    print(results["table_markdown"])
    print(f"\nwritten to {args.output} in {results['total_seconds']:.0f} s ({results['mode']} mode)")
    failures = []
    beam = results["sections"].get("beam")
    if beam is not None and not beam["outputs_equal"]:
        failures.append("beam search outputs differ with and without the KV cache")
    if args.check:
        failures += [
            f"{k} = {v['value']} misses {v['target']}"
            for k, v in results["targets"].items()
            if v["met"] is False
        ]
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
