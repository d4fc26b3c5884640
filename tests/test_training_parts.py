"""`xraycap.training`'s parts in-process: precision, optimizer, loss, batching, checkpoints.

The model card is tested in test_model_card.py, what `--push_to_hub` uploads in test_hub.py.

The end-to-end runs of run_captioning.py that use them are in test_run_captioning.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import PHANTOM_REPORTS, make_phantom_image, make_tiny_model_and_processor

from xraycap.training.checkpoints import list_checkpoints, resolve_checkpoint, save_checkpoint
from xraycap.training.data import StudyCollator, study_dataloader
from xraycap.training.distributed import cpu_has_bf16_matmuls, resolve_mixed_precision
from xraycap.training.optimization import build_optimizer

# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_on_cpu_follows_the_bf16_hardware(has_bf16, caplog, monkeypatch):
    """auto is bf16 only on a CPU with bf16 matmul hardware, else fp32 ("no"); an explicit bf16 is kept, with a
    warning where the hardware lacks it."""

    monkeypatch.setattr("xraycap.training.distributed.cpu_has_bf16_matmuls", lambda: has_bf16)
    with caplog.at_level("INFO"):
        assert resolve_mixed_precision("auto", "cpu") == ("bf16" if has_bf16 else "no")
        assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert ("training in fp32" in caplog.text) is not has_bf16
    assert ("without bf16 matmul hardware" in caplog.text) is not has_bf16


def test_fp16_on_cpu_becomes_bf16_with_a_warning(caplog):
    """Accelerate would silently run fp32 for fp16 on CPU; the run uses bf16 and says so."""
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision("fp16", "cpu") == "bf16"
    assert "fp16 has no autocast on CPU" in caplog.text
    assert resolve_mixed_precision("no", "cpu") == "no"


@pytest.mark.parametrize(
    ("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")]
)
def test_auto_precision_on_cuda_is_bf16_only_where_native(capability, expected, monkeypatch):
    """auto is bf16 from compute capability 8 (Ampere) on; a T4 (7.5) or V100 (7.0), where
    `torch.cuda.is_bf16_supported()` also says yes (emulated bf16), gets fp16 (Accelerate adds the GradScaler)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    assert resolve_mixed_precision("auto", "cuda") == expected
    assert resolve_mixed_precision("fp16", "cuda") == "fp16"


def test_explicit_bf16_on_a_cuda_gpu_without_native_bf16_warns(monkeypatch, caplog):
    """--mixed_precision bf16 on a T4 is kept as asked, with a warning that it is emulated there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: (7, 5))
    with caplog.at_level("WARNING"):
        assert resolve_mixed_precision("bf16", "cuda") == "bf16"
    assert "compute capability 7.5" in caplog.text


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match="'fp8'.*'auto', 'no', 'fp16', 'bf16'"):
        resolve_mixed_precision("fp8", "cpu")


def test_bf16_hardware_check_agrees_with_the_cpu_flags():
    """The check reads the same hardware the kernel reports in /proc/cpuinfo (AMX-BF16 or AVX512-BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    flags = set(cpuinfo.read_text().split())
    assert cpu_has_bf16_matmuls() is bool(flags & {"amx_bf16", "avx512_bf16"})


# --------------------------------------------------------------------------------------------------
# Optimizer and loss
# --------------------------------------------------------------------------------------------------


def test_optimizer_is_fused_adamw_without_decay_on_biases_and_norms():
    """Every trainable parameter is in exactly one group; matrices decay, biases and norm weights do not; frozen
    parameters are left out."""
    model, _ = make_tiny_model_and_processor(image_size=64, freeze_vision_encoder=True)
    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.05)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert not any(names[id(p)].startswith("vision_model.") for p in decay["params"] + no_decay["params"])
    assert all(p.ndim >= 2 and "ln_" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].endswith("ln_f.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith(".bias") for p in no_decay["params"])


def test_optimizer_refuses_a_fully_frozen_model():
    model, _ = make_tiny_model_and_processor(image_size=64)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, learning_rate=1e-3, weight_decay=0.0)


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def _studies(count: int) -> list[dict]:
    findings = list(PHANTOM_REPORTS)
    return [
        {
            "uid": str(i),
            "images": [make_phantom_image(findings[i % 5], seed=i)],
            "report": PHANTOM_REPORTS[findings[i % 5]],
        }
        for i in range(count)
    ]


