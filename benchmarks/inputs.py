"""Inputs the benchmarks run on: random real-size batches, realistic full-size PNG studies, and the
placeholder Kaggle layouts used to time the dataset build at several sizes."""

from __future__ import annotations

import csv
import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset_builder import synthesize


def random_training_batch(
    batch_size: int,
    text_tokens: int,
    views: int,
    image_size: int,
    vocab_size: int,
    bos_token_id: int,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """
    A batch shaped like `XrayCapProcessor` output: `pixel_values` (B, V, 3, S, S) with every view present,
    `input_ids` = bos + `text_tokens - 1` report tokens (no padding, so every position costs), `labels`
    (-100 on the bos) and `attention_mask`.
    """
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, views, 3, image_size, image_size, generator=gen)
    high = max(vocab_size - 2, 3)  # keep clear of the special ids appended at the end of the vocabulary
    input_ids = torch.randint(2, high, (batch_size, text_tokens), generator=gen)
    input_ids[:, 0] = bos_token_id
    labels = input_ids.clone()
    labels[:, 0] = -100
    return {
        "pixel_values": pixel_values,
        "view_mask": torch.ones(batch_size, views, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, text_tokens, dtype=torch.long),
        "labels": labels,
    }


def _enlarge(args: tuple[str, int, int, int, float]) -> int:
    """Rewrites one phantom PNG at (width, height) with sensor-like noise; returns the new file size."""
    path, width, height, seed, noise = args
    with Image.open(path) as im:
        small = im.convert("L")
    rng = np.random.default_rng(seed)
    big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)
    big += rng.normal(0.0, noise, big.shape).astype(np.float32)
    Image.fromarray(np.clip(np.rint(big), 0, 255).astype(np.uint8)).save(path, format="PNG")
    return Path(path).stat().st_size


def make_full_size_studies(
    output_dir: str | Path,
    num_studies: int,
    min_side: int = 2048,
    max_side: int = 2900,
    noise: float = 2.0,
    seed: int = 0,
    num_proc: int = 2,
) -> dict[str, float]:
    """
    Writes `num_studies` phantom studies in the Kaggle layout (via `dataset_builder.synthesize`) and enlarges
    every PNG to a random `min_side`..`max_side` px per side, 8-bit grayscale with Gaussian noise. With the
    default noise (sigma 2 grey levels) and PNG's default compression a 2048 x 2496 image takes about 2.3 MB
    and decodes in about 0.12 s, like the real Indiana files (2.0-2.3 MB, 0.11-0.15 s).

    Returns:
        `dict` with the number of images, their mean side and mean file size (MB).
    """
    out = synthesize(output_dir, num_studies=num_studies, seed=seed, image_size=256, num_proc=1)
    rng = np.random.default_rng(seed)
    paths = sorted((out / "images" / "images_normalized").glob("*.png"))
    jobs = []
    for i, path in enumerate(paths):
        width, height = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        jobs.append((str(path), width, height, seed * 100_003 + i, noise))
    if num_proc > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=num_proc) as pool:
            sizes = list(pool.map(_enlarge, jobs))
    else:
        sizes = [_enlarge(job) for job in jobs]
    return {
        "num_images": len(jobs),
        "mean_side_px": float(np.mean([(w + h) / 2 for _, w, h, _, _ in jobs])),
        "mean_file_mb": float(np.mean(sizes) / 1e6),
    }


def read_studies(data_dir: str | Path) -> dict[str, tuple[list[str], str]]:
    """uid -> (paths of the study's PNGs, frontal first; findings text) from a Kaggle-layout folder."""
    root = Path(data_dir)
    with open(root / "indiana_reports.csv", newline="", encoding="utf-8") as fh:
        findings = {row["uid"]: row["findings"] for row in csv.DictReader(fh)}
    views: dict[str, list[tuple[int, str]]] = {}
    with open(root / "indiana_projections.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            order = 0 if row["projection"] == "Frontal" else 1
            path = str(root / "images" / "images_normalized" / row["filename"])
            views.setdefault(row["uid"], []).append((order, path))
    return {uid: ([p for _, p in sorted(v)], findings.get(uid, "")) for uid, v in views.items()}


def make_placeholder_layout(root: str | Path, num_images: int, image_px: int = 64, seed: int = 0) -> int:
    """
    A Kaggle layout with `num_images // 2` studies of two small PNGs each (frontal + lateral) and a findings
    sentence: the structure the builder walks, at a chosen size, without the cost of real images.

    Returns:
        `int`: the number of images written.
    """
    root = Path(root)
    images = root / "images" / "images_normalized"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    variants = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (image_px, image_px), dtype=np.uint8)).save(buf, format="PNG")
        variants.append(buf.getvalue())
    reports = [["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"]]
    projections = [["uid", "filename", "projection"]]
    written = 0
    for uid in range(1, num_images // 2 + 1):
        reports.append(
            [uid, "normal", "normal", "Xray Chest PA and Lateral", "XXXX pain", "None.",
             f"Heart size is normal. The lungs are clear, study {uid}.", "No acute disease."]
        )  # fmt: skip
        for k, view in enumerate(("Frontal", "Lateral")):
            name = f"{uid}_IM-{uid:05d}-{k + 1}001.dcm.png"
            projections.append([uid, name, view])
            (images / name).write_bytes(variants[(uid + k) % len(variants)])
            written += 1
    for name, rows in (("indiana_reports.csv", reports), ("indiana_projections.csv", projections)):
        with open(root / name, "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh, lineterminator="\n").writerows(rows)
    return written
