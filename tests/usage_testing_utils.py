"""Helpers for the "using it" tests (caption CLI, pipeline, app): phantom images and a tiny saved model.

The model is the "tiny" preset (random weights) with a tokenizer trained locally on phantom reports.
Training it, even briefly, costs minutes on the shared 2-core machine, so `make_tiny` instead sets
generation options that keep an untrained model from answering with an empty string.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import torch
from PIL import Image
from testing_utils import make_tiny_model_and_processor
from xraycap.dataset_builder.synthesize import make_study

from pipeline_xraycap import add_pipeline_to_folder
from xraycap.training.model_card import build_model_card


def phantom_studies(num_studies: int = 4, image_size: int = 128, seed: int = 0, start: int = 0):
    """`[(frontal PIL, lateral PIL, findings text)]` from the phantom generator."""
    studies = []
    for index in range(start, start + num_studies):
        study, images = make_study(index, seed, image_size)
        frontal, lateral = (Image.open(io.BytesIO(data)).copy() for _, _, data in images)
        studies.append((frontal, lateral, study.findings))
    return studies


def write_phantom_pngs(
    folder: Path, num_studies: int = 3, image_size: int = 128, start: int = 100, seed: int = 0
) -> list[tuple[Path, Path]]:
    """Write phantom frontal/lateral PNGs into `folder`; returns the (frontal, lateral) paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (frontal, lateral, _) in enumerate(
        phantom_studies(num_studies, image_size, seed=seed, start=start)
    ):
        f, lat = folder / f"study{i:02d}_frontal.png", folder / f"study{i:02d}_lateral.png"
        frontal.save(f)
        lateral.save(lat)
        paths.append((f, lat))
    return paths


def make_tiny(visual_tokens: str = "grid", seed: int = 0, max_new_tokens: int = 24):
    """
    `testing_utils.make_tiny_model_and_processor` (random weights, "tiny" preset, local tokenizer), set up so
    that generation says something.

    An untrained model tends to emit eos (or byte tokens that decode to U+FFFD) at once and to ignore the
    image, and comparing two empty strings would prove nothing. So the projection is scaled up (the image
    changes the text) and the generation config suppresses pad and unprintable byte tokens, penalises
    repeats (`repetition_penalty=10`; `no_repeat_ngram_size` is far slower on CPU), and asks for 8 to
    `max_new_tokens` new tokens. These are ordinary `generate` settings saved in `generation_config.json`,
    used alike by `generate`, the pipeline, the CLI and the app.
    """
    model, processor = make_tiny_model_and_processor(seed=seed, visual_tokens=visual_tokens)
    model.eval()
    tokenizer = processor.tokenizer
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    unprintable = [
        i
        for i in range(len(tokenizer))
        if i not in special and not (tokenizer.decode([i]).isascii() and tokenizer.decode([i]).isprintable())
    ]
    with torch.no_grad():  # random init barely lets the image prefix move the text: make the image matter
        for parameter in model.projection.parameters():
            parameter.mul_(40.0)
        model.view_embedding.normal_(0.0, 0.5)
    model.generation_config.suppress_tokens = sorted({tokenizer.pad_token_id, *unprintable})
    model.generation_config.min_new_tokens = 8
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.max_new_tokens = max_new_tokens
    return model, processor


def save_model_folder(model, processor, folder: Path) -> Path:
    """Save like run_captioning does: code files travel, plus the pipeline registration."""
    type(model.config).register_for_auto_class()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    add_pipeline_to_folder(folder)
    return folder


def write_model_card(folder: Path, dataset_id: str, data_description: str) -> Path:
    """Write the model card run_captioning writes (xraycap/training/model_card.py) for a run on `dataset_id`."""
    run_info = {
        "model_name": folder.name,
        "architecture": "tiny ResNet -> GPT-2",
        "data_description": data_description,
        "num_examples": {"train": 8, "test": 2},
        "section": "findings",
        "views": "frontal",
        "training_description": "a test run",
        "num_beams": 3,
        "dataset_id": dataset_id,
        "dataset_name": "a data set",
        "base_model": None,
    }
    build_model_card({"test": {"bleu_4": 0.5}}, run_info).save(folder / "README.md")
    return folder / "README.md"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims `width` x `height` (1-bit grey) and holds no pixels: a cheap huge image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path
