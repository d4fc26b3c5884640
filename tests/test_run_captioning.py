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
from testing_utils import SMALL_RUN, reset_accelerate_state

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "run_captioning.py")

SMALL = [*SMALL_RUN, "--logging_steps", "1"]
# `accelerate launch` without a saved accelerate config; the script itself picks the precision.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
ACCELERATE_LAUNCH += ["--mixed_precision", "no", "--dynamo_backend", "no"]
FAST_EVAL = ["--num_beams", "2", "--max_new_tokens", "12", "--per_device_eval_batch_size", "8"]
# The metric keys eval_results.json carries for each test run (the README's Metrics section).
METRIC_KEYS = "bleu_1 bleu_2 bleu_3 bleu_4 meteor rouge_l cider bertscore_f1 ce_micro_f1 ce_macro_f1 ce_example_f1".split()


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
    run autocasts on every CPU (`auto` resolves to fp32 on CPUs without bf16 matmul hardware)."""
    out = tmp_path_factory.mktemp("run") / "model"
    args = [*SMALL, *FAST_EVAL, "--max_steps", "8", "--mixed_precision", "bf16", "--output_dir", str(out)]
    run_script(args, cache_dir, cwd=out.parent)
    return out


def run_outside_repo(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python whose import path holds neither the repository nor the working directory, as a
    user who only has the saved folder would; offline."""
    code = f"import sys; sys.path = [p for p in sys.path if p not in ('', {str(REPO)!r})]\n" + code
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
    )


