"""run_captioning.py end to end on the tiny preset and a few synthetic phantom studies (offline, CPU).

The runs are real subprocesses (`python run_captioning.py ...` / `accelerate launch ...`), sharing one
dataset cache so the phantoms are synthesized and built once per test session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "run_captioning.py")

# A small run: 40 studies -> 28 / 4 / 8; batch 4 -> 7 optimizer steps per epoch.
SMALL = [
    "--synthetic_studies",
    "40",
    "--per_device_train_batch_size",
    "4",
    "--seed",
    "3",
    "--logging_steps",
    "1",
]
FAST_EVAL = ["--num_beams", "2", "--max_new_tokens", "12", "--per_device_eval_batch_size", "8"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xraycap-cache")


def run_script(
    args: list[str],
    cache: Path,
    cwd: Path,
    launcher: list[str] | None = None,
    env: dict | None = None,
    timeout: int = 400,
):
    command = (launcher or [sys.executable]) + [SCRIPT, *args, "--cache_dir", str(cache)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **(env or {})}
    proc = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="session")
def trained_run(cache_dir, tmp_path_factory) -> Path:
    """One short training run with evaluation, shared by the output checks. bf16 is asked for explicitly, so the
    master-weights path is covered on CPUs without bf16 hardware too (where `auto` resolves to fp32)."""
    out = tmp_path_factory.mktemp("run") / "model"
    args = [*SMALL, *FAST_EVAL, "--max_steps", "8", "--mixed_precision", "bf16", "--output_dir", str(out)]
    run_script(args, cache_dir, cwd=out.parent)
    return out


def test_outputs_follow_the_contract(trained_run: Path):
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_xraycap.py",
        "modeling_xraycap.py",
        "processing_xraycap.py",
        "pipeline_xraycap.py",
        "tokenizer.json",
        "eval_results.json",
        "predictions.jsonl",
        "README.md",
        "training_curves.png",
        "samples.png",
        "samples.html",
        "run_args.json",
    ):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob("*.bin")), "weights must be safetensors only"
    results = json.loads((trained_run / "eval_results.json").read_text())
    for split in ("test", "test_image_ablated"):
        for key in (
            "bleu_1",
            "bleu_4",
            "meteor",
            "rouge_l",
            "cider",
            "bertscore_f1",
            "ce_micro_f1",
            "ce_macro_f1",
            "ce_example_f1",
        ):
            assert key in results[split], (split, key)
    rows = [json.loads(line) for line in (trained_run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["run"]["num_examples"]["test"]
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(set(row) >= {"id", "reference", "prediction"} for row in rows)
    card = (trained_run / "README.md").read_text()
    assert card.startswith("---\nlicense:") and "pipeline_tag: image-to-text" in card
    assert "test_image_ablated" in card and "not for clinical use" in card.lower()
    args = json.loads((trained_run / "run_args.json").read_text())
    assert args["training"]["max_steps"] == 8 and args["training"]["mixed_precision_resolved"] == "bf16"
    # The locally trained tokenizer saw the TRAIN split only (logged count = train size).
    assert results["run"]["num_examples"]["train"] == 28
    # CPU bf16 trains with bf16 weights and fp32 master weights; the saved model is the fp32 master weights.
    assert results["run"]["master_weights"] is True
    assert "mixed precision bf16 with fp32 master weights" in card
    saved = load_file(trained_run / "model.safetensors").values()
    assert {t.dtype for t in saved if t.is_floating_point()} == {torch.float32}


def test_saved_folder_regenerates_predictions_outside_the_repo(trained_run: Path, tmp_path: Path):
    """Done means 5: a fresh process, cwd outside the repo, trust_remote_code, same predictions."""
    # Regenerate a few test studies from their images and compare with predictions.jsonl.
    regen = f"""
