"""Faults a training run meets, in-process and without training: a non-empty output folder, stale checkpoints of
an older run, a full disk while saving. What `--push_to_hub` uploads: test_hub.py.

The faults that need a real training run (NaN loss, resume with changed arguments) are in
test_training_fault_runs.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from xraycap.training.checkpoints import list_checkpoints, resolve_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


class _Rank:
    """Stands in for a one-process `Accelerator` in `save_checkpoint`; `fail_on` makes `save_state` raise."""

    process_index, is_main_process = 0, True

    def __init__(self, fail_on: OSError | None = None):
        self.fail_on = fail_on

    def wait_for_everyone(self):
        pass

    def save_state(self, output_dir: str):
        torch.save({"weights": torch.ones(3)}, Path(output_dir) / "model.bin")
        if self.fail_on is not None:
            raise self.fail_on
        torch.save({"rank": 0}, Path(output_dir) / "random_states_0.pkl")


# --------------------------------------------------------------------------------------------------
# Output folder and checkpoints of an older run
# --------------------------------------------------------------------------------------------------


def test_non_empty_output_dir_is_refused_without_overwrite_or_resume(tmp_path: Path, monkeypatch):
    """A folder holding anything is refused, naming it and both ways out; --overwrite_output_dir or a resume
    accepts it, and an empty or missing folder needs neither."""
    import run_captioning

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "old_run"
    (out / "checkpoints" / "checkpoint-500").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"--output_dir .*old_run.* is not empty.*--overwrite_output_dir true"
    ):
        run_captioning.parse_args(["--output_dir", str(out)])
    run_captioning.parse_args(["--output_dir", str(out), "--overwrite_output_dir", "true"])
    run_captioning.parse_args(["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    (tmp_path / "empty").mkdir()
    run_captioning.parse_args(["--output_dir", str(tmp_path / "empty")])
    run_captioning.parse_args(["--output_dir", str(tmp_path / "new")])


def test_output_dir_dot_in_the_repository_is_refused(monkeypatch):
    """`--output_dir .` in a checkout would replace the repository's README with a model card."""
    import run_captioning

    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"--output_dir '\.' is not empty"):
        run_captioning.parse_args(["--output_dir", "."])


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path):
    """A new run's checkpoint-100 next to an older run's checkpoint-500 and -1000 survives the rotation."""
    for step in (500, 1000):
        (tmp_path / f"checkpoint-{step}").mkdir()
    save_checkpoint(_Rank(), tmp_path, 100, {"completed_steps": 100}, keep=2)
    assert "checkpoint-100" in [p.name for p in list_checkpoints(tmp_path)]
    assert len(list_checkpoints(tmp_path)) == 2


# --------------------------------------------------------------------------------------------------
# Crash-safe writes
# --------------------------------------------------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path):
    """ENOSPC raised from inside the save: the error names the checkpoint, the cause and what is kept; the
    previous checkpoint is untouched and still `latest`, and no partial folder is left behind."""
    save_checkpoint(_Rank(), tmp_path, 3, {"completed_steps": 3}, keep=1)
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(
        RuntimeError, match=r"checkpoint-6.*No space left on device.*checkpoint-3 is kept"
    ) as info:
        save_checkpoint(_Rank(fail_on=disk_full), tmp_path, 6, {"completed_steps": 6}, keep=1)
    assert info.value.__cause__ is disk_full
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-3"
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["completed_steps"] == 3
    assert torch.load(tmp_path / "checkpoint-3" / "model.bin")["weights"].sum() == 3


def test_checkpoint_is_on_disk_before_it_is_renamed_into_place(tmp_path: Path, monkeypatch):
    """Every file of the checkpoint and its folder are fsynced before the rename that makes it `latest`, and the
    parent folder after it, so a power cut never leaves a `checkpoint-N` with empty files."""
    events: list[tuple[str, str]] = []
    real_fsync, real_open, real_replace = os.fsync, os.open, os.replace
    opened: dict[int, str] = {}

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = str(path)
        return fd

    def spy_fsync(fd):
        events.append(("fsync", Path(opened.get(fd, "?")).name))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    save_checkpoint(_Rank(), tmp_path, 4, {"completed_steps": 4}, keep=2)
    rename = events.index(("replace", "checkpoint-4"))
    synced_before = {name for kind, name in events[:rename] if kind == "fsync"}
    assert {"model.bin", "random_states_0.pkl", "trainer_state.json", "checkpoint-4.tmp"} <= synced_before
    assert ("fsync", tmp_path.name) in events[rename:]


# A process that saves checkpoint-1, then stalls in the middle of writing checkpoint-2 (after its first file) as a
# slow disk would, printing where it is, until the test kills it.
MID_WRITE_SCRIPT = """
import sys, time
from pathlib import Path
import torch
from accelerate import Accelerator
from xraycap.training.checkpoints import save_checkpoint

root = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
model, optimizer = accelerator.prepare(model, optimizer)
for step in (1, 2):
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    if step == 2:
        real_save = torch.save
        def stalled_save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            print("writing", f, flush=True)
            time.sleep(300)
        torch.save = stalled_save
    save_checkpoint(accelerator, root, step, {"completed_steps": step, "history": {}}, keep=0)
"""


def test_sigkill_while_a_checkpoint_is_written_leaves_latest_on_the_complete_one(tmp_path: Path):
    """A process killed (SIGKILL) in the middle of writing a checkpoint leaves it as `checkpoint-N.tmp`; `latest`
    is the previous, complete checkpoint, which loads, and the next save of that step replaces the partial one."""
    import signal
    import subprocess
    import sys

    from accelerate import Accelerator

    from xraycap.training.checkpoints import load_checkpoint

    root = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", MID_WRITE_SCRIPT, str(root)]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # blocks until the child is mid-write
        assert line.startswith("writing") and "checkpoint-2.tmp" in line, (line, proc.stderr.read())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "checkpoint-2.tmp"]
    assert resolve_checkpoint("latest", root) == root / "checkpoint-1"

    from testing_utils import reset_accelerate_state

    reset_accelerate_state()
    try:
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(64, 64)
        model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1))
        assert load_checkpoint(accelerator, root / "checkpoint-1")["completed_steps"] == 1
        save_checkpoint(accelerator, root, 2, {"completed_steps": 2, "history": {}}, keep=0)
    finally:
        reset_accelerate_state()
    assert list_checkpoints(root) == [root / "checkpoint-1", root / "checkpoint-2"]
    assert not (root / "checkpoint-2.tmp").exists()
