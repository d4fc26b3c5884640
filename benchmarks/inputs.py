"""What the benchmarks run on: random real-size batches, and full-size PNG studies like the Indiana files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from xraycap.dataset_builder import synthesize


def random_batch(config, batch_size: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch shaped like `XrayCapProcessor` output for `config`: every view present, bos +
    `text_tokens - 1` report tokens with no padding (every position costs), labels -100 on the bos."""
    gen = torch.Generator().manual_seed(seed)
    size, views = config.image_size, config.max_views
    input_ids = torch.randint(2, max(config.vocab_size - 2, 3), (batch_size, text_tokens), generator=gen)
    input_ids[:, 0] = config.bos_token_id
    labels = input_ids.clone()
    labels[:, 0] = -100
    return {
        "pixel_values": torch.randn(batch_size, views, 3, size, size, generator=gen),
        "view_mask": torch.ones(batch_size, views, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def make_full_size_studies(root: Path, num_studies: int, sides: tuple[int, int]) -> tuple[dict, float]:
    """Phantom studies in the Kaggle layout (`dataset_builder.synthesize`), every PNG enlarged to a random side in
    `sides` with sensor-like noise (sigma 2 grey levels): a 2048 x 2496 image then takes ~2.3 MB and decodes in
    ~0.12 s, like the real Indiana files.

    Returns:
        `tuple[dict[str, list[str]], float]`: uid -> the paths of the study's PNGs (frontal first), and the mean
        side in pixels.
    """
    root = Path(synthesize(root, num_studies=num_studies, seed=0, image_size=256, num_proc=1))
    rng = np.random.default_rng(0)
    views: dict[str, list[tuple[bool, str]]] = {}
    mean_sides = []
    with open(root / "indiana_projections.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = root / "images" / "images_normalized" / row["filename"]
            views.setdefault(row["uid"], []).append((row["projection"] != "Frontal", str(path)))
            width, height = (int(x) for x in rng.integers(sides[0], sides[1] + 1, size=2))
            with Image.open(path) as image:
                big = np.asarray(image.convert("L").resize((width, height), Image.BICUBIC), dtype=np.float32)
            big += rng.normal(0.0, 2.0, big.shape).astype(np.float32)
            Image.fromarray(np.clip(np.rint(big), 0, 255).astype(np.uint8)).save(path, format="PNG")
            mean_sides.append((width + height) / 2)
    return {uid: [path for _, path in sorted(paths)] for uid, paths in views.items()}, float(
        np.mean(mean_sides)
    )