import json, sys
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
import torch
from transformers import AutoModel, AutoProcessor
from datasets import load_from_disk
run = {str(trained_run)!r}
args = json.load(open(run + "/run_args.json"))
model = AutoModel.from_pretrained(run, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(run, trust_remote_code=True)
rows = [json.loads(l) for l in open(run + "/predictions.jsonl")][:4]
test = load_from_disk({str(trained_run / "test_split")!r})
by_uid = {{test[i]["uid"]: test[i] for i in range(len(test))}}
images = [by_uid[r["id"]]["images"][: model.config.max_views] for r in rows]
inputs = processor(images=images, return_tensors="pt")
with torch.no_grad():
    ids = model.generate(**inputs, num_beams=args["training"]["num_beams"], max_new_tokens=args["training"]["max_new_tokens"], do_sample=False)
texts = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
print(json.dumps({{"regenerated": texts, "saved": [r["prediction"] for r in rows]}}))
"""
    # Export the test split next to the run (the test needs the images; the run itself does not save them).
    from dataset_builder import build_dataset

    args = json.loads((trained_run / "run_args.json").read_text())
    cache = Path(args["data"]["cache_dir"])
    dataset, _ = build_dataset(
        cache / "synthetic-40-seed3",
        views="frontal"
        if json.loads((trained_run / "config.json").read_text())["max_views"] == 1
        else "pair",
        seed=3,
        image_size=args["data"]["build_image_size"],
        cache_dir=str(cache / "datasets"),
    )
    dataset["test"].save_to_disk(str(trained_run / "test_split"))
    proc = subprocess.run(
        [sys.executable, "-c", regen],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["regenerated"] == out["saved"]


def test_resume_after_sigkill_matches_uninterrupted_run(cache_dir, tmp_path: Path):
    """Done means 2: SIGKILL mid-epoch, resume from `latest`, the final weights equal an uninterrupted run."""
    common = [*SMALL, "--max_steps", "12", "--save_steps", "3", "--do_eval", "false"]
    straight = tmp_path / "straight"
    run_script([*common, "--output_dir", str(straight)], cache_dir, cwd=tmp_path)

    killed = tmp_path / "killed"
    command = [sys.executable, SCRIPT, *common, "--output_dir", str(killed), "--cache_dir", str(cache_dir)]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "checkpoint-3").is_dir():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(p.name for p in (killed / "checkpoints").iterdir())
    latest = max(int(n.split("-")[1]) for n in checkpoints if n.split("-")[1].isdigit())
    assert latest < 12 and latest % 7 != 0, f"not killed mid-epoch: {checkpoints}"
    assert not (killed / "model.safetensors").exists()

    resumed = run_script(
        [*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"], cache_dir, cwd=tmp_path
    )
    assert f"checkpoint-{latest}" in resumed.stderr + resumed.stdout
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history = json.loads((killed / "trainer_history.json").read_text())
    assert history["step"] == list(range(1, 13))


def test_interrupted_checkpoint_is_never_picked_up(tmp_path: Path):
    """A `.tmp` folder (a checkpoint being written when the process died) is not a checkpoint."""
    from checkpointing import list_checkpoints, resolve_checkpoint

    root = tmp_path / "checkpoints"
    (root / "checkpoint-4").mkdir(parents=True)
    (root / "checkpoint-10.tmp").mkdir()
    (root / "checkpoint-8").mkdir()
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-4", "checkpoint-8"]
    assert resolve_checkpoint("latest", root).name == "checkpoint-8"
    assert resolve_checkpoint("latest", tmp_path / "none") is None
    assert resolve_checkpoint(None, root) is None


class _ThreadRank:
    """Stands in for one process's `Accelerator` in `save_checkpoint`: threads play the ranks, a barrier the collective."""

    def __init__(self, rank: int, barrier, write_delay_s: float):
        self.process_index, self.is_main_process = rank, rank == 0
        self._barrier, self._write_delay_s = barrier, write_delay_s

    def wait_for_everyone(self):
        self._barrier.wait(timeout=30)

    def save_state(self, output_dir: str):
        time.sleep(self._write_delay_s)  # a slow rank, as under DDP on a loaded machine
        torch.save({"rank": self.process_index}, Path(output_dir) / f"random_states_{self.process_index}.pkl")


def test_checkpoint_waits_for_every_rank_before_the_rename(tmp_path: Path):
    """The main process renames `checkpoint-N.tmp` only once every rank has written its state into it.

    A rank still writing after the rename fails with "Parent directory ... does not exist" (seen in CI under
    `accelerate launch --num_processes 2`). Here rank 1 writes 0.3 s after rank 0.
    """
    import threading

    from checkpointing import save_checkpoint

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
    final = tmp_path / "checkpoint-5"
    assert sorted(p.name for p in final.iterdir()) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
        "trainer_state.json",
    ]
    assert not (tmp_path / "checkpoint-5.tmp").exists()


