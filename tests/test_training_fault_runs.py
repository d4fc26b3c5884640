"""Faults met by a real (tiny, in-process) training run: a NaN loss, resuming with changed arguments or from a
finished run, a corrupt RNG state, an older run's checkpoints in the output folder.

40 synthetic studies -> 28 / 4 / 8; batch 4 -> 7 optimizer steps per epoch; no evaluation.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import SMALL_RUN, reset_accelerate_state

# fp32 on every CPU (`auto` is bf16 on one with AMX), so the resume tests know the checkpoints' precision.
SMALL = [*SMALL_RUN, "--do_eval", "false", "--mixed_precision", "no"]
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def train(args: list[str], output_dir: Path, cache: Path) -> dict:
    """One in-process run_captioning.main on the tiny preset; returns its `trainer_history.json`."""
    import run_captioning

    reset_accelerate_state()
    try:
        run_captioning.main([*SMALL, *args, "--output_dir", str(output_dir), "--cache_dir", str(cache)])
    finally:
        reset_accelerate_state()
    return json.loads((output_dir / "trainer_history.json").read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xraycap-cache")


@pytest.fixture(scope="module")
def finished_run(cache, tmp_path_factory) -> Path:
    """A run of 8 steps (one epoch and one step) with every checkpoint kept: steps 4, 7 (epoch end) and 8."""
    out = tmp_path_factory.mktemp("finished") / "model"
    train(["--max_steps", "8", "--save_steps", "4", "--save_total_limit", "0"], out, cache)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "model"))


def _all_finite_state(checkpoint: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


# --------------------------------------------------------------------------------------------------
# Non-finite loss
# --------------------------------------------------------------------------------------------------


def _nan_loss_at(monkeypatch, bad_calls: set[int] | None) -> None:
    """Makes the model's training loss (a forward with labels) NaN on the given calls (1-based), or on every call
    with None."""
    from modeling_xraycap import XrayCapForConditionalGeneration

    real, calls = XrayCapForConditionalGeneration.forward, [0]

    def forward(self, *args, **kwargs):
        outputs = real(self, *args, **kwargs)
        if kwargs.get("labels") is None:
            return outputs
        calls[0] += 1
        if bad_calls is None or calls[0] in bad_calls:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(XrayCapForConditionalGeneration, "forward", forward)


def test_a_nan_loss_skips_its_step_and_training_goes_on(cache, tmp_path: Path, monkeypatch, caplog):
    """The NaN step warns once, changes no weight (the checkpoints before and after it hold the same weights), is
    counted in trainer_history.json, and the saved weights are finite."""
    _nan_loss_at(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        history = train(
            ["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0"], tmp_path / "model", cache
        )
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("step 2:"), warnings
    checkpoints = tmp_path / "model" / "checkpoints"
    weights = [load_file(checkpoints / f"checkpoint-{step}" / "model.safetensors") for step in (1, 2, 3)]
    # Parameters only: a trained tower's BatchNorm statistics follow every forward, the NaN batch's included.
    weights = [{k: v for k, v in w.items() if not k.endswith(BATCHNORM_BUFFERS)} for w in weights]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])  # step 3 trains
    assert history["nonfinite_steps"] == [2]
    assert history["step"] == [1, 2, 3] and history["loss"][1] is None  # strict JSON: no NaN in the file
    json.loads((tmp_path / "model" / "trainer_history.json").read_text(), parse_constant=pytest.fail)
    assert (tmp_path / "model" / "training_curves.png").is_file()
    assert _all_finite(tmp_path / "model")
    assert all(_all_finite_state(c) for c in (tmp_path / "model" / "checkpoints").iterdir())


def test_nan_steps_in_a_row_stop_the_run_with_a_clear_error(cache, tmp_path: Path, monkeypatch):
    """--max_nonfinite_steps NaN steps in a row stop the run naming the limit; no model is saved, and the
    checkpoints written meanwhile hold finite weights (the skipped steps changed none)."""
    _nan_loss_at(monkeypatch, None)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row .*non-finite.*--max_nonfinite_steps"):
        train(["--max_steps", "6", "--save_steps", "1", "--max_nonfinite_steps", "3"], out, cache)
    assert not (out / "model.safetensors").exists()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert all(_all_finite_state(c) for c in checkpoints)


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        (["--per_device_train_batch_size", "2"], "per_device_train_batch_size"),
        (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps"),
        (["--max_steps", "12"], "max_steps"),
        (["--seed", "4"], "seed"),
        (
            ["--synthetic_studies", "48"],
            "train_examples",
        ),  # other data; the process count: test_distributed.py
        (["--mixed_precision", "bf16"], "mixed_precision"),  # the checkpoint trained in fp32 (`no`)
    ],
)
def test_resume_with_changed_arguments_is_refused_naming_the_field(
    changed, field, finished_run, cache, tmp_path: Path
):
    """Resuming with an argument that decides which batches are skipped or the schedule names the field, the
    checkpoint's value and the new one."""
    out = _copy(finished_run, tmp_path)
    args = ["--max_steps", "8", "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-4")]
    with pytest.raises(ValueError, match=rf"checkpoint-4: {field} is .* now but was"):
        train([*args, *changed], out, cache)


