"""Small, fast helpers shared by the test files: a local tokenizer, a tiny model + processor, phantom images.

Import them with `from testing_utils import ...` (pytest puts `tests/` on sys.path).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from configuration_xraycap import XrayCapConfig  # noqa: E402
from modeling_xraycap import XrayCapForConditionalGeneration  # noqa: E402
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer  # noqa: E402
from xraycap.training.models import freeze_vision_tower  # noqa: E402

FINDINGS = ("normal", "cardiomegaly", "left_effusion", "right_pneumothorax", "nodule")

# One report per phantom finding, phrased as the synthetic data is (dataset_builder/phantom_report.py).
PHANTOM_REPORTS = {
    "normal": "Heart size is normal. No pneumothorax or pleural effusion. No acute cardiopulmonary abnormality.",
    "cardiomegaly": "The heart is enlarged. No pneumothorax or pleural effusion.",
    "left_effusion": "Heart size is normal. Small left pleural effusion. No pneumothorax.",
    "right_pneumothorax": "Heart size is normal. Right pneumothorax. No pleural effusion.",
    "nodule": "Heart size is normal. Right upper lobe nodule. No pleural effusion.",
}

_DEFAULT_CORPUS = (
    *PHANTOM_REPORTS.values(),
    "Bilateral pleural effusions with airspace opacity. Cardiomegaly.",
    "Focal consolidation in the left lower lobe. Normal cardiac silhouette.",
    "Lungs are clear. The cardiomediastinal silhouette is within normal limits.",
)


@lru_cache(maxsize=8)
def _tokenizer_for(texts: tuple[str, ...], vocab_size: int):
    return train_tokenizer(list(texts) * 4, vocab_size=vocab_size)


def make_tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 400):
    """A GPT-2-style byte-level BPE trained on `texts` (default: phantom report phrasing), in ~10 ms.

    Ids: `<|endoftext|>` (bos = eos) = 0, `<|pad|>` = 1. A fresh copy is returned on every call.
    """
    import copy

    corpus = tuple(texts) if texts is not None else _DEFAULT_CORPUS
    return copy.deepcopy(_tokenizer_for(corpus, vocab_size))


def make_tiny_model_and_processor(
    seed: int = 0, tokenizer=None, freeze_vision_encoder: bool = True, **config_overrides
) -> tuple[XrayCapForConditionalGeneration, XrayCapProcessor]:
    """The "tiny" preset (2.7M parameters at default sizes) with a local tokenizer, seeded.

    Args:
        seed: torch seed for the random weights.
        tokenizer: a tokenizer to use instead of `make_tiny_tokenizer()`.
        freeze_vision_encoder: freeze the vision tower as training does (`training.models.freeze_vision_tower`).
        **config_overrides: passed to `XrayCapConfig.from_preset("tiny", ...)`, e.g. `image_size=64`,
            `max_views=1`, `visual_tokens="pooled"`, `n_layer=2`.

    Returns:
        `(model, processor)`; the processor's `max_length` keeps every sequence within `n_positions`.
    """
    tokenizer = tokenizer if tokenizer is not None else make_tiny_tokenizer()
    overrides = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config_overrides,
    }
    config = XrayCapConfig.from_preset("tiny", **overrides)
    torch.manual_seed(seed)
    model = XrayCapForConditionalGeneration(config)
    freeze_vision_tower(model, freeze_vision_encoder)
    processor = XrayCapProcessor(
        XrayCapImageProcessor(size=config.image_size),
        tokenizer,
        max_views=config.max_views,
        max_length=config.text_config.n_positions - model.max_prefix_length,
    )
    return model, processor


def make_phantom_image(
    finding: str = "normal", size: int = 64, seed: int = 0, mode: str = "L"
) -> Image.Image:
    """A synthetic frontal chest film: two lungs, a heart, and one drawn finding.

    Args:
        finding: one of `FINDINGS` ("normal", "cardiomegaly", "left_effusion", "right_pneumothorax",
            "nodule"). Patient's left is image right, as on a real film.
        size: side in pixels.
        seed: jitters positions by a pixel or two and adds mild noise.
        mode: PIL mode of the result ("L", "RGB", "I;16", ...).
    """
    if finding not in FINDINGS:
        raise ValueError(f"finding={finding!r} is not one of {FINDINGS}")
    rng = np.random.default_rng(seed)
    s = size / 64.0
    jx, jy = rng.integers(-1, 2, size=2) * s
    image = Image.new("L", (size, size), 200)  # soft tissue: bright
    draw = ImageDraw.Draw(image)
    right_lung = [8 * s + jx, 10 * s + jy, 30 * s + jx, 54 * s + jy]  # image left = patient's right
    left_lung = [34 * s + jx, 10 * s + jy, 56 * s + jx, 54 * s + jy]
    draw.ellipse(right_lung, fill=40)  # aerated lungs: dark
    draw.ellipse(left_lung, fill=40)
    heart = 9 if finding != "cardiomegaly" else 16
    cx, cy = 34 * s + jx, 42 * s + jy
    draw.ellipse([cx - heart * s, cy - heart * 0.8 * s, cx + heart * s, cy + heart * 0.8 * s], fill=230)
    if finding == "left_effusion":
        draw.rectangle([33 * s + jx, 32 * s + jy, 57 * s + jx, 55 * s + jy], fill=235)
    elif finding == "right_pneumothorax":
        draw.ellipse([5 * s + jx, 5 * s + jy, 27 * s + jx, 34 * s + jy], fill=0)
    elif finding == "nodule":
        draw.ellipse([15 * s + jx, 18 * s + jy, 23 * s + jx, 26 * s + jy], fill=255)
    array = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (size, size))
    array = np.clip(array, 0, 255).astype(np.uint8)
    out = Image.fromarray(array)
    if mode == "I;16":
        return Image.fromarray(array.astype(np.uint16) * 257)
    return out.convert(mode) if mode != "L" else out


def phantom_batch(processor, findings: Iterable[str] = FINDINGS[:2], text: bool = True, size: int = 64):
    """A processor batch of one phantom frontal image per finding, with its report when `text` is True."""
    findings = list(findings)
    images = [make_phantom_image(f, size=size) for f in findings]
    texts = [PHANTOM_REPORTS[f] for f in findings] if text else None
    return processor(images=images, text=texts, return_tensors="pt")


# A small run_captioning job: 40 phantom studies -> 28 / 4 / 8; batch 4 -> 7 optimizer steps per epoch.
SMALL_RUN = ["--synthetic_studies", "40", "--per_device_train_batch_size", "4", "--seed", "3"]


def reset_accelerate_state() -> None:
    """Forgets Accelerate's process-wide state, so that the next in-process `run_captioning.main` starts fresh."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
