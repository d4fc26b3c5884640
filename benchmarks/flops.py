"""FLOP counting of a training step, the machine's dense matmul rate, and the compute fraction made of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .timing import summarize, timed


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """
    Counts the floating-point operations `fn()` executes, with `torch.utils.flop_counter.FlopCounterMode`
    (matmuls, convolutions and attention, forward and backward: the operations that make up the model FLOPs;
    elementwise work is not counted, as in the usual MFU convention).

    Args:
        fn (`Callable[[], Any]`): runs one step (forward and backward for training).

    Returns:
        `tuple[int, dict[str, int]]`: the total and a split by operator.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if str(op).startswith("aten.") else str(op)  # "aten.mm" -> "mm"
        by_op[name] = by_op.get(name, 0) + int(flops)
    return int(counter.get_total_flops()), by_op


def gpt2_training_flops(n_layer: int, n_embd: int, vocab: int, tokens: int, seq_len: int) -> int:
    """
    Analytic matmul FLOPs of one GPT-2 forward + backward over `tokens` positions (sequences of `seq_len`):
    6 x (weight matmul parameters) x tokens, plus attention scores and mixing, plus the LM head. A cross-check
    for `count_flops`.
    """
    per_layer_weights = 4 * n_embd * n_embd + 2 * n_embd * 4 * n_embd  # qkv + proj, mlp up + down
    weights = n_layer * per_layer_weights + n_embd * vocab  # + LM head
    attention = n_layer * 2 * 2 * seq_len * n_embd  # q.k and p.v per position (full, not causal-halved)
    return 6 * weights * tokens + 3 * attention * tokens


def matmul_rate(
    dtype: torch.dtype, size: int = 4096, device: torch.device | str = "cpu", runs: int = 5
) -> tuple[float, float]:
    """
    The dense matmul rate: `runs` back-to-back `torch.mm` of two `size` x `size` matrices, after one untimed
    call, and the median. On a shared CPU the bf16 (AMX) rate of one isolated call swings by 2-3x with the
    neighbours' load; the median of a run of calls is the rate the surrounding work saw.

    Returns:
        `tuple[float, float]`: (FLOP/s, seconds of the median call).
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    seconds = sorted(timed(lambda: torch.mm(a, b), device)[0] for _ in range(runs))[runs // 2]
    return 2 * size**3 / seconds, seconds


def compute_fraction_figures(
    flops: float, seconds: list[float], rates: list[float], peak_rate: float
) -> dict[str, Any]:
    """
    The compute fraction of a step timed in several repeats: FLOPs / step time / matmul rate, three ways.

    On a shared machine the large-matmul rate drops far more under the neighbours' load than the step slows,
    so a loaded reading inflates the fraction. The headline is the lowest of: the median over repeats (each
    against the rate read around it), the least-loaded repeat (the highest rate), and the fastest step against
    the machine's rate: the highest rate read anywhere in the section, or a higher reference. The last keeps a
    run that was loaded throughout, whose bracketing readings all sit below the machine's rate, from passing on
    the load alone.

    Args:
        flops (`float`): counted FLOPs of one step.
        seconds (`list[float]`): step time of each repeat.
        rates (`list[float]`): the matmul rate read around each repeat's step (FLOP/s).
        peak_rate (`float`): the machine's matmul rate: the highest read in the section, or a higher reference
            (FLOP/s).

    Returns:
        `dict`: `compute_fraction` (summary over repeats), `compute_fraction_least_loaded_repeat`,
        `compute_fraction_fastest_step_at_machine_rate` and `compute_fraction_headline` (the lowest).
    """
    fractions = [flops / t / r for t, r in zip(seconds, rates)]
    median = summarize(fractions, unit="fraction")
    quietest = max(range(len(fractions)), key=lambda i: rates[i])
    best = flops / min(seconds) / peak_rate
    return {
        "compute_fraction": median,
        "compute_fraction_least_loaded_repeat": {
            "fraction": fractions[quietest],
            "matmul_flops_per_second": rates[quietest],
            "seconds_per_step": seconds[quietest],
        },
        "compute_fraction_fastest_step_at_machine_rate": {
            "fraction": best,
            "matmul_flops_per_second": peak_rate,
            "seconds_per_step": min(seconds),
        },
        "compute_fraction_headline": min(median["median"], fractions[quietest], best),
    }