def test_two_cpu_processes_score_every_test_study_once(cache_dir, tmp_path: Path):
    """Done means 3: `accelerate launch --multi_gpu --num_processes 2` on CPU with gloo."""
    out = tmp_path / "ddp"
    proc = run_script(
        [
            *SMALL,
            *FAST_EVAL,
            "--max_steps",
            "2",
            "--output_dir",
            str(out),
            "--per_device_eval_batch_size",
            "3",
        ],
        cache_dir,
        cwd=tmp_path,
        launcher=[
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        env={"ACCELERATE_USE_CPU": "1"},
    )
    log = proc.stdout + proc.stderr
    assert "process 0 of 2" in log and "process 1 of 2" in log, log[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["run"]["num_processes"] == 2
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)) == results["run"]["num_examples"]["test"] == 8


def test_cache_features_gives_the_same_losses(cache_dir, tmp_path: Path):
    """Precomputed frozen-encoder features train exactly like running the encoder each step."""
    losses = {}
    for cached in (False, True):
        out = tmp_path / f"cached-{cached}"
        args = [
            *SMALL,
            "--max_steps",
            "5",
            "--do_eval",
            "false",
            "--freeze_vision_encoder",
            "true",
            "--output_dir",
            str(out),
        ]
        run_script(args + (["--cache_features", "true"] if cached else []), cache_dir, cwd=tmp_path)
        losses[cached] = json.loads((out / "trainer_history.json").read_text())["loss"]
    assert len(losses[True]) == 5
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# In-process checks (argument validation, autocast, Hub upload)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    yield
    reset()


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--num_beams", "0"], ValueError, "--num_beams must be >= 1, got 0"),
        (
            ["--resume_from_checkpoint", "/nonexistent/checkpoint-9"],
            FileNotFoundError,
            "/nonexistent/checkpoint-9",
        ),
        (["--mixed_precision", "fp8"], SystemExit, None),
        (["--data_dir", "{tmp}"], FileNotFoundError, "indiana_reports.csv"),
        (["--output_dir", "{tmp}/a_file"], ValueError, "is a file"),
        (["--push_to_hub", "true"], ValueError, "--hub_model_id"),
        (["--cache_features", "true", "--freeze_vision_encoder", "false"], ValueError, "frozen encoder"),
        (["--master_weights", "always"], SystemExit, None),
        (
            ["--master_weights", "on", "--gradient_accumulation_steps", "2"],
            ValueError,
            "--master_weights on with --gradient_accumulation_steps 2",
        ),
    ],
)
def test_bad_arguments_fail_fast(argv, error, message, tmp_path: Path, monkeypatch):
    """Done means 7: each bad argument stops before any work, naming the value and the fix."""
    import run_captioning

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(error) as info:
        run_captioning.parse_args(argv)
    if message:
        assert message in str(info.value)


def test_training_loss_equals_the_full_forward():
    """training_loss skips the prefix's logits and gives the loss of `model(**inputs).loss`."""
    from testing_utils import make_tiny_model_and_processor

    import run_captioning

    model, processor = make_tiny_model_and_processor(image_size=64)
    inputs = processor(
        images=[torch.rand(3, 64, 64), torch.rand(3, 64, 64)],
        text=["No acute disease.", "Small left pleural effusion. Heart size normal."],
        return_tensors="pt",
    )
    model.eval()
    torch.testing.assert_close(run_captioning.training_loss(model, inputs), model(**inputs).loss)


