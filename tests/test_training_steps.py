"""How the training loop's steps are read and judged: an fp16 GradScaler's overflow skips are not failures, a
non-finite step changes no weight without a host sync, and a step's values are read from the device only every
--logging_steps."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xraycap.training.optimization import NonFiniteSteps, StepLog, new_history, skip_nonfinite_update


def _fake_accelerator(scaler=None) -> SimpleNamespace:
    """What StepLog uses of an Accelerator, for one process."""
    return SimpleNamespace(scaler=scaler, gather=lambda tensor: tensor)


def _train_with_scaler(steps: int, limit: int, tmp_path: Path, caplog) -> tuple[dict, torch.nn.Linear, int]:
    """A linear model trained by fused AdamW under a real GradScaler (on the CPU) whose first scale overflows fp32:
    the scaler skips the first steps and halves its scale each time, as fp16 training starts on a GPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=2000)
    history = new_history()
    log = StepLog(_fake_accelerator(scaler), NonFiniteSteps(limit, tmp_path), history)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    updates = 0
    with caplog.at_level(logging.WARNING):
        for step in range(1, steps + 1):
            loss = torch.nn.functional.mse_loss(model(x), y) * 2.0**6  # overflows the first scales
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            log.add_loss(loss)
            if skip_nonfinite_update(optimizer, grad_norm, scaler):
                before = model.weight.detach().clone()
                scaler.step(optimizer)
                scaler.update()
                updates += not torch.equal(before, model.weight)
            optimizer.zero_grad()
            log.end_step(step, grad_norm, 0.1)
            if step % 4 == 0:
                log.flush()
        log.flush()
    return history, model, updates


def test_fp16_scaler_overflow_skips_are_not_failures(tmp_path: Path, caplog):
    """The GradScaler skipping its first overflowing steps is fp16 at work: no warning, no `nonfinite_steps`, no
    stop even past --max_nonfinite_steps in a row; the skips are listed apart, each with its (finite) loss."""
    history, _, updates = _train_with_scaler(steps=12, limit=3, tmp_path=tmp_path, caplog=caplog)
    skipped = history["scaler_skipped_steps"]
    assert len(skipped) > 3 and skipped == list(range(1, len(skipped) + 1))  # more than the limit, in a row
    assert history["nonfinite_steps"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(isinstance(loss, float) for loss in history["loss"])  # a skipped step's loss is still recorded
    assert history["step"] == list(range(1, 13))
    assert updates == 12 - len(skipped)  # the steps after the scale settled trained


def test_a_collapsed_loss_scale_counts_as_failure(tmp_path: Path, caplog):
    """Overflows that drive the scale below 1 are a diverging run, not the scaler's routine: failures, warned."""
    nonfinite = NonFiniteSteps(limit=2, checkpoint_dir=tmp_path)
    history = new_history()
    with caplog.at_level(logging.WARNING):
        assert nonfinite.record(1, 0.5, float("inf"), history, loss_scale=2.0**-3) is None
        with pytest.raises(RuntimeError, match="2 optimizer steps in a row"):
            nonfinite.record(2, 0.5, float("inf"), history, loss_scale=2.0**-4)
    assert history["nonfinite_steps"] == [1, 2] and history["scaler_skipped_steps"] == []
    assert "loss scale" in caplog.records[0].getMessage()


@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_gradient_changes_no_weight_and_no_optimizer_state(fused: bool):
    """The fused optimizer skips the update on the device (no host read); another optimizer is told not to step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=0.1, weight_decay=0.1, fused=fused, foreach=not fused
    )
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    (model(torch.randn(2, 3)).sum() * float("nan")).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if skip_nonfinite_update(optimizer, grad_norm):
        optimizer.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(torch.equal(v, optimizer.state[model.weight][k]) for k, v in state.items())
    optimizer.zero_grad()
    model(torch.randn(2, 3)).sum().backward()
    if skip_nonfinite_update(optimizer, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
        optimizer.step()
    assert not torch.equal(weights[0], model.weight)  # the next finite step trains again


def test_step_values_are_read_once_per_flush(tmp_path: Path, monkeypatch):
    """Adding losses and closing steps reads nothing from the device; a flush reads all waiting steps at once and
    records each step's mean batch loss (gradient accumulation)."""
    log = StepLog(_fake_accelerator(), NonFiniteSteps(3, tmp_path), history := new_history())
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a)
        )
    for step in range(1, 6):
        for batch in range(2):  # two accumulated batches per step
            log.add_loss(torch.tensor(float(step + batch)))
        log.end_step(step, torch.tensor(1.0), 0.01)
    assert reads == []
    log.flush()
    assert len(reads) == 1
    assert history["step"] == [1, 2, 3, 4, 5] and history["loss"] == [1.5, 2.5, 3.5, 4.5, 5.5]