def test_resuming_a_finished_run_trains_no_extra_step(finished_run, cache, tmp_path: Path):
    """`latest` of a run that reached --max_steps (mid-epoch: 8 = 7 + 1) resumes into no training at all."""
    out = _copy(finished_run, tmp_path)
    before = load_file(out / "model.safetensors")
    history = train(["--max_steps", "8", "--resume_from_checkpoint", "latest"], out, cache)
    assert history["step"] == list(range(1, 9))
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_failed_rng_restore_is_a_warning(finished_run, cache, tmp_path: Path, caplog):
    """A corrupt RNG state file does not stop the resume; the run warns that batches and dropout will differ."""
    out = _copy(finished_run, tmp_path)
    (out / "checkpoints" / "checkpoint-4" / "random_states_0.pkl").write_bytes(b"not a pickle")
    checkpoint = str(out / "checkpoints" / "checkpoint-4")
    with caplog.at_level(logging.WARNING):
        history = train(["--max_steps", "8", "--resume_from_checkpoint", checkpoint], out, cache)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("random" in m.lower() and "checkpoint-4" in m for m in warnings), warnings
    assert history["step"] == list(range(1, 9))


# --------------------------------------------------------------------------------------------------
# An older run in the output folder
# --------------------------------------------------------------------------------------------------


def test_overwrite_starts_fresh_and_latest_is_the_new_run(finished_run, cache, tmp_path: Path):
    """--overwrite_output_dir over an older run: its checkpoints no longer count, the new run's are kept, and
    `latest` resumes the new run."""
    out = _copy(finished_run, tmp_path)
    (out / "checkpoints" / "checkpoint-500").mkdir()
    train(["--max_steps", "2", "--save_steps", "1", "--overwrite_output_dir", "true"], out, cache)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["completed_steps"] == 2


# --------------------------------------------------------------------------------------------------
# The loop on a GPU: no host read per step; the upload after the last collective
# --------------------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def _count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts tensor -> Python reads (each one waits for the GPU) made by the run's own code, by file."""
    import sys
    from collections import Counter

    repo = Path(__file__).resolve().parents[1]
    counts: Counter = Counter()
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real):
            caller = Path(sys._getframe(1).f_code.co_filename)
            if caller.is_relative_to(repo) and "tests" not in caller.parts and caller.name != "data.py":
                counts[str(caller.relative_to(repo))] += 1
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


def test_training_steps_read_nothing_back_from_the_device_between_logging_steps(
    cache, tmp_path: Path, monkeypatch
):
    """On a GPU every `.item()` / `float()` / `bool()` of a device tensor stalls the loop: training 6 steps instead
    of 2 (no logging step, one checkpoint each) reads no more values back than training 2."""
    reads = []
    for steps in (2, 6):
        with monkeypatch.context() as patch:
            counts = _count_host_reads(patch)
            train(["--max_steps", str(steps), "--logging_steps", "100"], tmp_path / f"model-{steps}", cache)
        reads.append(counts)
    grown = {f: reads[1][f] - reads[0][f] for f in reads[1] if reads[1][f] != reads[0][f]}
    assert not grown, f"host reads that grow with the steps, by file: {grown}"


def test_the_hub_upload_comes_after_the_last_collective(cache, tmp_path: Path, monkeypatch):
    """No process waits at a barrier while the main process uploads to the Hub (it may take longer than the
    collective timeout)."""
    import accelerate

    import run_captioning

    events = []
    real_wait = accelerate.Accelerator.wait_for_everyone
    monkeypatch.setattr(
        accelerate.Accelerator, "wait_for_everyone", lambda self: events.append("barrier") or real_wait(self)
    )
    monkeypatch.setattr(run_captioning, "push_to_hub", lambda *args, **kwargs: events.append("push") or "url")
    train(["--max_steps", "1", "--push_to_hub", "--hub_model_id", "me/xraycap"], tmp_path / "model", cache)
    assert "push" in events and "barrier" not in events[events.index("push") :], events
