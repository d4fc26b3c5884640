"""The optimizer and its steps in run_captioning.py: stock AdamW; each step's loss, gradient norm and learning rate
kept on the device and read every `--logging_steps`; steps with a non-finite loss or gradient norm skipped.

Reading a device tensor (`.item()`, `float()`, `bool()`) waits for the GPU to finish every queued kernel, so the
training loop reads nothing per step: the losses and gradient norms stay on the device and are read in one go
(one gather over the processes, one copy to the host) every `logging_steps`, before each checkpoint and at the
end, as transformers' `*_no_trainer` examples accumulate their loss ([`StepLog`]).

A step whose gradient norm is NaN / inf updates no weight: the fused AdamW takes a `found_inf` flag (as the
GradScaler passes it) and skips the update on the device, so no value is read back to the host each step
([`skip_nonfinite_update`]). The steps are classified once read ([`NonFiniteSteps`]):

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
from accelerate import Accelerator
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device | None = None
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over the trainable parameters, with no weight decay on biases and norms.

    The fused implementation (one kernel per step instead of several per tensor) is used where training runs
    on CPU or CUDA.

    Args:
        model (`nn.Module`):
            The model; frozen parameters (`requires_grad=False`) are left out.
        learning_rate (`float`):
            The peak learning rate.
        weight_decay (`float`):
            Decoupled weight decay for the weight matrices.
        device (`torch.device`, *optional*):
            Where training runs (`accelerator.device`); by default where the parameters are now.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or "ln_" in name else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("The model has no trainable parameters: unfreeze a part of it before training.")
    device = torch.device(device) if device is not None else (decay or no_decay)[0].device
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cpu", "cuda"))


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


def new_history(saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's history (`trainer_history.json`): per-step lists, per-epoch metrics, skipped steps; a resumed
    run continues the checkpoint's (`saved`; older checkpoints lack the skip lists)."""
    empty = {
        "step": [],
        "loss": [],
        "lr": [],
        "epoch_metrics": [],
        "nonfinite_steps": [],
        "scaler_skipped_steps": [],
    }
    return {**empty, **(saved or {})}


class StepLog:
    """Collects each optimizer step's values on the device and writes them into the history when read.

    Args:
        accelerator (`Accelerator`): gathers the losses over processes; its GradScaler (fp16) gives the scale.
        nonfinite (`NonFiniteSteps`): classifies each step once read (may raise).
        history (`dict[str, Any]`): from [`new_history`], updated in place.
        progress (`tqdm`, *optional*): the training progress bar, where [`report`] shows the last step.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        nonfinite: NonFiniteSteps,
        history: dict[str, Any],
        progress: Any = None,
    ):
        self.accelerator, self.nonfinite, self.history, self.progress = (
            accelerator,
            nonfinite,
            history,
            progress,
        )
        self.loss_sum: torch.Tensor | None = None
        self.batches = 0
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def add_loss(self, loss: torch.Tensor) -> None:
        """Adds one batch's loss (of the optimizer step being accumulated), on the device."""
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.batches += 1

    def end_step(self, step: int, grad_norm: torch.Tensor | float, lr: float) -> None:
        """Closes optimizer step `step`: its mean batch loss and its gradient norm wait on the device."""
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=self.loss_sum.device)
        self.pending.append((step, self.loss_sum / self.batches, grad_norm.detach().float(), lr))
        self.loss_sum, self.batches = None, 0

    def flush(self) -> dict[str, float] | None:
        """Reads the waiting steps (every process must call it at the same step: the losses are gathered),
        records them in the history and returns the last one's `{"loss", "lr"}` (None when nothing waited).

        Raises:
            `RuntimeError`: from `NonFiniteSteps` when too many failed steps came in a row.
        """
        if not self.pending:
            return None
        steps = [step for step, *_ in self.pending]
        losses = torch.stack([loss for _, loss, _, _ in self.pending])
        grad_norms = torch.stack([norm for _, _, norm, _ in self.pending])
        lrs = [lr for *_, lr in self.pending]
        self.pending = []
        gathered = self.accelerator.gather(losses[None])  # (processes, steps)
        values = torch.cat(
            [gathered.reshape(-1, len(steps)).mean(dim=0), grad_norms]
        ).tolist()  # one host read
        losses, grad_norms = values[: len(steps)], values[len(steps) :]
        scaler = self.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None else None
        for step, loss, grad_norm, lr in zip(steps, losses, grad_norms, lrs):
            recorded = self.nonfinite.record(step, loss, grad_norm, self.history, loss_scale=scale)
            for key, value in (("step", step), ("loss", recorded), ("lr", lr)):
                self.history[key].append(value)
        return {"loss": losses[-1], "lr": lrs[-1]}

    def report(self, step: int, epoch: int) -> None:
        """Reads the waiting steps ([`flush`]) and shows the last one's loss and learning rate on the progress bar
        and to the run's trackers (`--report_to`; none by default). Every process must call it at the same step.

        Args:
            step (`int`): the optimizer steps done (the trackers' step).
            epoch (`int`): the epoch, shown on the progress bar.
        """
        if (last := self.flush()) is None:
            return
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}", epoch=epoch)
        self.accelerator.log({"train/loss": last["loss"], "train/lr": last["lr"]}, step=step)
