"""Optimizer steps with a non-finite loss or gradient norm: skipped on the device, counted, and a stop after too
many in a row; the fp16 GradScaler's own overflow skips told apart from them.

A step whose gradient norm is NaN / inf updates no weight: the fused AdamW takes a `found_inf` flag (as the
GradScaler passes it) and skips the update on the device, so no value is read back to the host each step. The
steps are read and classified later, every `--logging_steps` (see `training.step_log`):

- a non-finite *loss*, or a non-finite gradient norm without a GradScaler, is a failure: a warning, the step in
  `history["nonfinite_steps"]` with its loss `None`, and `limit` of them in a row stop the run;
- under fp16, a finite loss whose scaled gradients overflowed is the GradScaler at work (it skips the step and
  halves its scale: the first steps, then about every 2,000): listed in `history["scaler_skipped_steps"]` with
  its loss, no warning; only once the scale has collapsed below `MIN_LOSS_SCALE` is it a failure.

A skipped step still advances the learning-rate schedule by one step (deciding otherwise would need the host read).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Below this loss scale the fp16 gradients overflow without any scaling: the run diverges.
MIN_LOSS_SCALE = 1.0


def skip_nonfinite_update(
    optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, scaler: Any = None
) -> bool:
    """Makes the coming `optimizer.step()` update nothing when `grad_norm` is NaN / inf, without a host sync.

    With a GradScaler the scaler already skips such a step itself. A fused optimizer gets the flag on the device
    (`found_inf`); any other optimizer needs the value read back (one sync).

    Args:
        optimizer (`torch.optim.Optimizer`): the (Accelerate-wrapped) optimizer about to step.
        grad_norm (`torch.Tensor`): the synced gradients' total norm (the same on every process).
        scaler (`torch.amp.GradScaler`, *optional*): the run's GradScaler (fp16), if any.

    Returns:
        `bool`: whether `optimizer.step()` should be called (False only for a non-finite step of a non-fused
        optimizer).
    """
    if scaler is not None:
        return True
    inner = getattr(optimizer, "optimizer", optimizer)
    grad_norm = torch.as_tensor(grad_norm)
    if inner.defaults.get("fused"):
        inner.found_inf = (~torch.isfinite(grad_norm)).float()
        return True
    return bool(torch.isfinite(grad_norm))


class NonFiniteSteps:
    """Classifies each optimizer step, once its loss and gradient norm are read from the device.

    Failures (a non-finite loss; a non-finite gradient norm without a GradScaler, or with a collapsed scale)
    go into `history["nonfinite_steps"]` (saved in checkpoints and `trainer_history.json`), each with a warning;
    `limit` of them in a row raise, since the run is then diverging rather than meeting one bad batch. The
    GradScaler's ordinary overflow skips go into `history["scaler_skipped_steps"]`.

    Args:
        limit (`int`): `--max_nonfinite_steps`.
        checkpoint_dir (`Path`): where the run's checkpoints are (named in the error).
    """

    def __init__(self, limit: int, checkpoint_dir: Path):
        self.limit, self.checkpoint_dir, self.in_a_row = limit, checkpoint_dir, 0

    def record(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        history: dict[str, Any],
        loss_scale: float | None = None,
    ) -> float | None:
        """Counts step `step`; returns the loss to record (None for a failed step: JSON has no NaN).

        Args:
            step (`int`): the optimizer step.
            loss (`float`): its loss (the mean over processes and accumulated batches).
            grad_norm (`float`): its gradients' total norm.
            history (`dict[str, Any]`): the run's history, updated in place.
            loss_scale (`float`, *optional*): the GradScaler's scale after the step; None without a scaler.

        Raises:
            `RuntimeError`: at the `limit`-th failed step in a row.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return loss
        if math.isfinite(loss) and loss_scale is not None and loss_scale >= MIN_LOSS_SCALE:
            history.setdefault("scaler_skipped_steps", []).append(step)
            logger.debug(
                f"step {step}: fp16 gradients overflowed; the GradScaler skipped it (scale {loss_scale})."
            )
            return loss
        self.in_a_row += 1
        history.setdefault("nonfinite_steps", []).append(step)
        collapsed = f", loss scale {loss_scale} < {MIN_LOSS_SCALE}" if loss_scale is not None else ""
        logger.warning(
            f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}{collapsed}); no weight updated "
            f"({self.in_a_row} such steps in a row, --max_nonfinite_steps {self.limit})."
        )
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"{self.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite loss or gradient norm "
                f"(--max_nonfinite_steps {self.limit}); stopping. The checkpoints in {self.checkpoint_dir} hold finite "
                "weights: lower --learning_rate, try --mixed_precision no, or check the data, then resume with "
                "--resume_from_checkpoint latest."
            )
        return None
