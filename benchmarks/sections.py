"""The benchmark sections. Each returns a JSON-ready dict, and each ratio pairs runs timed back to back in this
process (A, B, A, B, ...), so that both sides see the same machine load.

- `train_section`: run_captioning's training step vs the seed loop (a), and the step's compute fraction.
- `beam_section`: beam search with the KV cache vs `generate(use_cache=False)` (b); the outputs are compared.
- `data_section`: an epoch from the built Arrow dataset vs one decoding the full-size PNGs (c).
- `build_section`: the dataset build's peak memory at growing sizes (one fresh process per build).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from xraycap.dataset_builder import build_dataset, synthesize

from configuration_xraycap import XrayCapConfig
from modeling_xraycap import XrayCapForConditionalGeneration
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer
from xraycap.training.data import IndexedStudies, StudyCollator
from xraycap.training.distributed import resolve_mixed_precision
from xraycap.training.models import freeze_vision_tower
from xraycap.training.optimization import build_optimizer

from .baselines import SeedCaptioner, seed_train_step
from .inputs import make_full_size_studies, random_batch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchSettings:
    """Sizes and repeat counts of one run: the model preset ("resnet50-gpt2" is the real size, random weights),
    the training batch (`batch_size` studies, `text_tokens` report tokens; `repeats` timed and `warmup_steps`
    untimed steps; the feature encoding spread over `amortize_epochs`; `matmul_size` for the matmul rate), the
    beam search, the data-loading epochs (`data_studies` studies of `full_size` px), the dataset builds (phantom
    layouts of `build_sizes` images of `build_image_px` x `build_image_px` px) and the profiled steps."""

    preset: str = "resnet50-gpt2"
    batch_size: int = 8
    text_tokens: int = 60
    repeats: int = 5
    warmup_steps: int = 3
    amortize_epochs: int = 14
    matmul_size: int = 4096
    num_beams: int = 3
    new_tokens: int = 60
    beam_repeats: int = 3
    nocache_repeats: int = 1
    data_studies: int = 8
    full_size: tuple[int, int] = (2048, 2900)
    data_repeats: int = 3
    build_sizes: tuple[int, ...] = (1000, 2000, 4000, 8000)
    build_image_px: int = 64
    build_repeats: int = 2
    profile_steps: int = 3


QUICK = BenchSettings()
FULL = BenchSettings(repeats=9, beam_repeats=5, nocache_repeats=2, data_studies=16, data_repeats=5)
# fmt: off
SMOKE = BenchSettings(  # every code path at toy sizes, in seconds: the harness's own test
    preset="tiny", batch_size=2, text_tokens=8, repeats=2, warmup_steps=1, matmul_size=256, num_beams=2,
    new_tokens=5, beam_repeats=2, nocache_repeats=2, data_studies=2, full_size=(300, 360), data_repeats=2,
    build_sizes=(40, 80), build_image_px=64, build_repeats=1, profile_steps=1,
)
# fmt: on


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Runs `fn()` once; returns `(seconds, result)`, waiting for queued GPU work at both ends."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def summarize(values: list[float]) -> dict[str, Any]:
    """The `median`, `min`, `max` and `n` of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio(slow: list[float], fast: list[float]) -> dict[str, Any]:
    """`slow / fast`: per pair of repeats when they are paired, else the ratio of the medians with the extremes
    as its range (min: min(slow) / max(fast))."""
    if len(slow) == len(fast):
        return summarize([s / f for s, f in zip(slow, fast)])
    extremes = {"min": min(slow) / max(fast), "max": max(slow) / min(fast), "n": min(len(slow), len(fast))}
    return {**summarize([statistics.median(slow) / statistics.median(fast)]), **extremes}


def figure(summary: dict[str, Any], what: str, xraycap: str, baseline: str) -> dict[str, Any]:
    """A headline figure: the summary's median and spread, what was measured, and each side's own number."""
    return {**summary, "what": what, "xraycap": xraycap, "baseline": baseline}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """What `run_captioning --mixed_precision auto` trains in here: bf16 on CPUs with bf16 matmul hardware and on
    GPUs that support it, fp16 on older GPUs, else None (fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision("auto", device_type))


def matmul_rate(dtype: torch.dtype, size: int, device: torch.device, runs: int = 3) -> float:
    """The dense matmul rate (FLOP/s) in `dtype`: the median of `runs` products of two `size` x `size` matrices."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)
    return 2 * size**3 / statistics.median(timed(lambda: torch.mm(a, b), device)[0] for _ in range(runs))