def test_master_weights_resolve_where_they_pay():
    """auto: single-process CPU bf16 with one batch per step; on needs bf16; off never."""
    from accelerate.utils import DistributedType

    import run_captioning

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resolve = run_captioning.uses_master_weights
    assert resolve("auto", "bf16", cpu, DistributedType.NO)
    assert not resolve("auto", "bf16", cpu, DistributedType.NO, gradient_accumulation_steps=2)
    assert not resolve("auto", "bf16", cpu, DistributedType.MULTI_CPU)
    assert not resolve("auto", "bf16", cuda, DistributedType.NO)
    assert not resolve("auto", "no", cpu, DistributedType.NO)
    assert resolve("on", "bf16", cuda, DistributedType.MULTI_GPU)
    assert not resolve("off", "bf16", cpu, DistributedType.NO)
    with pytest.raises(ValueError, match="--master_weights on needs bf16 mixed precision"):
        resolve("on", "no", cpu, DistributedType.NO)


def test_grid_size_argument_reaches_the_config():
    import run_captioning

    for argv, expected in (([], 4), (["--grid_size", "2"], 2), (["--grid_size", "0"], None)):
        model_args, data_args, _ = run_captioning.parse_args(["--preset", "resnet50-gpt2", *argv])
        assert run_captioning.build_config(model_args, data_args).grid_size == expected, argv


def test_reuse_freed_memory_stops_page_faults_on_large_blocks():
    """The CPU allocator setting: a freed 64 MB block is reused instead of page-faulted in again."""
    code = (
        "import resource, torch, run_captioning\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        block = torch.ones(16 * 2**20)\n"  # 64 MB: above glibc's largest mmap threshold
        "        del block\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "plain = faults()\n"
        "applied = run_captioning.reuse_freed_memory()\n"
        "faults()\n"  # the heap grows once
        "print(applied, plain, faults())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    applied, plain, reused = proc.stdout.split()[-3:]
    assert applied == "True"
    assert int(plain) > 5 * 8000 and int(reused) < int(plain) / 10, (plain, reused)


def test_unknown_preset_is_refused(capsys):
    import run_captioning

    with pytest.raises(SystemExit):
        run_captioning.parse_args(["--preset", "gigantic"])
    assert "invalid choice: 'gigantic'" in capsys.readouterr().err


def test_bf16_on_cpu_really_autocasts(cache_dir, tmp_path: Path, monkeypatch, fresh_accelerate_state):
    """Done means 4: the training forward runs under bf16 autocast (observed inside the model)."""
    import run_captioning
    from modeling_xraycap import XrayCapForConditionalGeneration

    seen = []
    original = XrayCapForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.logits.dtype))
        return out

    monkeypatch.setattr(XrayCapForConditionalGeneration, "forward", spy)
    monkeypatch.chdir(tmp_path)
    run_captioning.main(
        [
            *SMALL,
            "--max_steps",
            "2",
            "--do_eval",
            "false",
            "--mixed_precision",
            "bf16",
            "--output_dir",
            str(tmp_path / "o"),
            "--cache_dir",
            str(cache_dir),
        ]
    )
    assert len(seen) == 2
    assert all(enabled and dtype == torch.bfloat16 for enabled, dtype, _ in seen), seen
    assert seen[0][2] == torch.bfloat16  # the logits really were computed in bf16


