"""Where the training step's time goes: `torch.profiler` over `run_captioning.py`'s step at real size.

`python benchmarks/run.py --sections profile` runs it and writes `benchmarks/results/profile.json` (the machine, the
commit, every op's self CPU time and the grouped breakdown); docs/PERFORMANCE.md's profile paragraph is generated
from that file (`benchmarks/report.py`). The step is `sections.make_xraycap_step`'s (cached features, autocast in
the precision `--mixed_precision auto` picks, fused AdamW, clipping at 1.0), profiled over `profile_steps` steps
after `warmup_steps` untimed ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from . import sections as bench
from .inputs import random_batch

# The groups the breakdown reports, each with the aten ops whose self CPU time it sums (names without "aten::").
# An op in no group counts under "other ops"; profiler events that are not aten ops (autograd and optimizer
# annotations, whose self time is the Python and bookkeeping around the ops) count under "outside aten ops".
OP_GROUPS: dict[str, tuple[str, ...]] = {
    "matrix products": ("mm", "addmm", "bmm", "baddbmm"),
    "autocast's dtype casts": ("copy_", "_to_copy"),
    "dropout masks": ("bernoulli_", "native_dropout", "native_dropout_backward"),
    "fused AdamW": ("_fused_adamw_",),
    "zero-fills": ("zero_", "fill_"),
    "the gradient norm": ("_foreach_norm", "linalg_vector_norm", "_foreach_mul_", "stack", "clamp"),
    "the LM head's log-softmax and its backward": ("_log_softmax", "_log_softmax_backward_data"),
    "the loss (NLL)": ("nll_loss_forward", "nll_loss_backward"),
    "GELU": ("gelu", "gelu_backward"),
    "attention softmax": (
        "_safe_softmax",
        "_softmax",
        "_softmax_backward_data",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "layer norm": ("native_layer_norm", "native_layer_norm_backward"),
    "elementwise arithmetic": ("add", "add_", "mul", "mul_", "div", "div_", "sub", "where", "masked_fill"),
}
OTHER_OPS, OUTSIDE_ATEN = "other ops", "outside aten ops"
MAX_OPS_LISTED = 10  # the largest ops of each group named in the results file


def op_self_seconds(prof: profile) -> dict[str, float]:
    """Each profiler event's total self CPU time in seconds, keyed by its name ("aten::mm", ...)."""
    return {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}


def group_breakdown(op_seconds: dict[str, float], steps: int) -> list[dict[str, Any]]:
    """Sums the ops' self CPU time into `OP_GROUPS` (plus "other ops" and "outside aten ops").

    Args:
        op_seconds (`dict[str, float]`): event name -> self CPU seconds over all profiled steps.
        steps (`int`): how many steps were profiled.

    Returns:
        `list[dict]`: one entry per non-empty group, largest first: `group`, `ops` (its largest ops),
        `seconds_per_step` and `fraction` of the total self CPU time.
    """
    total = sum(op_seconds.values())
    if total <= 0:
        raise ValueError(f"The profile holds no CPU time ({op_seconds!r}); profile at least one step.")
    found: dict[str, dict[str, float]] = {}
    owner = {f"aten::{op}": group for group, ops in OP_GROUPS.items() for op in ops}
    for name, seconds in op_seconds.items():
        group = owner.get(name) or (OTHER_OPS if name.startswith("aten::") else OUTSIDE_ATEN)
        found.setdefault(group, {})[name] = seconds
    rows = [
        {
            "group": group,
            "ops": [
                name.removeprefix("aten::") for name, s in sorted(ops.items(), key=lambda op: -op[1]) if s > 0
            ][:MAX_OPS_LISTED],
            "seconds_per_step": sum(ops.values()) / steps,
            "fraction": sum(ops.values()) / total,
        }
        for group, ops in found.items()
    ]
    return sorted(rows, key=lambda row: -row["fraction"])


def profile_section(settings: bench.BenchSettings, device: str = "cpu", model=None) -> dict[str, Any]:
    """Profiles `profile_steps` xraycap training steps (after `warmup_steps`) with `torch.profiler` (CPU
    activity): the step `train_section` times, on the same random real-size batch.

    Returns:
        `dict`: `setup`, `steps`, `load_average_after` (the machine's load when the profile ends),
        `self_cpu_seconds_per_step`, `wall_seconds_per_step` (with the profiler's own
        overhead), `groups` (`group_breakdown`) and `top_ops` (the 15 ops with the most self CPU time).
    """
    device = torch.device(device)
    amp_dtype = bench.autocast_dtype(device.type)
    model = (model or bench.build_model(settings.preset)).to(device).train()
    batch = {
        k: v.to(device)
        for k, v in random_batch(model.config, settings.batch_size, settings.text_tokens).items()
    }
    step = bench.make_xraycap_step(model, bench.step_inputs(model, batch, amp_dtype), amp_dtype)
    for _ in range(settings.warmup_steps):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(settings.profile_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / settings.profile_steps
    # Self CPU time stretches when other jobs share the cores: the load at the end goes with the figures.
    load_after = [round(x, 2) for x in os.getloadavg()]
    op_seconds = op_self_seconds(prof)
    total = sum(op_seconds.values())
    top = sorted(op_seconds.items(), key=lambda item: -item[1])[:15]
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    return {
        "setup": {
            "device": device.type,
            "preset": settings.preset,
            "batch_size": settings.batch_size,
            "text_tokens": settings.text_tokens,
            "precision": precision,
            "warmup_steps": settings.warmup_steps,
            "torch_threads": torch.get_num_threads(),
            "measure": "self CPU time per op (torch.profiler key_averages), summed over the profiled steps",
        },
        "steps": settings.profile_steps,
        "load_average_after": load_after,
        "self_cpu_seconds_per_step": total / settings.profile_steps,
        "wall_seconds_per_step": wall,
        "groups": group_breakdown(op_seconds, settings.profile_steps),
        "top_ops": [{"op": name, "fraction": seconds / total} for name, seconds in top],
    }
