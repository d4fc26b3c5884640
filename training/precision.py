"""Which `mixed_precision` a run really trains in, from what was asked for and what the hardware has.

`torch.cuda.is_bf16_supported()` says yes on GPUs that only emulate bf16 (T4, V100): the compute capability
decides instead. Accelerate silently trains in fp32 when asked for fp16 on a CPU, and torch runs bf16 matmuls
in a slow scalar fallback on CPUs without bf16 matmul hardware. `resolve_mixed_precision` makes both visible.
"""

from __future__ import annotations

import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


def cpu_has_bf16_matmuls() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX-BF16 or AVX512-BF16), as
    `torch.cpu.get_capabilities()` reports it; torch releases without that function ask oneDNN instead."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    capabilities = get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def resolve_mixed_precision(requested: str, device_type: str | None = None) -> str:
    """Maps `--mixed_precision` to the precision that really runs, for `Accelerator(mixed_precision=...)`.

    `auto` is bf16 on a CUDA GPU that runs it natively (compute capability >= 8.0), else fp16 (Accelerate adds
    a GradScaler), and on CPU bf16 only where the CPU has bf16 matmul
    hardware (else fp32, `"no"`). An explicit fp16 on CPU becomes bf16 (CPU autocast has no fp16 path that
    pays); an explicit bf16 on a CPU without the hardware is kept, with a warning.

    Args:
        requested (`str`):
            One of `"auto"`, `"no"`, `"fp16"`, `"bf16"`.
        device_type (`str`, *optional*):
            `"cpu"` or `"cuda"`. Defaults to CUDA when it is available and `ACCELERATE_USE_CPU` is not set, as
            Accelerate decides.

    Returns:
        `str`: `"no"`, `"fp16"` or `"bf16"`.
    """
    if requested not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed precision {requested!r}: choose one of {MIXED_PRECISION_CHOICES}.")
    if device_type is None:
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        device_type = "cuda" if torch.cuda.is_available() and not use_cpu else "cpu"
    if device_type == "cuda":
        # This process's GPU (LOCAL_RANK, as Accelerate picks it), not device 0 for every process.
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        major, minor = torch.cuda.get_device_capability(
            local_rank if local_rank < torch.cuda.device_count() else 0
        )
        native_bf16 = major >= 8  # Ampere on; is_bf16_supported() also says yes on a T4 / V100 (emulated)
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            logger.warning(
                f"--mixed_precision bf16 on a GPU of compute capability {major}.{minor}: bf16 is emulated below 8.0 "
                "(Ampere) and runs slowly. --mixed_precision auto (or fp16) trains in fp16 with a GradScaler here."
            )
        return requested
    if requested == "auto":
        if cpu_has_bf16_matmuls():
            return "bf16"
        logger.info(
            "--mixed_precision auto: this CPU has no bf16 matmul hardware (AMX / AVX512-BF16); training in fp32. "
            "--mixed_precision bf16 forces bf16."
        )
        return "no"
    if requested == "fp16":
        logger.warning(
            "--mixed_precision fp16 has no autocast on CPU (Accelerate would silently run fp32); using bf16 instead."
        )
        requested = "bf16"
    if requested == "bf16" and not cpu_has_bf16_matmuls():
        logger.warning(
            "--mixed_precision bf16 on a CPU without bf16 matmul hardware (AMX / AVX512-BF16): torch's fallback "
            "runs bf16 matmuls far slower than fp32. --mixed_precision auto (or no) trains in fp32 here."
        )
    return requested