def test_outputs_follow_the_contract(trained_run: Path):
    """The model folder, eval_results.json, predictions.jsonl, the card, the figures and run_args.json."""
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "configuration_xraycap.py",
        "modeling_xraycap.py",
        "image_decoding_xraycap.py",
        "image_processing_xraycap.py",
        "processing_xraycap.py",
        "pipeline_xraycap.py",
        "tokenizer.json",
        "eval_results.json",
        "predictions.jsonl",
        "README.md",
        "training_curves.png",
        "trainer_history.json",
        "samples.png",
        "samples.html",
        "run_args.json",
    ):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob("*.bin")), "weights must be safetensors only"
    results = json.loads((trained_run / "eval_results.json").read_text())
    for split in ("test", "test_image_ablated"):
        assert set(results[split]) >= set(METRIC_KEYS), split
    rows = [json.loads(line) for line in (trained_run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == results["run"]["num_examples"]["test"]
    assert len({row["id"] for row in rows}) == len(rows)
    assert all(set(row) >= {"id", "reference", "prediction"} for row in rows)
    args = json.loads((trained_run / "run_args.json").read_text())
    assert args["training"]["max_steps"] == 8 and args["training"]["mixed_precision_resolved"] == "bf16"
    assert results["run"]["mixed_precision"] == "bf16" and results["run"]["optimizer_steps"] == 8
    # The locally trained tokenizer saw the TRAIN split only (28 of 40 studies).
    assert results["run"]["num_examples"]["train"] == 28
    # The build report's count of test studies whose finding set no training study shows (phantoms: most).
    novelty = results["run"]["finding_sets"]
    assert novelty["num_test"] == results["run"]["num_examples"]["test"] >= novelty["num_test_unseen"] > 0
    # bf16 autocast runs over fp32 weights: the saved model is fp32.
    saved = load_file(trained_run / "model.safetensors").values()
    assert {t.dtype for t in saved if t.is_floating_point()} == {torch.float32}


def test_model_card_carries_the_test_scores_as_model_index(trained_run: Path):
    """README.md loads with huggingface_hub's ModelCard; its model-index holds the test scores of
    eval_results.json, and its body the metrics table with the grey-image column."""
    from huggingface_hub import ModelCard

    results = json.loads((trained_run / "eval_results.json").read_text())
    card = ModelCard.load(trained_run / "README.md")
    assert card.data.license == "cc-by-nc-nd-4.0" and card.data.pipeline_tag == "image-to-text"
    assert card.data.library_name == "transformers" and card.data.model_name == trained_run.name
    scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert {r.dataset_split for r in card.data.eval_results} == {"test"}
    assert {"bleu_4", "meteor", "cider", "bertscore_f1", "ce_macro_f1"} <= set(scores)
    for key, value in scores.items():
        assert value == pytest.approx(results["test"][key]), key
    assert "| metric | test | test_image_ablated |" in card.text
    ablated = f"{results['test_image_ablated']['ce_macro_f1']:.3f}"
    assert any(line.startswith("| ce_macro_f1 |") and ablated in line for line in card.text.splitlines())
    assert "not for clinical use" in card.text.lower()


def test_saved_folder_regenerates_predictions_outside_the_repo(trained_run: Path, tmp_path: Path):
    """A fresh process, cwd outside the repo, loads the folder with trust_remote_code and regenerates the same
    predictions from the test images."""
    # Regenerate a few test studies from their images and compare with predictions.jsonl.
    regen = f"""
import json
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
    from xraycap.dataset_builder import build_dataset

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
    proc = run_outside_repo(regen, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["regenerated"] == out["saved"]


def test_resume_after_sigkill_matches_uninterrupted_run(cache_dir, tmp_path: Path):
    """SIGKILL mid-epoch, resume from `latest`: the final weights equal an uninterrupted run's, bit for bit."""
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


def test_two_cpu_processes_score_every_test_study_once(cache_dir, tmp_path: Path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): both processes train, and every test
    study is generated and scored exactly once."""
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
        launcher=[*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2"],
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


@pytest.mark.slow
def test_torch_compile_trains_and_saves_a_loadable_folder(cache_dir, tmp_path: Path):
    """--torch_compile compiles the model (logged), trains two steps with the losses of an eager run, and saves a
    folder that loads in a fresh process. fp32: torch 2.14.1's Inductor emits C++ that does not compile for this
    model's bf16 backward on CPU. Slow: compiling takes about a minute on two cores."""
    out = tmp_path / "compiled"
    args = [
        *SMALL,
        "--max_steps",
        "2",
        "--do_eval",
        "false",
        "--mixed_precision",
        "no",
        "--output_dir",
        str(out),
    ]
    proc = run_script([*args, "--torch_compile", "true"], cache_dir, cwd=tmp_path, timeout=590)
    assert "torch.compile on (inductor)" in proc.stdout + proc.stderr
    losses = json.loads((out / "trainer_history.json").read_text())["loss"]
    eager_args = [a if a != str(out) else str(tmp_path / "eager") for a in args]
    run_script(eager_args, cache_dir, cwd=tmp_path, timeout=590)
    eager = json.loads((tmp_path / "eager" / "trainer_history.json").read_text())["loss"]
    # The same training, compiled; Inductor draws its own dropout masks, so they agree to that noise only.
    assert losses == pytest.approx(eager, rel=2e-2), (losses, eager)
    code = (
        "import torch\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "pixels = torch.rand(1, model.config.max_views, 3, model.config.image_size, model.config.image_size)\n"
        "ids = model.generate(pixel_values=pixels, max_new_tokens=4, do_sample=False)\n"
        "print(type(model).__name__, ids.shape[0])"
    )
    loaded = run_outside_repo(code, tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split()[-2:] == ["XrayCapForConditionalGeneration", "1"]


# --------------------------------------------------------------------------------------------------
# In-process checks (argument validation, autocast, Hub upload)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


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
        (["--views", "sideways"], ValueError, "--views 'sideways'"),
        (["--synthetic_studies", "5"], ValueError, "use >= 20"),
        (["--max_nonfinite_steps", "0"], ValueError, "--max_nonfinite_steps must be >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_fast(argv, error, message, tmp_path: Path, monkeypatch):
    """Each bad argument stops before any work, naming the value and the fix."""
    import run_captioning

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(error) as info:
        run_captioning.parse_args(argv)
    if message:
        assert message in str(info.value)


def test_grid_size_argument_reaches_the_config():
    """--grid_size N pools to N x N tokens; 0 keeps the encoder's native map (grid_size None)."""
    import run_captioning
    from xraycap.training.models import build_config

    for argv, expected in (([], 4), (["--grid_size", "2"], 2), (["--grid_size", "0"], None)):
        model_args, _, _ = run_captioning.parse_args(["--preset", "resnet50-gpt2", *argv])
        assert build_config(model_args).grid_size == expected, argv


def test_arguments_come_from_a_yaml_or_json_file(tmp_path: Path, capsys):
    """`run_captioning.py args.yaml` (or args.json) reads every argument group from the file; arguments after
    the file override it; a bad value in the file is refused by name, as on the command line."""
    import yaml

    import run_captioning

    values = {
        "preset": "resnet50-gpt2",
        "synthetic_studies": 60,
        "learning_rate": 3e-4,
        "torch_compile": True,
        "hub_model_id": None,  # null keeps the default
    }
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(values))
    (tmp_path / "args.json").write_text(json.dumps(values))
    for name in ("args.yaml", "args.json"):
        model_args, data_args, train_args = run_captioning.parse_args([str(tmp_path / name)])
        assert model_args.preset == "resnet50-gpt2" and data_args.synthetic_studies == 60, name
        assert train_args.learning_rate == 3e-4 and train_args.torch_compile is True, name
        assert train_args.max_steps == -1 and train_args.hub_model_id is None, name  # defaults kept
    _, data_args, train_args = run_captioning.parse_args(
        [str(tmp_path / "args.yaml"), "--learning_rate", "1e-5", "--torch_compile", "false"]
    )
    assert train_args.learning_rate == 1e-5 and train_args.torch_compile is False
    assert data_args.synthetic_studies == 60
    for key, value in (("preset", "gigantic"), ("mixed_precision", "fp8")):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**values, key: value}))
        with pytest.raises(SystemExit):
            run_captioning.parse_args([str(tmp_path / "bad.yaml")])
        assert f"invalid choice: '{value}'" in capsys.readouterr().err
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"learning_rat": 0.1}))  # not taken for learning_rate
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['learning_rat'\]"):
        run_captioning.parse_args([str(tmp_path / "typo.yaml")])