def test_ablated_batches_show_every_study_the_same_grey_image():
    """The grey-image ablation replaces each image with constant mid-grey; the row indices travel with the batch."""
    _, processor = make_tiny_model_and_processor(image_size=64)
    items = list(enumerate(_studies(3)))
    real = StudyCollator(processor, max_views=1, max_target_length=32, with_text=False)(items)
    grey = StudyCollator(processor, max_views=1, max_target_length=32, with_text=False, ablate=True)(items)
    assert grey["index"].tolist() == real["index"].tolist() == [0, 1, 2]
    assert grey["pixel_values"].shape == real["pixel_values"].shape
    assert torch.equal(grey["pixel_values"], grey["pixel_values"][:1].expand_as(grey["pixel_values"]))
    assert not torch.equal(real["pixel_values"][0], real["pixel_values"][1])
    assert not torch.equal(grey["pixel_values"][0], real["pixel_values"][0])
    assert "input_ids" not in grey


def test_cached_features_replace_the_images():
    """With a feature cache the collator decodes no image and hands the model each study's cached features."""
    _, processor = make_tiny_model_and_processor(image_size=64)

    def study(i: int, report: str) -> dict:
        features = np.full((1, 4, 8), float(i), dtype=np.float32)
        return {"report": report, "image_features": features, "view_mask": np.array([True])}

    collator = StudyCollator(processor, max_views=1, max_target_length=32)
    batch = collator([(2, study(2, "No acute disease.")), (0, study(0, "Clear."))])
    assert "pixel_values" not in batch and batch["input_ids"].shape[0] == 2
    assert batch["image_features"][:, 0, 0, 0].tolist() == [2.0, 0.0]


def test_training_order_is_seeded_and_leaves_the_global_rng_alone():
    """The loader's order follows its seed, and drawing batches never advances the global RNG (dropout after a
    resume then matches the uninterrupted run)."""
    _, processor = make_tiny_model_and_processor(image_size=64)
    split = _studies(12)
    collator = StudyCollator(processor, max_views=1, max_target_length=32)

    def order(seed: int) -> list[int]:
        loader = study_dataloader(split, collator, batch_size=4, shuffle=True, seed=seed)
        return [i for batch in loader for i in batch["index"].tolist()]

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = order(5)
    assert torch.equal(torch.get_rng_state(), state)
    assert sorted(first) == list(range(12)) and first == order(5) and first != order(6)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


class _ThreadRank:
    """Stands in for one process's `Accelerator` in `save_checkpoint`: threads play the ranks, a barrier the
    collective."""

    def __init__(self, rank: int, barrier: threading.Barrier, write_delay_s: float = 0.0):
        self.process_index, self.is_main_process = rank, rank == 0
        self._barrier, self._write_delay_s = barrier, write_delay_s

    def wait_for_everyone(self):
        self._barrier.wait(timeout=30)

    def save_state(self, output_dir: str):
        time.sleep(self._write_delay_s)  # a slow rank, as under DDP on a loaded machine
        torch.save({"rank": self.process_index}, Path(output_dir) / f"random_states_{self.process_index}.pkl")


def test_interrupted_checkpoint_is_never_picked_up(tmp_path: Path):
    """A `.tmp` folder (a checkpoint being written when the process died) is not a checkpoint."""
    root = tmp_path / "checkpoints"
    (root / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoint-10.tmp").mkdir()
    (root / "checkpoint-8").mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-4", "checkpoint-8"]
    assert resolve_checkpoint("latest", root).name == "checkpoint-8"
    assert resolve_checkpoint("latest", tmp_path / "none") is None
    assert resolve_checkpoint(None, root) is None


def test_only_the_last_checkpoints_are_kept(tmp_path: Path):
    rank = _ThreadRank(0, threading.Barrier(1))
    for step in (3, 6, 9, 12):
        save_checkpoint(rank, tmp_path, step, {"completed_steps": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-12"]
    assert (tmp_path / "checkpoint-12" / "trainer_state.json").read_text() == '{"completed_steps": 12}'


def test_checkpoint_waits_for_every_rank_before_the_rename(tmp_path: Path):
    """The main process renames `checkpoint-N.tmp` only once every rank has written its state into it (a rank
    still writing after the rename fails with "Parent directory ... does not exist"). Rank 1 writes 0.3 s late."""
    barrier, errors = threading.Barrier(2), []

    def rank(index: int):
        try:
            save_checkpoint(_ThreadRank(index, barrier, 0.3 * index), tmp_path, 5, {"step": 5}, keep=2)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = sorted(p.name for p in (tmp_path / "checkpoint-5").iterdir())
    assert names == ["random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"]
    assert not (tmp_path / "checkpoint-5.tmp").exists()