def build_model(preset: str, seed: int = 0) -> XrayCapForConditionalGeneration:
    """The preset's model with random weights (no Hub access) and a frozen vision encoder."""
    torch.manual_seed(seed)
    model = XrayCapForConditionalGeneration(XrayCapConfig.from_preset(preset))
    freeze_vision_tower(model)
    return model


@torch.no_grad()
def encode_features(model, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The one-off `--cache_features` pass over one batch: the frozen encoder under autocast, no gradients."""
    device_type = batch["pixel_values"].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model.get_image_features(batch["pixel_values"], batch["view_mask"])


def step_inputs(
    model, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """The inputs of the `--cache_features` training step: the batch's text and view mask, and its image features
    from the one-off encoding pass (`encode_features`) in place of the pixels."""
    inputs = {k: batch[k] for k in ("view_mask", "input_ids", "attention_mask", "labels")}
    return inputs | {"image_features": encode_features(model, batch, amp_dtype)}


def make_xraycap_step(model, inputs: dict[str, torch.Tensor], amp_dtype: torch.dtype | None) -> Callable:
    """One optimizer step as run_captioning.py takes it, from stock parts: the forward under autocast over fp32
    weights (logits on the report positions only: `logits_to_keep`), backward (fp16: through a GradScaler, as
    Accelerate does), `clip_grad_norm_(params, 1.0)`, fused AdamW (`build_optimizer`), `zero_grad`."""
    device_type = next(model.parameters()).device.type
    optimizer = build_optimizer(model, learning_rate=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device_type) if amp_dtype == torch.float16 else None
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] + 1).loss
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def train_section(settings: BenchSettings, device: str = "cpu", model=None) -> dict[str, Any]:
    """xraycap's training step (`run_captioning.py --cache_features --mixed_precision auto`) against the seed loop
    (a), with the one-off feature encoding charged to each step (spread over `amortize_epochs` epochs); and the
    step's compute fraction: its FLOPs (`FlopCounterMode`: matmuls, convolutions, attention) / its time / the
    machine's matmul rate in the training precision, read just before and after the step."""
    device = torch.device(device)
    amp_dtype = autocast_dtype(device.type)
    model = (model or build_model(settings.preset)).to(device).train()
    batch = random_batch(model.config, settings.batch_size, settings.text_tokens)
    batch = {k: v.to(device) for k, v in batch.items()}
    seed_model = SeedCaptioner(model).to(device).train()
    seed_optimizer = torch.optim.AdamW([p for p in seed_model.parameters() if p.requires_grad], lr=1e-4)
    steps = {
        "seed": lambda: seed_train_step(seed_model, seed_optimizer, batch),
        "xraycap": make_xraycap_step(model, step_inputs(model, batch, amp_dtype), amp_dtype),
    }
    for _ in range(settings.warmup_steps):  # first-call allocations, kernel choice, optimizer state
        for step in steps.values():
            step()
    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = counter.get_total_flops()
    mm_dtype, side = amp_dtype or torch.float32, settings.matmul_size
    times: dict[str, list[float]] = {"seed": [], "xraycap": [], "encoding": []}
    rates = []
    for _ in tqdm(range(settings.repeats), desc=f"training steps ({device.type})", leave=False):
        times["seed"].append(timed(steps["seed"], device)[0])
        before = matmul_rate(mm_dtype, side, device)
        times["xraycap"].append(timed(steps["xraycap"], device)[0])
        rates.append(math.sqrt(before * matmul_rate(mm_dtype, side, device)))
        times["encoding"].append(timed(lambda: encode_features(model, batch, amp_dtype), device)[0])
    amortized = [t + e / settings.amortize_epochs for t, e in zip(times["xraycap"], times["encoding"])]
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    fractions = [flops["xraycap"] / t / r for t, r in zip(times["xraycap"], rates)]
    seconds = {name: summarize(values) for name, values in times.items()}
    xraycap, seed = seconds["xraycap"]["median"], seconds["seed"]["median"]
    what = f"{device.type} training step, {settings.preset}, batch {settings.batch_size}, {precision}"
    return {
        "setup": {
            "precision": precision,
            "text_tokens": settings.text_tokens,
            "image_prefix_tokens": model.max_prefix_length,
            "xraycap": f"cached features, fp32 weights under {precision} autocast, fused AdamW, clipping 1.0",
            "seed": "fp32, encoder every step, image vector added to every token, labels = input_ids, AdamW",
        },
        "seconds_per_step": seconds,
        "flops_per_step": flops,
        "matmul_flops_per_second": {"precision": precision, "matrix_side": side, **summarize(rates)},
        "figures": {
            "train_speedup_vs_seed": figure(
                ratio(times["seed"], amortized), what, f"{xraycap:.3f} s", f"{seed:.3f} s (a) seed loop, fp32"
            ),
            "train_compute_fraction": figure(
                summarize(fractions),
                f"{device.type} compute fraction of that step ({flops['xraycap'] / 1e9:.1f} GFLOP)",
                f"{flops['xraycap'] / xraycap / 1e9:.0f} GFLOP/s",
                f"{statistics.median(rates) / 1e9:.0f} GFLOP/s {precision} matmul",
            ),
        },
    }


def beam_section(settings: BenchSettings, device: str = "cpu", model=None) -> dict[str, Any]:
    """Beam search (`num_beams`) with the KV cache against the same `generate` call with `use_cache=False` (b), in
    fp32: exactly `new_tokens` new tokens from cached image features (the encoder runs once either way)."""
    device = torch.device(device)
    model = (model or build_model(settings.preset)).to(device).eval()
    batch = {k: v.to(device) for k, v in random_batch(model.config, settings.batch_size, 2, seed=1).items()}
    kwargs = {"image_features": encode_features(model, batch, None), "view_mask": batch["view_mask"]}
    kwargs |= {"num_beams": settings.num_beams, "do_sample": False}
    kwargs |= {"max_new_tokens": settings.new_tokens, "min_new_tokens": settings.new_tokens}
    times: dict[str, list[float]] = {"kv_cache": [], "no_cache": []}
    with torch.no_grad():
        cached = model.generate(**kwargs)  # warm-up
        for i in tqdm(range(max(settings.beam_repeats, settings.nocache_repeats)), desc="beam", leave=False):
            if i < settings.nocache_repeats:
                seconds, uncached = timed(lambda: model.generate(**kwargs, use_cache=False), device)
                times["no_cache"].append(seconds)
            if i < settings.beam_repeats:
                seconds, cached = timed(lambda: model.generate(**kwargs), device)
                times["kv_cache"].append(seconds)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    equal = bool(torch.equal(cached.cpu(), uncached.cpu()))
    what = f"{device.type} beam search, {settings.num_beams} beams, {settings.new_tokens} tokens, batch "
    what += f"{settings.batch_size}, fp32, outputs equal: {equal}"
    baseline = f"{seconds['no_cache']:.2f} s (b) use_cache=False"
    return {
        "outputs_equal": equal,
        "seconds_per_batch": {name: summarize(values) for name, values in times.items()},
        "figures": {
            "beam_speedup_vs_nocache": figure(
                ratio(times["no_cache"], times["kv_cache"]), what, f"{seconds['kv_cache']:.2f} s", baseline
            )
        },
    }


def data_section(settings: BenchSettings, workdir: Path) -> dict[str, Any]:
    """An epoch of training batches from the built dataset (`xraycap.training.data.IndexedStudies` + `StudyCollator`: the
    stored 512-px PNGs decoded and processed) against the same collator fed the ORIGINAL full-size PNGs (c). Same
    studies, reports and batch size, `num_workers=0` on both."""
    paths, mean_side = make_full_size_studies(
        workdir / "full_size", settings.data_studies, settings.full_size
    )
    dataset, _ = build_dataset(workdir / "full_size", image_size=512, cache_dir=workdir / "cache")
    built = datasets.concatenate_datasets([split for split in dataset.values() if len(split)])
    config = XrayCapConfig.from_preset(settings.preset)
    tokenizer = train_tokenizer(list(built["report"]) * 4, vocab_size=300)
    processor = XrayCapProcessor(XrayCapImageProcessor(size=config.image_size), tokenizer, max_views=2)
    collator = StudyCollator(processor, max_views=2, max_target_length=128)
    studies = {
        "built_dataset": IndexedStudies(built),
        # (c): the same studies as `IndexedStudies` items, their views the original PNG files
        "full_size_png": [
            (i, {"images": paths[str(uid)][:2], "report": report})
            for i, (uid, report) in enumerate(zip(built["uid"], built["report"]))
        ],
    }
    loaders = {
        name: DataLoader(s, batch_size=settings.batch_size, collate_fn=collator)
        for name, s in studies.items()
    }

    def epoch(loader) -> list[tuple[int, ...]]:
        return [tuple(batch["pixel_values"].shape) for batch in loader]

    shapes = {name: epoch(loader) for name, loader in loaders.items()}  # warm-up (page cache, imports)
    if shapes["built_dataset"] != shapes["full_size_png"]:
        raise RuntimeError(
            f"The two data paths gave different batches: {shapes}; they must read the same studies."
        )
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in tqdm(range(settings.data_repeats), desc="data epochs", leave=False):
        for name, loader in loaders.items():
            times[name].append(timed(lambda loader=loader: epoch(loader), torch.device("cpu"))[0])
    seconds = {name: statistics.median(values) for name, values in times.items()}
    images = sum(shape[0] * shape[1] for shape in shapes["built_dataset"])
    baseline = f"{seconds['full_size_png']:.2f} s (c) {mean_side:.0f} px PNGs"
    return {
        "setup": {"stored_side_px": 512, "model_side_px": config.image_size, "num_workers": 0},
        "seconds_per_epoch": {name: summarize(values) for name, values in times.items()},
        "figures": {
            "data_speedup_vs_png": figure(
                ratio(times["full_size_png"], times["built_dataset"]),
                f"data loading, an epoch of {len(built)} studies ({images} images)",
                f"{seconds['built_dataset']:.2f} s from the built dataset",
                baseline,
            )
        },
    }


# The build's own peak RSS: the child's VmHWM. Not getrusage's ru_maxrss, which Linux carries over from the parent
# across fork + exec (the parent here may hold a 150M-parameter model).
_BUILD_RUNNER = """
import json, sys, time
start = time.perf_counter()
from xraycap.dataset_builder.__main__ import main
rc = main(sys.argv[1:])
status = open("/proc/self/status").read().splitlines()
peak_kb = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
print("BENCH_RESULT " + json.dumps({"peak_rss_mb": peak_kb / 1024, "seconds": time.perf_counter() - start}))
sys.exit(rc)
"""


def build_section(settings: BenchSettings, workdir: Path) -> dict[str, Any]:
    """`python -m dataset_builder build` of phantom layouts (`synthesize`, frontal + lateral per study) of
    `build_sizes` images, each build in a fresh process with a fresh cache: its peak RSS (the largest of
    `build_repeats`) and wall time. With bounded build memory the peak barely grows with the size."""
    rows = []
    for size in tqdm(settings.build_sizes, desc="dataset builds", leave=False):
        layout = workdir / f"layout_{size}"
        synthesize(layout, num_studies=size // 2, image_size=settings.build_image_px)
        runs = []
        for r in range(settings.build_repeats):
            out = workdir / f"built_{size}_{r}"
            cmd = [sys.executable, "-c", _BUILD_RUNNER, "build", "--data_dir", str(layout)]
            cmd += ["--output_dir", str(out), "--cache_dir", f"{out}_cache", "--writer_batch_size", "64"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"The dataset build of {size} images failed: {proc.stderr[-2000:]}")
            runs.append(json.loads(proc.stdout.rsplit("BENCH_RESULT ", 1)[1]))
        peak = max(run["peak_rss_mb"] for run in runs)
        rows.append({"images": size // 2 * 2, "peak_rss_mb": round(peak, 1), "seconds": runs[0]["seconds"]})
    growth = {"median": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1}
    what = f"dataset build peak RSS growth, {rows[0]['images']:,} to {rows[-1]['images']:,} images"
    what += f" of {settings.build_image_px} x {settings.build_image_px} px"
    peaks = " / ".join(f"{row['peak_rss_mb']:.0f}" for row in rows) + " MB"
    setup = {"image_px": settings.build_image_px, "writer_batch_size": 64}
    return {"setup": setup, "series": rows, "figures": {"build_rss_growth": figure(growth, what, peaks, "-")}}
