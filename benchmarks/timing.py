"""Timing helpers: repeat a callable, summarise the repeats (median and spread), describe the machine."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device | str = "cpu") -> None:
    """Waits for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Runs `fn()` once and returns `(seconds, result)`."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def summarize(values: list[float], unit: str = "s") -> dict[str, Any]:
    """
    Median and spread of repeated measurements.

    Args:
        values (`list[float]`): one measurement per repeat.
        unit (`str`, *optional*, defaults to `"s"`): what the values are in.

    Returns:
        `dict` with `median`, `min`, `max`, `spread` ((max - min) / median), `n`, `values` and `unit`.
    """
    if not values:
        raise ValueError("summarize() needs at least one measurement.")
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else 0.0,
        "n": len(values),
        "values": [round(v, 6) for v in values],
        "unit": unit,
    }


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """Ratios of paired repeats (measured back to back, so both saw the same machine load)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators: pair them.")
    return summarize([n / d for n, d in zip(numerators, denominators)], unit="x")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _dirty_python_files() -> list[str]:
    """Tracked .py files with uncommitted changes (the measured code may differ from `git_commit`)."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "*.py") or ""
    return [line.split(maxsplit=1)[1] for line in status.splitlines() if line.strip()]


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (other processes sharing the cores), where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    import datasets
    import numpy
    import PIL
    import transformers

    info: dict[str, Any] = {
        "measured_at_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git("rev-parse", "HEAD"),
        # Uncommitted changes to the code that was measured (model files, run_captioning, benchmarks).
        "git_dirty_files": _dirty_python_files(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }
    return info
