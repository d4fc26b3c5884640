"""The model reads nothing back from the device in a training forward nor per generated token with a static
cache (on a GPU each such read waits for every queued kernel, and under torch.compile it breaks the graph)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import modeling_xraycap
from modeling_xraycap import check_view_mask_rows

MODEL_FILE = Path(modeling_xraycap.__file__).resolve()
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def model_reads(monkeypatch) -> Counter:
    """Counts tensor -> Python reads made by modeling_xraycap.py itself."""
    counts: Counter = Counter()
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name):
            if Path(sys._getframe(1).f_code.co_filename).resolve() == MODEL_FILE:
                counts[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


def _batch(processor, studies: int = 2) -> dict[str, torch.Tensor]:
    from PIL import Image

    images = [[Image.new("L", (64, 64), 60 + 40 * i)] for i in range(studies)]
    return dict(processor(images=images, text=["heart size normal ."] * studies, return_tensors="pt"))


def test_training_forward_reads_nothing_back(tiny, model_reads):
    model, processor = tiny
    model.train()
    try:
        batch = _batch(processor)
        model(**batch).loss.backward()
    finally:
        model.eval()
    assert not model_reads, dict(model_reads)


def test_static_cache_generation_reads_nothing_back_per_token(tiny, model_reads):
    """Generating 9 tokens with a static cache reads no more values from the device than generating 3."""
    model, processor = tiny
    batch = {k: v for k, v in _batch(processor).items() if k in ("pixel_values", "view_mask")}
    reads = []
    for tokens in (3, 9):
        model_reads.clear()
        ids = model.generate(
            **batch,
            cache_implementation="static",
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
        )
        assert ids.shape[1] == tokens
        reads.append(sum(model_reads.values()))
    assert reads[0] == reads[1], reads


def test_a_study_without_any_view_is_refused_outside_training(tiny):
    """The check reads the mask: the collator runs it once per batch; the model itself outside training only."""
    model, processor = tiny
    batch = _batch(processor)
    batch["view_mask"] = torch.tensor([[1, 0], [0, 0]])[:, : batch["pixel_values"].shape[1]]
    with pytest.raises(ValueError, match=r"no view present in rows \[1\]"):
        check_view_mask_rows(batch["view_mask"].bool())
    with pytest.raises(ValueError, match=r"no view present in rows \[1\]"):
        model.generate(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"], max_new_tokens=2)
