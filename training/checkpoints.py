"""Training checkpoints: `accelerator.save_state` written atomically, the last K kept, `latest` resolved.

A checkpoint is `accelerator.save_state` plus `trainer_state.json` (steps done, loss history). It is written
into `checkpoint-N.tmp` and renamed to `checkpoint-N` in one step, so a process killed while writing never
leaves a folder that `--resume_from_checkpoint latest` would pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers.utils import logging

logger = logging.get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in `root`, oldest first; a folder still being written (`.tmp` suffix) is not one."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Saves the training state as `root/checkpoint-{step}` and deletes all but the last `keep` checkpoints.

    Args:
        accelerator (`Accelerator`): holds the prepared model, optimizer, scheduler, samplers and RNG states.
        root (`Path`): the checkpoints folder.
        step (`int`): optimizer steps done.
        state (`dict[str, Any]`): JSON-serialisable loop state, saved as `trainer_state.json`.
        keep (`int`): how many checkpoints to keep (0 keeps all).

    Returns:
        `Path`: the checkpoint folder.
    """
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f"{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every process writes its own RNG state file
    # save_state has no barrier at its end: a rank still writing into `tmp` after the main process renamed it
    # fails with "Parent directory does not exist".
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep] if keep else []:
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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> dict[str, Any]:
    """Restores model / optimizer / scheduler / sampler / RNG states; returns the saved `trainer_state.json`."""
    logger.info(f"Resuming from {checkpoint}")
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / "trainer_state.json").read_text())
