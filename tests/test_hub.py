"""`--push_to_hub` (`xraycap/training/hub.py`): what goes up, what stays local, and the error without the Hub.

That a training run uploads after its last collective is in test_training_fault_runs.py; an end-to-end run
with `--push_to_hub` in test_run_captioning.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xraycap.training.hub import push_to_hub

# --------------------------------------------------------------------------------------------------
# What it uploads
# --------------------------------------------------------------------------------------------------

MODEL_FILES = [
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "configuration_xraycap.py",
    "modeling_xraycap.py",
    "image_decoding_xraycap.py",
    "image_processing_xraycap.py",
    "processing_xraycap.py",
    "pipeline_xraycap.py",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "README.md",
]
LOCAL_FILES = [
    "predictions.jsonl",
    "samples.png",
    "samples.html",
    "run_args.json",
    "trainer_history.json",
    "eval_results.json",
    "training_curves.png",
    "notes.txt",
    "xraycap/events.out.tfevents.1.host",
    "runs/xraycap/events.out.tfevents.2.host",
    "checkpoints/checkpoint-8/model.safetensors",
]


def _fake_hub(monkeypatch, hub: Path) -> None:
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (hub / rel).parent.mkdir(parents=True, exist_ok=True)
            (hub / rel).write_bytes((Path(folder_path) / rel).read_bytes())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    for name in MODEL_FILES + LOCAL_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps({"file": name}))
    return folder


def test_push_to_hub_uploads_only_the_model_files(run_folder: Path, tmp_path: Path, monkeypatch):
    """Weights, configs, code, tokenizer, processor and card go up; predictions, samples, run arguments (local
    paths), history, tracker logs wherever they are, checkpoints and stray files stay local."""
    hub = tmp_path / "hub"
    _fake_hub(monkeypatch, hub)
    push_to_hub(run_folder, "someone/x")
    assert sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file()) == sorted(MODEL_FILES)


def test_push_to_hub_uploads_the_extra_files_asked_for(run_folder: Path, tmp_path: Path, monkeypatch):
    """`extra` patterns (--hub_upload_extra) add files to the upload; checkpoints stay local even then."""
    hub = tmp_path / "hub"
    _fake_hub(monkeypatch, hub)
    push_to_hub(run_folder, "someone/x", extra=["predictions.jsonl", "eval_results.json", "checkpoints/*"])
    uploaded = sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file())
    assert uploaded == sorted([*MODEL_FILES, "predictions.jsonl", "eval_results.json"])


def test_hub_upload_extra_argument_reaches_the_upload():
    """--hub_upload_extra takes a comma-separated list of file patterns."""
    import run_captioning

    args = ["--hub_upload_extra", "predictions.jsonl, eval_results.json", "--output_dir", "/nonexistent/x"]
    *_, train_args = run_captioning.parse_args(args)
    assert run_captioning.hub_upload_extra(train_args) == ["predictions.jsonl", "eval_results.json"]


def test_push_to_hub_offline_gives_a_clear_error(tmp_path: Path, monkeypatch):
    """Without the Hub the error says the model is saved locally and how to upload it later."""
    import huggingface_hub

    def offline(self, *args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(
        RuntimeError, match="Could not push .* 'someone/x' .*saved locally.*hf upload someone/x"
    ):
        push_to_hub(tmp_path, "someone/x", private=False)