def test_unknown_preset_is_refused(capsys):
    """--preset must be one of the presets; argparse says which value was refused."""
    import run_captioning

    with pytest.raises(SystemExit):
        run_captioning.parse_args(["--preset", "gigantic"])
    assert "invalid choice: 'gigantic'" in capsys.readouterr().err


def test_bf16_on_cpu_really_autocasts(cache_dir, tmp_path: Path, monkeypatch, fresh_accelerate_state):
    """--mixed_precision bf16 resolves to bf16, and the training forward runs under bf16 autocast with bf16 logits
    (observed inside the model), over fp32 weights."""
    import run_captioning
    from modeling_xraycap import XrayCapForConditionalGeneration

    seen = []
    original = XrayCapForConditionalGeneration.forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            weights = self.language_model.get_input_embeddings().weight.dtype
            seen.append(
                (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.logits.dtype, weights)
            )
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
    assert all(enabled and dtype == torch.bfloat16 for enabled, dtype, _, _ in seen), seen
    assert seen[0][2] == torch.bfloat16  # the logits really were computed in bf16
    assert seen[0][3] == torch.float32  # over fp32 weights
    assert json.loads((tmp_path / "o" / "eval_results.json").read_text())["run"]["mixed_precision"] == "bf16"


def test_push_to_hub_uploads_the_model_files_and_the_extra_asked_for(
    cache_dir, tmp_path: Path, monkeypatch, fresh_accelerate_state
):
    """--push_to_hub uploads the saved model files through HfApi, faked here, plus --hub_upload_extra's; run
    arguments (local paths), history, curves and checkpoints stay local. What was uploaded loads in a fresh
    process."""
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
            "--hub_upload_extra",
            "eval_results.json",
        ]
    )
    assert calls["create_repo"] == {"repo_id": "someone/xraycap-test", "private": True, "exist_ok": True}
    assert Path(calls["upload_folder"]["folder_path"]) == out
    saved = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    uploaded = {str(p.relative_to(hub)) for p in hub.rglob("*") if p.is_file()}
    local_only = {"run_args.json", "trainer_history.json", "training_curves.png"}
    assert local_only <= saved and (out / "checkpoints").is_dir()
    assert uploaded == saved - local_only
    assert {"model.safetensors", "modeling_xraycap.py", "README.md", "eval_results.json"} <= uploaded
    code = (
        "from transformers import AutoModel, AutoProcessor\n"
        f"m = AutoModel.from_pretrained({str(hub)!r}, trust_remote_code=True)\n"
        f"AutoProcessor.from_pretrained({str(hub)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__)"
    )
    proc = run_outside_repo(code, tmp_path)
    assert proc.returncode == 0 and "XrayCapForConditionalGeneration" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# The full default run (slow): the README's main job, as a user runs it
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_run_reads_the_images(tmp_path: Path):
    """`accelerate launch run_captioning.py` with no arguments (only a fresh output and cache folder), synthesis
    included, within 10 minutes of wall time: test ce_macro_f1 >= 0.85 over at least 9 CheXpert observations
    with support in the test split, at least 0.05 above the nearest-train retrieval floor (most test studies
    combine findings that no training study shows together) and 0.60 above the grey-image ablation."""
    out, cache = tmp_path / "outputs" / "xraycap-demo", tmp_path / "cache"
    start = time.perf_counter()
    run_script(
        ["--output_dir", str(out)],
        cache,
        cwd=tmp_path,
        launcher=[*ACCELERATE_LAUNCH, "--num_processes", "1"],
        timeout=1200,
    )
    wall = time.perf_counter() - start
    results = json.loads((out / "eval_results.json").read_text())
    test, grey, nearest = (results[s] for s in ("test", "test_image_ablated", "test_nearest_train"))
    print(
        f"default run: {wall:.0f} s wall, test ce_macro_f1 {test['ce_macro_f1']:.3f} over "
        f"{test['ce_num_observations']:.0f} observations, nearest-train {nearest['ce_macro_f1']:.3f}, "
        f"grey images {grey['ce_macro_f1']:.3f}"
    )
    assert test["ce_num_observations"] >= 9
    assert test["ce_macro_f1"] >= 0.85
    assert test["ce_macro_f1"] - nearest["ce_macro_f1"] >= 0.05
    assert test["ce_macro_f1"] - grey["ce_macro_f1"] >= 0.60
    assert wall <= 600, f"the default run took {wall:.0f} s (> 10 minutes)"
