"""The benchmark sections. Each returns a JSON-ready dict; every ratio pairs repeats measured back to back in
this process (A, B, A, B, ...), so both sides see the same machine load.

- `train_section`: xraycap's training step vs the seed loop (a), plus the compute-efficiency figure.
- `beam_section`: beam search with the KV cache vs without (b), outputs asserted equal.
- `data_section`: an epoch of loading from the built dataset vs decoding the full-size PNGs (c).
- `build_section`: dataset build time and peak RSS at several sizes (one subprocess per size).
- `gpu_section`: the train / beam / matmul figures on CUDA with fp16/bf16 and larger batches.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from .baselines import (
    FullSizePngStudies,
    SeedStyleCaptioner,
    generate_without_cache,
    make_seed_optimizer,
    seed_language_model,
    seed_train_step,
)
from .flops import compute_fraction_figures, count_flops, gpt2_training_flops, matmul_rate
from .inputs import make_full_size_studies, make_placeholder_layout, random_training_batch, read_studies
from .timing import REPO_ROOT, ratio_summary, summarize, timed

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import run_captioning  # noqa: E402
from configuration_xraycap import XrayCapConfig  # noqa: E402
from gradient_clipping import clip_grad_norm_  # noqa: E402
from master_weights import MasterWeightsAdamW  # noqa: E402
from modeling_xraycap import XrayCapForConditionalGeneration  # noqa: E402
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class BenchSettings:
    """
    Sizes and repeat counts of one benchmark run.

    Args:
        preset (`str`): `XrayCapConfig` preset of the model ("resnet50-gpt2" = the real sizes).
        batch_size (`int`): studies per training / generation batch.
        text_tokens (`int`): report tokens per study (bos included) in the training batch.
        repeats (`int`): timed repeats of each training variant.
        warmup_steps (`int`): untimed steps of each training variant first. The allocator takes a few steps
            to settle (page faults fall from ~450k in the first step to ~0 by the fifth at the real size);
            a training run lives in that steady state.
        num_beams (`int`), new_tokens (`int`): beam search settings.
        beam_repeats (`int`), nocache_repeats (`int`): timed generations with / without the KV cache.
        data_studies (`int`): studies (2 full-size views each) in the data-loading benchmark.
        data_repeats (`int`): epochs timed per data path.
        full_size_range (`tuple[int, int]`): side range (px) of the generated full-size PNGs.
        build_sizes (`tuple[int, ...]`): image counts of the dataset builds.
        build_image_px (`int`): side of the placeholder PNGs in the build benchmark.
        build_repeats (`int`): builds per size (time: median; peak RSS: the largest).
        matmul_size (`int`): side of the square matrices of the matmul-rate measurement.
        amortize_epochs (`int`): epochs the one-off feature-encoding pass is spread over
            (run_captioning's default `--num_train_epochs`).
        learning_rate (`float`): learning rate of both optimizers (it does not change the timing).
        gpu_batch_sizes (`tuple[int, ...]`): batch sizes of the GPU training figures.
        native_grid (`bool`): also time xraycap with the encoder's native token grid (`grid_size=None`: 7x7
            = 49 tokens per view for ResNet-50) instead of the preset's pooled one.
    """

    preset: str = "resnet50-gpt2"
    batch_size: int = 8
    text_tokens: int = 60
    repeats: int = 5
    warmup_steps: int = 4
    num_beams: int = 3
    new_tokens: int = 60
    beam_repeats: int = 3
    nocache_repeats: int = 1
    data_studies: int = 8
    data_repeats: int = 3
    full_size_range: tuple[int, int] = (2048, 2900)
    build_sizes: tuple[int, ...] = (1000, 2000, 4000, 8000)
    build_image_px: int = 128
    build_repeats: int = 3
    matmul_size: int = 4096
    amortize_epochs: int = 14
    learning_rate: float = 1e-4
    gpu_batch_sizes: tuple[int, ...] = (8, 32)
    native_grid: bool = True


QUICK = BenchSettings()
FULL = BenchSettings(repeats=9, beam_repeats=5, nocache_repeats=2, data_studies=16, data_repeats=5)
# Tiny sizes for the harness's own test: every code path, in seconds.
SMOKE = BenchSettings(
    preset="tiny",
    batch_size=2,
    text_tokens=8,
    repeats=2,
    warmup_steps=1,
    num_beams=2,
    new_tokens=5,
    beam_repeats=1,
    nocache_repeats=1,
    data_studies=2,
    data_repeats=1,
    full_size_range=(300, 360),
    build_sizes=(40, 80),
    build_image_px=16,
    build_repeats=1,
    matmul_size=256,
    gpu_batch_sizes=(2,),
)


# --------------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------------


def build_model(settings: BenchSettings, seed: int = 0) -> XrayCapForConditionalGeneration:
    """The preset's model with random weights (no Hub access), frozen encoder."""
    torch.manual_seed(seed)
    config = XrayCapConfig.from_preset(settings.preset, freeze_vision_encoder=True)
    return XrayCapForConditionalGeneration(config)


