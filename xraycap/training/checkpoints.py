"""Training checkpoints: `accelerator.save_state` written crash-safely, the last K kept, `latest` resolved, resume
arguments checked.

A checkpoint is `accelerator.save_state` plus `trainer_state.json` (steps done, loss history, and the arguments a
resume depends on). It is written into `checkpoint-N.tmp`, fsynced (files and folder) and renamed to
`checkpoint-N` in one step, so neither a killed process nor a power cut leaves a folder that
`--resume_from_checkpoint latest` would pick up half-written. Older checkpoints are deleted only after that.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# What a resume depends on (which batches are skipped, the schedule), and how to get a matching value back.
RESUME_FIELDS = {
    "per_device_train_batch_size": "pass --per_device_train_batch_size {saved}",
    "gradient_accumulation_steps": "pass --gradient_accumulation_steps {saved}",
    "num_processes": "launch {saved} processes (accelerate launch --num_processes {saved})",
    "max_steps": "pass the same --max_steps / --num_train_epochs ({saved} optimizer steps)",
    "train_examples": "use the same data and split ({saved} training studies)",
    "steps_per_epoch": "use the same data, batch size and process count ({saved} steps per epoch)",
    "seed": "pass --seed {saved}",
    # bf16 and fp16 checkpoints differ (only fp16 saves a GradScaler); `auto` is bf16 on an A100, fp16 on a V100.
    "mixed_precision": "pass --mixed_precision {saved} (`auto` resolves by the hardware)",
}


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in `root`, oldest first; a folder still being written (`.tmp` suffix) is not one."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _fsync(path: Path) -> None:
    """Flushes one file or folder to disk (folders only where the OS can open them: not on Windows)."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flushes every file under `folder`, then its subfolders and `folder` itself."""
    paths = sorted(folder.rglob("*"), key=lambda p: p.is_dir())
    for path in [*paths, folder]:
        _fsync(path)


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (empty when all are finite)."""
    return [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Saves the training state as `root/checkpoint-{step}` and deletes all but the last `keep` checkpoints.

    The checkpoint is complete on disk before it gets its name; rotation runs after that and never deletes the
    checkpoint just written, even next to higher-numbered ones from an older run.

    Args:
        accelerator (`Accelerator`): holds the prepared model, optimizer, scheduler, samplers and RNG states.
        root (`Path`): the checkpoints folder.
        step (`int`): optimizer steps done.
        state (`dict[str, Any]`): JSON-serialisable loop state, saved as `trainer_state.json`.
        keep (`int`): how many checkpoints to keep (0 keeps all).

    Returns:
        `Path`: the checkpoint folder.

    Raises:
        `RuntimeError`: when writing fails (a full disk, ...): it names the cause and the checkpoint kept; the
        partial folder is removed.
    """
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    previous = [p for p in list_checkpoints(root) if p != final]
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process writes its own RNG state file
        # save_state has no barrier at its end: a rank still writing into `tmp` after the main process renamed
        # it fails with "Parent directory does not exist".
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync(root)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = (
            f"the previous checkpoint {previous[-1]} is kept"
            if previous
            else "there is no earlier checkpoint"
        )
        raise RuntimeError(
            f"Could not write the checkpoint {final} ({err}); {kept}. Free disk space (or lower "
            "--save_total_limit), then continue with --resume_from_checkpoint latest."
        ) from err
    if accelerator.is_main_process and keep:
        for old in previous[: max(len(previous) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(requested: str | None, root: Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names: None, `"latest"` (the newest complete one in `root`,
    or None with a warning when there is none) or a folder."""
    if requested is None:
        return None
    if requested != "latest":
        return Path(requested)
    found = list_checkpoints(root)
    if not found:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {root}; starting fresh.")
        return None
    return found[-1]


def check_resume_arguments(checkpoint: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuses a resume whose arguments differ from the checkpoint's in what the resume depends on.

    Args:
        checkpoint (`Path`): the checkpoint folder (named in the messages).
        saved (`dict[str, Any]`, *optional*): the checkpoint's `resume_arguments` (None for a checkpoint written
            before they were stored: a warning, nothing checked).
        current (`dict[str, Any]`): this run's values of the `RESUME_FIELDS`.

    Raises:
        `ValueError`: naming the first field that differs, both values and how to resume.
    """
    if saved is None:
        logger.warning(f"{checkpoint} does not record the arguments it was trained with; resuming unchecked.")
        return
    for name, hint in RESUME_FIELDS.items():
        if name in saved and name in current and saved[name] != current[name]:
            raise ValueError(
                f"Cannot resume from {checkpoint}: {name} is {current[name]} now but was {saved[name]} when it was "
                f"saved, which changes the batches skipped and the schedule. To resume, {hint.format(saved=saved[name])}; "
                "to start over instead, use a fresh --output_dir."
            )


class _RngRestoreWatch(std_logging.Filter):
    """Catches Accelerate's INFO line "Could not load random states" (and hides its other INFO lines)."""

    def __init__(self):
        super().__init__()
        self.failed = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "Could not load random states" in record.getMessage():
            self.failed = True
        return record.levelno > std_logging.INFO


def load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, resume_arguments: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restores model / optimizer / scheduler / sampler / RNG states; returns the saved `trainer_state.json`.

    Args:
        accelerator (`Accelerator`): the prepared objects to restore into.
        checkpoint (`Path`): a folder written by `save_checkpoint`.
        resume_arguments (`dict[str, Any]`, *optional*): this run's values of the `RESUME_FIELDS`, checked
            against the checkpoint's before anything is restored.

    Raises:
        `ValueError`: when `resume_arguments` differ from the checkpoint's (see `check_resume_arguments`).
    """
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if resume_arguments is not None:
        check_resume_arguments(checkpoint, state.get("resume_arguments"), resume_arguments)
    logger.info(f"Resuming from {checkpoint}")
    accelerate_logger = std_logging.getLogger("accelerate.checkpointing")
    level, watch = accelerate_logger.level, _RngRestoreWatch()
    accelerate_logger.setLevel(std_logging.INFO)
    accelerate_logger.addFilter(watch)
    try:
        accelerator.load_state(str(checkpoint))
    finally:
        accelerate_logger.removeFilter(watch)
        accelerate_logger.setLevel(level)
    if watch.failed:
        logger.warning(
            f"Could not restore the random number generator states saved in {checkpoint} (random_states_*.pkl "
            "missing or unreadable): the resumed run's dropout and augmentation differ from an uninterrupted one."
        )
    return state
