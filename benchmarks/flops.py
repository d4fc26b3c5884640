"""FLOP counting of a training step and the machine's dense matmul rate (the compute-efficiency figure)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .timing import timed


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