def test_fp16_on_cpu_falls_back_with_a_warning(caplog):
    import run_captioning

    with caplog.at_level("WARNING"):
        assert run_captioning.resolve_mixed_precision("fp16", "cpu") == "bf16"
    assert "fp16 has no autocast on CPU" in caplog.text
    assert run_captioning.resolve_mixed_precision("no", "cpu") == "no"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_on_cpu_follows_the_bf16_hardware(has_bf16, caplog, monkeypatch):
    """auto is bf16 only on a CPU with bf16 matmul hardware; elsewhere bf16 matmuls take torch's scalar
    fallback, so auto trains in fp32 and an explicit bf16 is kept with a warning."""
    import run_captioning

    monkeypatch.setattr(run_captioning, "cpu_has_bf16_matmuls", lambda: has_bf16)
    with caplog.at_level("INFO"):
        assert run_captioning.resolve_mixed_precision("auto", "cpu") == ("bf16" if has_bf16 else "no")
        assert run_captioning.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert ("training in fp32" in caplog.text) is not has_bf16
    assert ("~100x slower than fp32" in caplog.text) is not has_bf16


def test_push_to_hub_uploads_exactly_the_saved_folder(
    cache_dir, tmp_path: Path, monkeypatch, fresh_accelerate_state
):
    """Done means 6: huggingface_hub is replaced at the HfApi boundary; the uploaded folder then loads."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    import run_captioning

    hub = tmp_path / "hub"
    calls = {}

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, "private": private, "exist_ok": exist_ok}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(
        self, *, folder_path, repo_id, repo_type=None, ignore_patterns=None, allow_patterns=None, **kwargs
    ):
        calls["upload_folder"] = {"folder_path": folder_path, "repo_id": repo_id}
        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (hub / rel).parent.mkdir(parents=True, exist_ok=True)
            (hub / rel).write_bytes((Path(folder_path) / rel).read_bytes())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    run_captioning.main(
        [
            *SMALL,
            "--max_steps",
            "2",
            "--do_eval",
            "false",
            "--output_dir",
            str(out),
            "--cache_dir",
            str(cache_dir),
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "someone/xraycap-test",
            "--hub_private",
            "true",
        ]
    )
    assert calls["create_repo"] == {"repo_id": "someone/xraycap-test", "private": True, "exist_ok": True}
    assert Path(calls["upload_folder"]["folder_path"]) == out
    saved = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    uploaded = {str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()}
    assert uploaded == saved and "model.safetensors" in uploaded and "modeling_xraycap.py" in uploaded
    code = (
        f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n"
        "from transformers import AutoModel, AutoProcessor\n"
        f"m = AutoModel.from_pretrained({str(hub)!r}, trust_remote_code=True)\n"
        f"AutoProcessor.from_pretrained({str(hub)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
    )
    assert proc.returncode == 0 and "XrayCapForConditionalGeneration" in proc.stdout, proc.stderr[-3000:]


def test_push_to_hub_offline_gives_a_clear_error(tmp_path: Path, monkeypatch):
    import huggingface_hub

    import run_captioning

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(RuntimeError, match="Could not push .* 'someone/x' .*saved locally"):
        run_captioning.push_to_hub(tmp_path, "someone/x", private=False)


# --------------------------------------------------------------------------------------------------
# The full default run (slow): the README's main job, as a user runs it
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_reads_the_images(tmp_path: Path):
    """Done means 1: `accelerate launch run_captioning.py` with no arguments (only a fresh output and cache
    folder), synthesis included: test ce_macro_f1 >= 0.80 and >= 0.30 above the grey-image ablation, within
    10 minutes of wall time."""
    out, cache = tmp_path / "outputs" / "xraycap-demo", tmp_path / "cache"
    start = time.perf_counter()
    run_script(
        ["--output_dir", str(out)],
        cache,
        cwd=tmp_path,
        launcher=[
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        timeout=1200,
    )
    wall = time.perf_counter() - start
    results = json.loads((out / "eval_results.json").read_text())
    test_f1, grey_f1 = results["test"]["ce_macro_f1"], results["test_image_ablated"]["ce_macro_f1"]
    print(f"default run: {wall:.0f} s wall, test ce_macro_f1 {test_f1:.3f}, grey images {grey_f1:.3f}")
    assert test_f1 >= 0.80
    assert test_f1 - grey_f1 >= 0.30
    assert wall <= 600, f"the default run took {wall:.0f} s (> 10 minutes)"
