"""The optimizer steps' loss, gradient norm and learning rate: kept on the device, read every `--logging_steps`.

Reading a device tensor (`.item()`, `float()`, `bool()`) waits for the GPU to finish every queued kernel, so the
training loop reads nothing per step: the losses and gradient norms stay on the device and are read in one go
(one gather over the processes, one copy to the host) every `logging_steps`, before each checkpoint and at the
end, as transformers' `*_no_trainer` examples accumulate their loss.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from training.nonfinite import NonFiniteSteps


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
    """

    def __init__(self, accelerator: Accelerator, nonfinite: NonFiniteSteps, history: dict[str, Any]):
        self.accelerator, self.nonfinite, self.history = accelerator, nonfinite, history
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
