"""What a run on several GPUs or machines relies on, checked on the CPU: the collective timeout, DDP's options,
the GPU each process probes, SyncBatchNorm for a trained tower, TF32, the CPU threads under `accelerate launch`,
and (slow) two "machines" on this host, each with its own cache."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from testing_utils import reset_accelerate_state

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def accelerator_of():
    """`accelerator_of(argv)`: the Accelerator run_captioning builds for these arguments."""
    from xraycap.training.arguments import parse_args
    from xraycap.training.distributed import build_accelerator

    def build(argv: list[str]):
        model_args, _, train_args = parse_args(["--output_dir", "/nonexistent/xraycap-test", *argv])
        reset_accelerate_state()
        return build_accelerator(model_args, train_args, "no", "/nonexistent/xraycap-test/runs")

    yield build
    reset_accelerate_state()


def test_process_group_timeout_is_ddp_timeout(accelerator_of):
    """Every process waits 1800 s at a collective by default (torch's own default is 600), or --ddp_timeout."""
    assert accelerator_of([]).init_handler.timeout == timedelta(seconds=1800)
    assert accelerator_of(["--ddp_timeout", "7200"]).init_handler.timeout == timedelta(seconds=7200)


def test_frozen_tower_buffers_are_not_broadcast_every_forward(accelerator_of):
    """A frozen tower's BatchNorm statistics never change: DDP need not re-send them before each forward. A trained
    tower keeps the broadcast and lets DDP skip parameters the prefix never reads."""
    frozen = accelerator_of(["--freeze_vision_encoder", "true"]).ddp_handler
    assert frozen.broadcast_buffers is False and frozen.find_unused_parameters is False
    trained = accelerator_of(["--freeze_vision_encoder", "false"]).ddp_handler
    assert trained.broadcast_buffers is True and trained.find_unused_parameters is True


def test_each_process_probes_its_own_gpu_for_bf16(monkeypatch):
    """On a node with a V100 as GPU 0 and an A100 as GPU 1, the process on GPU 1 (LOCAL_RANK=1) trains in bf16."""
    from xraycap.training.distributed import resolve_mixed_precision

    capabilities = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: capabilities[0 if device is None else device]
    )
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_mixed_precision("auto", "cuda") == "bf16"
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_mixed_precision("auto", "cuda") == "fp16"


def _tiny_model(frozen: bool):
    from testing_utils import make_tiny_model_and_processor

    model, _ = make_tiny_model_and_processor(image_size=64, freeze_vision_encoder=frozen)
    return model


@pytest.mark.parametrize(
    ("frozen", "processes", "device", "converted"),
    [(False, 2, "cuda", True), (True, 2, "cuda", False), (False, 1, "cuda", False), (False, 2, "cpu", False)],
)
def test_trained_batchnorm_tower_is_synced_across_gpus(frozen, processes, device, converted):
    """A trained tower's BatchNorm layers become SyncBatchNorm on several GPUs (same weights and statistics);
    a frozen tower, one process or a CPU run keep plain BatchNorm."""
    from xraycap.training.models import sync_batchnorm

    model = _tiny_model(frozen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = SimpleNamespace(num_processes=processes, device=torch.device(device))
    assert sync_batchnorm(model, accelerator) is converted
    kinds = {
        type(m) for m in model.vision_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert kinds == ({torch.nn.SyncBatchNorm} if converted else {torch.nn.BatchNorm2d})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tf32_flag_sets_the_fp32_matmul_precision(monkeypatch):
    from xraycap.training.distributed import set_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        set_tf32(True)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        set_tf32(False)
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        set_tf32(None)  # torch's default is left alone
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


THREADS_SCRIPT = """
import torch
from xraycap.training.distributed import use_the_cpu_cores
print("threads", use_the_cpu_cores(torch.device("cpu")))
"""


def _threads(command: list[str], env: dict[str, str]) -> int:
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("threads")[-1].split()[0])


@pytest.mark.slow
def test_accelerate_launch_uses_as_many_cpu_threads_as_python(tmp_path: Path):
    """`accelerate launch` sets OMP_NUM_THREADS=1 when the user set nothing: one process on a CPU then still uses
    the cores a plain `python` process uses; a thread count the user set is kept."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS" and not k.startswith("ACCELERATE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    # The README's command: no --cpu (with it the launcher picks the core count itself).
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
    ]
    launch = [*launch, "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    plain = _threads([sys.executable, str(script)], env)
    if plain == 1:
        pytest.skip("torch uses one thread here anyway: nothing to compare")
    assert _threads(launch, env) == plain
    assert _threads(launch, {**env, "OMP_NUM_THREADS": "1"}) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_two_machines_with_their_own_caches_build_at_once_and_train(tmp_path: Path):
    """Two "machines" on this host (`accelerate launch --num_machines 2 --machine_rank 0|1`, CPU, gloo), each with
    its own cache folder, as `~/.cache` is on most clusters: each machine builds its dataset at the same time
    (neither waits for the other's build), the run trains, and every test study is scored exactly once. A resume
    of its checkpoint with one process is refused, naming the process count."""
    out, port = tmp_path / "model", _free_port()
    args = [
        "run_captioning.py",
        *[
            "--synthetic_studies",
            "40",
            "--per_device_train_batch_size",
            "4",
            "--seed",
            "3",
            "--max_steps",
            "3",
        ],
        *["--num_beams", "1", "--max_new_tokens", "8", "--per_device_eval_batch_size", "3"],
        *["--output_dir", str(out), "--ddp_timeout", "900"],
    ]
    machines = []
    for rank in (0, 1):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
        launch += ["--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
        launch += ["--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "XRAYCAP_CACHE": str(tmp_path / f"cache-{rank}")}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / f"hf-{rank}"))
        log = open(tmp_path / f"machine-{rank}.log", "w")  # noqa: SIM115 - closed below
        machines.append(
            (subprocess.Popen([*launch, *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=log), log)
        )
    for proc, log in machines:
        proc.wait(timeout=1500)
        log.close()
    logs = [(tmp_path / f"machine-{rank}.log").read_text() for rank in (0, 1)]
    assert [proc.returncode for proc, _ in machines] == [0, 0], "\n\n".join(log[-4000:] for log in logs)

    # Both caches were built, at the same time: the second machine's first phantom file is older than the first
    # machine's last one (with the global main process first, the second machine would start after it finished).
    synthetic = [next((tmp_path / f"cache-{rank}").glob("synthetic-*")) for rank in (0, 1)]
    built = [list((tmp_path / f"cache-{rank}" / "datasets").iterdir()) for rank in (0, 1)]
    assert all(built), built
    first_of_second = min(p.stat().st_mtime for p in _files(synthetic[1]))
    last_of_first = max(p.stat().st_mtime for p in _files(synthetic[0]))
    assert first_of_second < last_of_first

    results = json.loads((out / "eval_results.json").read_text())
    assert results["run"]["num_processes"] == 2 and results["run"]["optimizer_steps"] == 3
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == results["run"]["num_examples"]["test"] == 8

    import run_captioning

    checkpoint = out / "checkpoints" / "checkpoint-3"
    reset_accelerate_state()
    try:
        with pytest.raises(ValueError, match="checkpoint-3: num_processes is 1 now but was 2"):
            run_captioning.main(
                [
                    *args[1:],
                    "--resume_from_checkpoint",
                    str(checkpoint),
                    "--cache_dir",
                    str(tmp_path / "cache-0"),
                ]
            )
    finally:
        reset_accelerate_state()
