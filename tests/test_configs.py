"""The one-command configs in `configs/`: each trains as written, with its towers swapped for local folders.

The configs name Hub towers (`microsoft/resnet-50`, `gpt2`) and download the Kaggle data; here the towers are
random-weight folders of the same architectures (`save_pretrained`) and the data are phantom studies in the
Kaggle layout, given as overrides after the file, exactly as a user overrides a config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from testing_utils import make_tiny_tokenizer, reset_accelerate_state
from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetModel
from xraycap.dataset_builder import synthesize

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def save_towers(folder: Path, real_size: bool) -> tuple[Path, Path]:
    """A ResNet (bottleneck blocks, as ResNet-50) and a GPT-2 with its tokenizer, random weights, saved locally.
    `real_size`: ResNet-50's and GPT-2 small's own sizes (transformers' config defaults)."""
    tokenizer = make_tiny_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if real_size:
        vision, text = ResNetConfig(), GPT2Config(**ids)
    else:
        vision = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
        text = GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=2, **ids)
    ResNetModel(vision).save_pretrained(folder / "resnet")
    GPT2LMHeadModel(text).save_pretrained(folder / "gpt2")
    tokenizer.save_pretrained(folder / "gpt2")
    return folder / "resnet", folder / "gpt2"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantoms")
    synthesize(folder, num_studies=40, seed=0)
    return folder


def overrides(phantoms: Path, towers: tuple[Path, Path], tmp_path: Path) -> dict[str, str]:
    """What a test changes in a config: local towers and data, two steps, a short evaluation."""
    return {
        "download": "false", "data_dir": str(phantoms), "cache_dir": str(tmp_path / "cache"),
        "vision_model": str(towers[0]), "text_model": str(towers[1]), "max_steps": "2",
        "per_device_train_batch_size": "4", "max_eval_samples": "4", "max_new_tokens": "8",
        "output_dir": str(tmp_path / "out"),
    }  # fmt: skip


def run_config(config: Path, changes: dict[str, str]) -> dict:
    import run_captioning

    reset_accelerate_state()
    try:
        return run_captioning.main(
            [str(config), *(x for key, value in changes.items() for x in (f"--{key}", value))]
        )
    finally:
        reset_accelerate_state()


def test_there_are_the_two_configs_the_readme_names():
    assert [c.name for c in CONFIGS] == ["iu_r2gen.yaml", "iu_seed.yaml"]
    readme = (REPO / "README.md").read_text()
    assert all(f"run_captioning.py configs/{c.name}" in readme for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_trains_with_local_towers(config: Path, phantoms: Path, tmp_path: Path):
    """Every value of the file reaches the run; the overrides after it win; the saved model has the file's
    architecture."""
    values = yaml.safe_load(config.read_text())
    changes = overrides(phantoms, save_towers(tmp_path, real_size=False), tmp_path)
    results = run_config(config, changes)
    assert results["run"]["optimizer_steps"] == 2
    assert {"test", "test_image_ablated", "test_nearest_train"} <= set(results)
    run_args = json.loads((tmp_path / "out" / "run_args.json").read_text())
    flat = {**run_args["model"], **run_args["data"], **run_args["training"]}
    for key, value in values.items():
        assert flat[key] == (value if key not in changes else yaml.safe_load(changes[key])), key
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("max_views", "visual_tokens"):  # freezing is a training choice: run_args.json has it
        assert saved[key] == values[key], key


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_trains_real_size_towers(config: Path, phantoms: Path, tmp_path: Path):
    """The same at real sizes: a random-weight ResNet-50 (23.5M parameters) and GPT-2 small (124M)."""
    results = run_config(config, overrides(phantoms, save_towers(tmp_path, real_size=True), tmp_path))
    assert results["run"]["optimizer_steps"] == 2
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["vision_config"]["hidden_sizes"] == [256, 512, 1024, 2048]
    assert saved["text_config"]["n_layer"] == 12 and saved["text_config"]["n_embd"] == 768
