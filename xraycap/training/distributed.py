"""How a run's processes are set up: the precision they train in, the Accelerator (its collective timeout and DDP
options), the CPU threads each process uses, and TF32.

- `resolve_mixed_precision` picks the precision that really runs: `torch.cuda.is_bf16_supported()` says yes on
  GPUs that only emulate bf16 (T4, V100), so the compute capability decides instead; Accelerate silently trains in
  fp32 when asked for fp16 on a CPU, and torch runs bf16 matmuls in a slow scalar fallback on CPUs without bf16
  matmul hardware. Both are made visible.
- Every process waits at a collective (a barrier while the main process builds the dataset, a gather) for at most
  `--ddp_timeout` seconds (torch's default is 600; Trainer's option of that name defaults to 1800).
- DDP re-broadcasts the model's buffers from rank 0 before every forward unless told not to; a frozen tower's
  BatchNorm statistics never change, so they are not sent (`broadcast_buffers=False`).
- `accelerate launch` sets `OMP_NUM_THREADS=1` when the user did not set a thread count, so one process on a
  CPU would use one core; such a process gets the machine's physical cores (shared by the node's processes).
"""

from __future__ import annotations

import logging as std_logging
import os
from datetime import timedelta

import datasets
import psutil
import torch
import transformers
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DataLoaderConfiguration
from transformers.utils import logging

from xraycap.training.models import encoder_is_frozen

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


# Set by `accelerate launch` in the processes it starts (and by nothing else).
ACCELERATE_LAUNCH_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_MIXED_PRECISION")


def thread_count_set_by_launcher() -> bool:
    """Whether `OMP_NUM_THREADS` was set by `accelerate launch` itself rather than by the user.

    The launcher copies a user's `OMP_NUM_THREADS` (or `--num_cpu_threads_per_process`) into its processes, and
    sets 1 otherwise: a value present in this process but absent from the launcher's own environment and command
    line is the launcher's default.
    """
    if "OMP_NUM_THREADS" not in os.environ or not all(k in os.environ for k in ACCELERATE_LAUNCH_MARKERS):
        return False
    try:
        launcher = psutil.Process(os.getppid())
        user_set = "OMP_NUM_THREADS" in launcher.environ() or any(
            "num_cpu_threads_per_process" in part for part in launcher.cmdline()
        )
    except (psutil.Error, OSError):  # the parent's environment is not readable here: keep the value
        return False
    return not user_set


def use_the_cpu_cores(device: torch.device) -> int:
    """On a CPU under `accelerate launch` without a user-set thread count: `torch.set_num_threads` to the
    physical cores divided by this node's processes, as a plain `python` process would use. Returns the count."""
    if device.type == "cpu" and thread_count_set_by_launcher():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        threads = max(1, cores // local_processes)
        if threads != torch.get_num_threads():
            logger.info(
                f"accelerate launch set OMP_NUM_THREADS=1; using {threads} threads ({cores} physical cores, "
                f"{local_processes} process(es) here). Set OMP_NUM_THREADS to choose."
            )
            torch.set_num_threads(threads)
    return torch.get_num_threads()


def set_tf32(enabled: bool | None) -> None:
    """`--tf32`: fp32 matmuls and convolutions in TF32 on Ampere+ GPUs (True), in full fp32 (False), or torch's
    default (None)."""
    if enabled is None:
        return
    precision = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def build_accelerator(model_args, train_args, mixed_precision: str, project_dir: str) -> Accelerator:
    """The run's Accelerator, with the process-group timeout, DDP options, threads, TF32 and quieter logs.

    Args:
        model_args (`ModelArguments`): whether the vision tower trains (`encoder_is_frozen`).
        train_args (`TrainingArguments`): `gradient_accumulation_steps`, `report_to`, `torch_compile`,
            `ddp_timeout`, `tf32`.
        mixed_precision (`str`): from `resolve_mixed_precision`.
        project_dir (`str`): where tracker logs go (`--report_to`).
    """
    frozen = encoder_is_frozen(model_args)
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=None if train_args.report_to == "none" else train_args.report_to,
        project_dir=project_dir,
        # A seedable sampler, so a resumed run sees the same batches; pinned batches copied without blocking.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_backend="inductor" if train_args.torch_compile else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=train_args.ddp_timeout)),
            # A trained tower may hold parameters the prefix never reads (a ViT's pooler): DDP must not wait for
            # their gradients. A frozen tower's buffers never change: no broadcast before every forward.
            DistributedDataParallelKwargs(find_unused_parameters=not frozen, broadcast_buffers=not frozen),
        ],
    )
    threads = use_the_cpu_cores(accelerator.device)
    set_tf32(train_args.tf32)
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file otherwise
        std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
    verbosity = std_logging.WARNING if accelerator.is_local_main_process else std_logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    compiled = accelerator.state.dynamo_plugin.backend.value.lower()
    logger.info(
        f"process {accelerator.process_index} of {accelerator.num_processes} on {accelerator.device}"
        f"{f' ({threads} threads)' if accelerator.device.type == 'cpu' else ''}, mixed precision "
        f"{mixed_precision}, torch.compile {'off' if compiled == 'no' else f'on ({compiled})'}"
    )
    if train_args.torch_compile and accelerator.device.type == "cpu" and mixed_precision == "bf16":
        logger.warning(
            "--torch_compile with bf16 on CPU: torch 2.14's Inductor fails to build some bf16 backward kernels "
            "(CppCompileError); if it does here, add --mixed_precision no."
        )
    return accelerator
