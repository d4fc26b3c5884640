"""Shared pytest setup: offline by default, and the real Indiana samples when they are present."""

import os
from pathlib import Path

import pytest

# Tests never touch the network: make any accidental Hub call fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` next to the checkout (real Indiana samples); skips where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (only present in the project's workplace)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny XrayCap folder (random weights, pipeline file included) for the "using it" tests."""
    from usage_testing_utils import make_tiny, save_model_folder

    model, processor = make_tiny()
    return save_model_folder(model, processor, tmp_path_factory.mktemp("xraycap-tiny"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    """`model_dir` loaded back with trust_remote_code: `(model, processor)`."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops run several times faster on one thread on a busy shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A tiny XrayCap model (random weights, 64-px images, two view slots) in eval mode, and its processor."""
    from testing_utils import make_tiny_model_and_processor

    model, processor = make_tiny_model_and_processor(image_size=64)
    return model.eval(), processor