def make_xraycap_optimizer(
    model, learning_rate: float, amp_dtype: torch.dtype | None = None, master_weights: str = "auto"
) -> torch.optim.Optimizer:
    """The optimizer exactly as a single-process run_captioning builds it for `amp_dtype` autocast and
    `--master_weights` (`auto`: fp32 master weights with the model in bf16 for CPU bf16 training)."""
    device = next(model.parameters()).device
    mixed_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "no")
    uses_master = run_captioning.uses_master_weights(
        master_weights, mixed_precision, device, DistributedType.NO
    )
    return run_captioning.build_optimizer(model, learning_rate, 0.01, device, master_weights=uses_master)


def xraycap_train_step(
    model,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, torch.Tensor],
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float = 1.0,
) -> float:
    """One optimizer step as run_captioning takes it: autocast forward (`run_captioning.training_loss`),
    backward, gradient clipping, AdamW (fp16: with a GradScaler)."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = run_captioning.training_loss(model, inputs)
    # Clipping as `run_captioning.clip_gradients` does it: fp16 is left to accelerate (unscale, then torch's
    # clipping); without a GradScaler the rescale rides on the fused AdamW step.
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        loss.backward()
        clip_grad_norm_(model.parameters(), max_grad_norm, optimizer)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


@torch.no_grad()
def encode_features(model, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None) -> torch.Tensor:
    """The one-off `--cache_features` pass for one batch: frozen encoder, autocast, no grad."""
    device_type = batch["pixel_values"].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model.get_image_features(batch["pixel_values"], batch["view_mask"])


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# (a) training + compute efficiency
# --------------------------------------------------------------------------------------------------


def train_section(
    settings: BenchSettings,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = torch.bfloat16,
    batch_size: int | None = None,
    model: XrayCapForConditionalGeneration | None = None,
    reference_rate: float | None = None,
) -> dict[str, Any]:
    """
    xraycap's training step against the seed loop (a), at the preset's sizes, and the compute-efficiency
    figure. xraycap's side is what `run_captioning.py --cache_features --mixed_precision auto` runs:
    the frozen encoder's features are computed once (autocast, channels_last) and each step trains the
    projection + GPT-2 under `amp_dtype` autocast (`benchmarks/run.py` passes what `auto` resolves to: on a CPU
    with bf16 matmul hardware bf16, with bf16 weights and fp32 master weights, `--master_weights auto`; on
    other CPUs None, fp32); the one-off encoding is charged to each step, spread over `amortize_epochs`
    epochs. Also timed: the same step without the feature cache (encoder run every step,
    autocast + channels_last), which is what runs when image augmentation is on.

    Each repeat times, back to back: the seed step, the xraycap step, the uncached xraycap step, the xraycap
    step with the encoder's native grid (when the preset pools it), and a run of large matmuls in `amp_dtype`
    and in fp32. Ratios and fractions are per repeat, then the median. When xraycap's step holds bf16 weights, also
    the same step with fp32 weights under autocast and torch's fused AdamW (`fp32_weights`, `--master_weights
    off`): what the master weights save.

    `reference_rate` (FLOP/s, `amp_dtype` matmuls of the same size on the same machine, e.g. the highest rate an
    earlier run read) joins this section's own readings as the machine's rate of the headline fraction, so
    that a run whose readings were all taken under load is still held to a rate the machine has shown.
    """
    device = torch.device(device)
    batch_size = batch_size or settings.batch_size
    # A process-wide allocator setting run_captioning applies for CPU training: both sides run with it.
    reuses_freed_memory = device.type == "cpu" and run_captioning.reuse_freed_memory()
    model = model or build_model(settings)
    config = model.config
    text = config.text_config
    batch = random_training_batch(
        batch_size,
        settings.text_tokens,
        config.max_views,
        config.image_size,
        config.vocab_size,
        config.bos_token_id,
    )
    batch = _to(batch, device)
    model.to(device)
    model.vision_model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # The seed loop: its own fp32 ResNet (same weights, default memory format) and its own GPT-2 as the
    # notebook loads it (stock GPT-2 settings, same weights as xraycap's decoder).
    seed_vision = copy.deepcopy(model.vision_model).to(memory_format=torch.contiguous_format)
    seed_decoder = seed_language_model(model.language_model)
    seed_model = SeedStyleCaptioner(seed_vision, seed_decoder, model.vision_feature_dim).to(device)
    seed_model.train()
    seed_optimizer = make_seed_optimizer(seed_model, settings.learning_rate)
    # `--master_weights off`: the same model and step, fp32 weights under autocast (copied before the optimizer
    # below turns the model's weights into bf16).
    reference = copy.deepcopy(model)
    optimizer = make_xraycap_optimizer(model, settings.learning_rate, amp_dtype)
    model.train()

    features = encode_features(model, batch, amp_dtype)
    cached_inputs = {
        "image_features": features,
        "view_mask": batch["view_mask"],
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
    }
    uncached_inputs = {k: v for k, v in batch.items()}

    def step_cached():
        return xraycap_train_step(model, optimizer, cached_inputs, amp_dtype, scaler)

    def step_uncached():
        return xraycap_train_step(model, optimizer, uncached_inputs, amp_dtype, scaler)

    def step_seed():
        return seed_train_step(seed_model, seed_optimizer, batch)

    # The same model with the encoder's native grid (7x7 per view for ResNet-50), when the preset pools it.
    native = None
    if settings.native_grid and config.visual_tokens == "grid" and config.grid_size is not None:
        native_config = copy.deepcopy(config)
        native_config.grid_size = None
        native = XrayCapForConditionalGeneration(native_config).to(device)
        native.load_state_dict(reference.state_dict())
        native.vision_model.to(memory_format=torch.channels_last)
        native.train()
        native_optimizer = make_xraycap_optimizer(native, settings.learning_rate, amp_dtype)
        native_inputs = {**cached_inputs, "image_features": encode_features(native, batch, amp_dtype)}
        if native.max_prefix_length == model.max_prefix_length:
            native = None  # the preset's map is already no larger than grid_size

    def step_native():
        return xraycap_train_step(native, native_optimizer, native_inputs, amp_dtype, scaler)

    fp32_weights = None
    if isinstance(optimizer, MasterWeightsAdamW):
        fp32_weights = reference.train()
        fp32_optimizer = make_xraycap_optimizer(fp32_weights, settings.learning_rate, amp_dtype, "off")
    del reference

    def step_fp32_weights():
        return xraycap_train_step(fp32_weights, fp32_optimizer, cached_inputs, amp_dtype)

    # Warm-up (first-call allocations, oneDNN kernel selection, the allocator settling), and the FLOP
    # counts (one more step each).
    mm_dtype = amp_dtype or torch.float32
    for _ in range(settings.warmup_steps):
        for fn in (
            step_seed,
            step_cached,
            step_uncached,
            *((step_native,) if native else ()),
            *((step_fp32_weights,) if fp32_weights else ()),
        ):
            fn()
    flops_cached, flops_cached_by_op = count_flops(step_cached)
    flops_seed, _ = count_flops(step_seed)
    flops_uncached, _ = count_flops(step_uncached)
    flops_native = count_flops(step_native)[0] if native else None
    flops_fp32_weights = count_flops(step_fp32_weights)[0] if fp32_weights else None

    times: dict[str, list[float]] = {
        k: [] for k in ("seed", "cached", "uncached", "encode", "native", "fp32_weights")
    }
    rates: dict[str, list[float]] = {
        "amp": [],
        "amp_spread": [],
        "amp_readings": [],
        "fp32": [],
        "fp32_weights": [],
    }
    for _ in tqdm(range(settings.repeats), desc=f"train repeats ({device.type})", leave=False):
        times["seed"].append(timed(step_seed, device)[0])
        # The matmul rate the xraycap step is measured against brackets it: read just before and just after, and
        # the geometric mean of the two taken, so that a change in the neighbours' load between the step and
        # a reading made seconds later does not land on one side of the fraction only.
        before = matmul_rate(mm_dtype, settings.matmul_size, device)[0]
        times["cached"].append(timed(step_cached, device)[0])
        after = matmul_rate(mm_dtype, settings.matmul_size, device)[0]
        rates["amp"].append(math.sqrt(before * after))
        rates["amp_spread"].append(max(before, after) / min(before, after))
        rates["amp_readings"] += [before, after]
        if fp32_weights:
            times["fp32_weights"].append(timed(step_fp32_weights, device)[0])
            last = matmul_rate(mm_dtype, settings.matmul_size, device)[0]
            rates["fp32_weights"].append(math.sqrt(after * last))
            rates["amp_readings"].append(last)
        times["uncached"].append(timed(step_uncached, device)[0])
        if native:
            times["native"].append(timed(step_native, device)[0])
        times["encode"].append(timed(lambda: encode_features(model, batch, amp_dtype), device)[0])
        if mm_dtype == torch.float32:  # the bracketing readings are the fp32 rate already
            rates["fp32"].append(rates["amp"][-1])
        else:
            rates["fp32"].append(matmul_rate(torch.float32, settings.matmul_size, device)[0])

    bf16_probe = {}
    if mm_dtype == torch.float32 and device.type == "cpu":
        # Why the step is fp32 here (run_captioning's `auto` on a CPU without bf16 matmul hardware): one reading
        # of bf16 matmuls, on matrices small enough for torch's scalar fallback to finish in seconds.
        side = min(512, settings.matmul_size)
        bf16_probe = {
            "bf16_small_matrices": {
                "flops_per_second": matmul_rate(torch.bfloat16, side, device, runs=3)[0],
                "matrix_side": side,
                "bf16_matmul_hardware": run_captioning.cpu_has_bf16_matmuls(),
            }
        }
    epochs = settings.amortize_epochs
    amortized = [c + e / epochs for c, e in zip(times["cached"], times["encode"])]
    speedup = ratio_summary(times["seed"], amortized)
    # Best-of-N estimate: each side's least-disturbed repeat. On a shared machine a load burst that hits one
    # side of a pair inflates or deflates that pair's ratio; the headline takes the lower of the two.
    speedup_best = min(times["seed"]) / min(amortized)
    peak_rate = max(rates["amp_readings"] + [reference_rate or 0.0])
    efficiency = compute_fraction_figures(flops_cached, times["cached"], rates["amp"], peak_rate)
    prefix = model.max_prefix_length
    analytic = gpt2_training_flops(
        text.n_layer, text.n_embd, text.vocab_size, batch_size * (prefix + settings.text_tokens),
        prefix + settings.text_tokens,
    )  # fmt: skip
    optimizer_name = f"run_captioning's {type(optimizer).__name__} " + (
        "(bf16 weights, fp32 master weights)"
        if isinstance(optimizer, MasterWeightsAdamW)
        else f"(fused={bool(optimizer.defaults.get('fused'))}, foreach={optimizer.defaults.get('foreach')})"
    )
    result = {
        "setup": {
            "preset": settings.preset,
            "device": device.type,
            "precision": dtype_name(amp_dtype),
            "batch_size": batch_size,
            "text_tokens": settings.text_tokens,
            "views": config.max_views,
            "image_size": config.image_size,
            "image_prefix_tokens": prefix,
            "grid_size": config.grid_size,
            "activation_function": text.activation_function,
            "attention_implementation": model.language_model.config._attn_implementation,
            "dropout": sorted(
                {type(m).__name__ for m in model.language_model.modules() if isinstance(m, nn.Dropout)}
            ),
            "reuse_freed_memory": reuses_freed_memory,
            "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "trainable_parameters_m": round(
                sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 1
            ),
            "xraycap_side": (
                f"run_captioning --cache_features: features encoded once ({dtype_name(amp_dtype)} autocast, "
                f"channels_last), one-off cost spread over {epochs} epochs; step under "
                f"{dtype_name(amp_dtype)} autocast, grad clipping 1.0; optimizer: {optimizer_name}; forward: "
                "run_captioning.training_loss (logits on the report positions only)"
            ),
            "seed_side": (
                "fp32, no autocast, frozen ResNet-50 run every step on every view (pooled vectors averaged), "
                "image vector added to every token embedding, labels = input_ids, default AdamW, stock GPT-2 "
                f"settings (activation {seed_decoder.config.activation_function})"
            ),
        },
        "seconds_per_step": {
            "seed": summarize(times["seed"]),
            "xraycap_cached_features": summarize(times["cached"]),
            "xraycap_cached_amortized": summarize(amortized),
            "xraycap_no_cache": summarize(times["uncached"]),
            "feature_encoding_per_batch": summarize(times["encode"]),
        },
        "samples_per_second": {
            "seed": batch_size / summarize(times["seed"])["median"],
            "xraycap": batch_size / summarize(amortized)["median"],
            "xraycap_no_cache": batch_size / summarize(times["uncached"])["median"],
        },
        "speedup_vs_seed": speedup,
        "speedup_vs_seed_best_times": speedup_best,
        "speedup_vs_seed_headline": min(speedup["median"], speedup_best),
        "speedup_vs_seed_steady_state": ratio_summary(times["seed"], times["cached"]),
        "speedup_vs_seed_no_feature_cache": ratio_summary(times["seed"], times["uncached"]),
        "flops_per_step": {
            "xraycap_cached_features": flops_cached,
            "xraycap_no_cache": flops_uncached,
            "seed": flops_seed,
            "xraycap_by_op": flops_cached_by_op,
            "xraycap_decoder_analytic": analytic,
        },
        "matmul_flops_per_second": {
            dtype_name(mm_dtype): summarize(rates["amp"], unit="FLOP/s"),
            f"{dtype_name(mm_dtype)}_reading_after_over_before": summarize(rates["amp_spread"], unit="ratio"),
            f"{dtype_name(mm_dtype)}_highest_reading": max(rates["amp_readings"]),
            f"{dtype_name(mm_dtype)}_reference": peak_rate,
            f"{dtype_name(mm_dtype)}_reference_given": reference_rate,
            "fp32": summarize(rates["fp32"], unit="FLOP/s"),
            "matrix_side": settings.matmul_size,
            **bf16_probe,
        },
        **efficiency,
        "compute_fraction_vs_fp32_rate": summarize(
            [flops_cached / t / r for t, r in zip(times["cached"], rates["fp32"])], unit="fraction"
        ),
        "seed_compute_fraction_vs_fp32_rate": summarize(
            [flops_seed / t / r for t, r in zip(times["seed"], rates["fp32"])], unit="fraction"
        ),
    }
    if native:
        native_amortized = [n + e / epochs for n, e in zip(times["native"], times["encode"])]
        result["native_grid"] = {
            "what": "the same xraycap step with grid_size=None (the encoder's native map), timed in the same "
            "repeats",
            "image_prefix_tokens": native.max_prefix_length,
            "seconds_per_step": summarize(times["native"]),
            "samples_per_second": batch_size / summarize(native_amortized)["median"],
            "speedup_vs_seed": ratio_summary(times["seed"], native_amortized),
            "speedup_vs_seed_best_times": min(times["seed"]) / min(native_amortized),
            "flops_per_step": flops_native,
            "compute_fraction": summarize(
                [flops_native / t / r for t, r in zip(times["native"], rates["amp"])], unit="fraction"
            ),
        }
    if fp32_weights:
        result["fp32_weights"] = {
            "what": "the same step with fp32 weights under autocast and torch's fused AdamW (--master_weights "
            "off): every weight cast to bf16 in the forward and every weight gradient cast back. Each repeat "
            "times it right after the xraycap step, bracketed by the 'after' reading and one more.",
            "seconds_per_step": summarize(times["fp32_weights"]),
            "xraycap_speedup": ratio_summary(times["fp32_weights"], times["cached"]),
            "flops_per_step": flops_fp32_weights,
            **compute_fraction_figures(
                flops_fp32_weights, times["fp32_weights"], rates["fp32_weights"], peak_rate
            ),
        }
    return result


def dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# --------------------------------------------------------------------------------------------------
# (b) beam search
# --------------------------------------------------------------------------------------------------


def beam_section(
    settings: BenchSettings,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    model: XrayCapForConditionalGeneration | None = None,
    check_equal: bool = True,
    with_nocache: bool = True,
) -> dict[str, Any]:
    """
    Beam search with the KV cache (xraycap's `generate`) against the same call with `use_cache=False` (b):
    `num_beams` beams, exactly `new_tokens` new tokens, a batch of `batch_size` studies, precomputed image
    features (the encoder runs once either way and is not timed). Both outputs must be identical.
    """
    device = torch.device(device)
    batch_size = batch_size or settings.batch_size
    model = (model or build_model(settings)).to(device).eval()
    config = model.config
    batch = _to(
        random_training_batch(
            batch_size, 2, config.max_views, config.image_size, config.vocab_size, config.bos_token_id, seed=1
        ),
        device,
    )
    features = encode_features(model, batch, amp_dtype).float()
    kwargs = {
        "image_features": features,
        "view_mask": batch["view_mask"],
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.new_tokens,
        "min_new_tokens": settings.new_tokens,  # same amount of work on both sides, whatever the weights
        "do_sample": False,
    }

    def cached():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model.generate(**kwargs)

    def nocache():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return generate_without_cache(model, **kwargs)

    out_cached = cached()  # warm-up
    cached_times, nocache_times = [], []
    out_nocache = None
    nocache_repeats = settings.nocache_repeats if with_nocache else 0
    for i in tqdm(range(max(settings.beam_repeats, nocache_repeats)), desc="beam repeats", leave=False):
        if i < nocache_repeats:
            seconds, out_nocache = timed(nocache, device)
            nocache_times.append(seconds)
        if i < settings.beam_repeats:
            seconds, out_cached = timed(cached, device)
            cached_times.append(seconds)
    equal = bool(out_nocache is not None and torch.equal(out_cached.cpu(), out_nocache.cpu()))
    cached_summary = summarize(cached_times)
    result = {
        "setup": {
            "device": device.type,
            "precision": dtype_name(amp_dtype),
            "batch_size": batch_size,
            "num_beams": settings.num_beams,
            "new_tokens": int(out_cached.shape[1]),
            "image_prefix_tokens": model.max_prefix_length,
        },
        "seconds_per_batch": {"kv_cache": cached_summary},
        "reports_per_second": {"kv_cache": batch_size / cached_summary["median"]},
    }
    if not with_nocache:
        return result
    if check_equal and not equal:
        raise AssertionError("beam search with and without the KV cache gave different outputs")
    nocache_summary = summarize(nocache_times)
    result["seconds_per_batch"]["no_cache"] = nocache_summary
    result["reports_per_second"]["no_cache"] = batch_size / nocache_summary["median"]
    if len(nocache_times) == len(cached_times):  # paired repeats
        result["speedup"] = ratio_summary(nocache_times, cached_times)
    else:  # fewer no-cache repeats (they are long): ratio of the medians, both timed in this process
        result["speedup"] = summarize([nocache_summary["median"] / cached_summary["median"]], unit="x")
    result["outputs_equal"] = equal
    return result


# --------------------------------------------------------------------------------------------------
# (c) data loading
# --------------------------------------------------------------------------------------------------


def data_section(settings: BenchSettings, workdir: str | Path) -> dict[str, Any]:
    """
    One epoch of training batches from the built dataset (run_captioning's `IndexedStudies` +
    `StudyCollator`: stored 512-px PNGs decoded and processed to 224 px) against the same collator fed the
    ORIGINAL full-size PNG files (c). Same studies, same reports, same batch size, `num_workers=0` on both.
    """
    from torch.utils.data import DataLoader

    workdir = Path(workdir)
    start = time.perf_counter()
    layout = make_full_size_studies(workdir / "full_size", settings.data_studies, *settings.full_size_range)
    make_seconds = time.perf_counter() - start
    import datasets

    from dataset_builder import build_dataset

    build_start = time.perf_counter()
    dataset, report = build_dataset(
        workdir / "full_size", image_size=512, cache_dir=workdir / "cache", min_images=1
    )
    build_seconds = time.perf_counter() - build_start
    built = datasets.concatenate_datasets([dataset[s] for s in dataset if len(dataset[s])])
    originals = read_studies(workdir / "full_size")
    studies = [
        (originals[str(uid)][0][:2], report_text) for uid, report_text in zip(built["uid"], built["report"])
    ]

    config = XrayCapConfig.from_preset(settings.preset)
    tokenizer = train_tokenizer(list(built["report"]) * 4, vocab_size=300)
    processor = XrayCapProcessor(XrayCapImageProcessor(size=config.image_size), tokenizer, max_views=2)
    collator = run_captioning.StudyCollator(processor, max_views=2, max_target_length=128)
    loaders = {
        "built_dataset": DataLoader(
            run_captioning.IndexedStudies(built), batch_size=settings.batch_size, collate_fn=collator
        ),
        "full_size_png": DataLoader(
            FullSizePngStudies(studies), batch_size=settings.batch_size, collate_fn=collator
        ),
    }

    def epoch(loader):
        shapes = None
        for batch in loader:
            shapes = tuple(batch["pixel_values"].shape[1:])
        return shapes

    shapes = {name: epoch(loader) for name, loader in loaders.items()}  # warm-up (page cache, imports)
    if shapes["built_dataset"] != shapes["full_size_png"]:
        raise AssertionError(f"the two data paths give different batch shapes: {shapes}")
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in tqdm(range(settings.data_repeats), desc="data epochs", leave=False):
        for name, loader in loaders.items():
            times[name].append(timed(lambda loader=loader: epoch(loader))[0])
    n = len(built)
    return {
        "setup": {
            "studies": n,
            "images": sum(len(p) for p, _ in studies),
            "full_size_images": layout,
            "stored_image_size": 512,
            "model_image_size": config.image_size,
            "batch_size": settings.batch_size,
            "num_workers": 0,
            "seconds_to_make_full_size_pngs": round(make_seconds, 2),
            "seconds_to_build_dataset": round(build_seconds, 2),
            "num_examples": report["num_examples"],
        },
        "seconds_per_epoch": {name: summarize(values) for name, values in times.items()},
        "studies_per_second": {name: n / summarize(values)["median"] for name, values in times.items()},
        "speedup": ratio_summary(times["full_size_png"], times["built_dataset"]),
    }


# --------------------------------------------------------------------------------------------------
# dataset build scaling
# --------------------------------------------------------------------------------------------------

# Peak RSS of the build process itself: VmHWM (the high-water mark of this process's own address space).
# getrusage's ru_maxrss is NOT used: Linux carries the parent's high-water mark across fork + exec, so a
# child of a large process (this benchmark holds a 124M-parameter model) would report the parent's peak.
_BUILD_RUNNER = """
import json, resource, sys, time
start = time.perf_counter()
from dataset_builder.__main__ import main
rc = main(sys.argv[1:])
try:
    status = open("/proc/self/status").read()
    peak_kb = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:")))
except (OSError, StopIteration):
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH_RESULT " + json.dumps({"peak_rss_kb": peak_kb, "seconds": time.perf_counter() - start}))
sys.exit(rc)
"""


def run_build(data_dir: Path, output_dir: Path, cache_dir: Path) -> dict[str, float]:
    """One `python -m dataset_builder build` in a fresh subprocess: its wall time and peak RSS."""
    cmd = [sys.executable, "-c", _BUILD_RUNNER, "build", "--data_dir", str(data_dir)]
    cmd += ["--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--writer_batch_size", "64"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dataset build failed ({proc.returncode}): {proc.stderr[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    report = json.loads((output_dir / "build_report.json").read_text())
    return {
        "peak_rss_mb": result["peak_rss_kb"] / 1024,
        "build_seconds": float(report["seconds"]),
        "process_seconds": wall,
        "examples": sum(report["num_examples"].values()),
    }


def _linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {
        "seconds_per_1000_images": slope * 1000,
        "intercept_seconds": intercept,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
    }


def build_section(settings: BenchSettings, workdir: str | Path) -> dict[str, Any]:
    """
    Builds placeholder datasets of `build_sizes` images (two small PNGs per study), each in a fresh
    subprocess, and reports time and peak RSS per size. Linear time: the marginal cost per image between the
    two largest sizes over that between the two smallest (1 = linear) and the R^2 of a straight-line fit.
    """
    workdir = Path(workdir)
    rows = []
    for n in tqdm(settings.build_sizes, desc="dataset builds", leave=False):
        root = workdir / f"layout_{n}"
        images = make_placeholder_layout(root, n, settings.build_image_px)
        runs = [
            run_build(root, workdir / f"built_{n}_{r}", workdir / f"cache_{n}_{r}")
            for r in range(settings.build_repeats)
        ]  # a fresh cache each time: every repeat encodes every image
        seconds = summarize([r["build_seconds"] for r in runs])
        rows.append(
            {
                "images": images,
                "examples": runs[0]["examples"],
                "build_seconds": seconds["median"],
                "build_seconds_summary": seconds,
                "process_seconds": summarize([r["process_seconds"] for r in runs])["median"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "peak_rss_mb_values": [round(r["peak_rss_mb"], 1) for r in runs],
                "seconds_per_1000_images": seconds["median"] / images * 1000,
            }
        )
        logger.info(
            "built %d images in %.1f s (median), peak RSS %.0f MB",
            images,
            seconds["median"],
            rows[-1]["peak_rss_mb"],
        )
    xs = [r["images"] for r in rows]
    ys = [r["build_seconds"] for r in rows]
    first, last = rows[0], rows[-1]
    marginal_first = (rows[1]["build_seconds"] - first["build_seconds"]) / (
        rows[1]["images"] - first["images"]
    )
    marginal_last = (last["build_seconds"] - rows[-2]["build_seconds"]) / (
        last["images"] - rows[-2]["images"]
    )
    return {
        "setup": {"image_px": settings.build_image_px, "views": "pair", "writer_batch_size": 64},
        "series": rows,
        "rss_growth": last["peak_rss_mb"] / first["peak_rss_mb"] - 1,
        "time_fit": _linear_fit(xs, ys),
        "marginal_cost_ratio_last_vs_first": marginal_last / marginal_first
        if marginal_first > 0
        else math.nan,
        "sizes": xs,
    }


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


def gpu_section(settings: BenchSettings) -> dict[str, Any]:
    """
    The same figures on CUDA: matmul rates (fp32 without TF32, tf32, bf16, fp16), training at each of
    `gpu_batch_sizes` (seed loop in fp32 vs xraycap under bf16 autocast, or fp16 + GradScaler where bf16 is
    unsupported), beam search with / without the cache (fp32, outputs equal) and with the cache in half
    precision at the largest batch.
    """
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    device = torch.device("cuda")
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "amp_dtype": dtype_name(half)}
    size = 8192
    rates = {}
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    for name, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rates[name] = summarize([matmul_rate(dtype, size, device)[0] for _ in range(3)], unit="FLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    result["matmul_flops_per_second"] = rates
    model = build_model(settings)
    result["train"] = {}
    for batch_size in settings.gpu_batch_sizes:
        result["train"][f"batch_{batch_size}"] = train_section(
            settings, device, half, batch_size=batch_size, model=model
        )
        torch.cuda.empty_cache()
    result["beam_fp32"] = beam_section(settings, device, None, model=model)
    result["beam_half_cached_only"] = beam_section(
        settings, device, half, batch_size=max(settings.gpu_batch_sizes), model=model, with_nocache=False
    )
    result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="xraycap-bench-")
