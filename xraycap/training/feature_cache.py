"""The encoder's features of a split, computed once and kept on disk as an Arrow dataset.

`--cache_features` trains on them instead of running a frozen encoder every step, and the nearest-train floor
compares their pooled vectors. An entry lives in `<cache_dir>/feature_cache/<fingerprint>/` (`--cache_dir`,
default `$XRAYCAP_CACHE` or `~/.cache/xraycap`, beside the built datasets) and holds one row per study of the
split, in the split's order:

- `image_features` `(views, tokens, channels)`: `get_image_features`' output in the precision the encoder ran in:
  float32, float16, or bfloat16 stored as its int16 bit pattern (Arrow has no bfloat16; [`features_from_storage`]
  reads all three back);
- `view_mask` `(views,)`: the study's present views;
- `pooled` `(channels,)`, float32: the features averaged over tokens and present views ([`pool_views`]).

A `pooled_only` entry holds `pooled` alone. The fingerprint hashes the vision tower's weights and configuration,
the image options (size, crop, mean / std, resampling, views, pooled / grid tokens, grid size), the precision, and the
split (its `datasets` fingerprint and length), so a resumed run, another seed or another fold finds the entry,
and another tower or image size makes a new one.

Each process encodes a contiguous block of rows (`split_between_processes`) into its own shard; the main process
then writes `cache_info.json`, which marks the entry complete; every process memory-maps the shards. No process
holds more than a batch of features in memory. The cache folder must be visible to every process (on several
machines, a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets.arrow_writer import ArrowWriter
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Bump when the layout of an entry changes: older entries are then recomputed, never misread.
CACHE_FORMAT = 1
INFO_FILE = "cache_info.json"
FEATURE_COLUMNS = ("image_features", "view_mask", "pooled")
_STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "int16"}


def pool_views(features: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
    """One vector per study: encoder features `(batch, views, tokens, channels)` averaged over the tokens and
    over the study's present views (`view_mask`, `(batch, views)`). Returns `(batch, channels)` in fp32."""
    weights = view_mask.to(torch.float32)[:, :, None]
    per_view = features.float().mean(dim=2)
    return (per_view * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def features_to_storage(features: torch.Tensor) -> np.ndarray:
    """Encoder features as the array an entry stores: float32 / float16 as they are, bfloat16 as its int16 bits."""
    features = features.detach().cpu()
    if features.dtype == torch.bfloat16:
        return features.view(torch.int16).numpy()
    if features.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"Cannot cache {features.dtype} features: use float32, float16 or bfloat16.")
    return features.numpy()


def features_from_storage(array: np.ndarray) -> torch.Tensor:
    """The stored array back as the encoder's features: integers are bfloat16 bit patterns (`datasets`' numpy
    format may widen them to int64, which leaves the bits' values intact)."""
    if np.issubdtype(array.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def tower_fingerprint(vision_model: torch.nn.Module) -> str:
    """A hash of the vision tower's weights and buffers (names, shapes, dtypes and values), memory layout aside."""
    digest = hashlib.sha256()
    for name, tensor in vision_model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_fingerprint(
    model: torch.nn.Module, processor, split: datasets.Dataset, precision: str, pooled_only: bool = False
) -> tuple[str, dict[str, Any]]:
    """The name of a split's entry, and what it hashes.

    Args:
        model (`XrayCapForConditionalGeneration`): the (unwrapped) model whose tower encodes.
        processor (`XrayCapProcessor`): its image processor's settings and `max_views` make the pixels.
        split (`datasets.Dataset`): the studies encoded.
        precision (`str`): the autocast the encoder runs under (`"no"`, `"bf16"`, `"fp16"`).
        pooled_only (`bool`, *optional*, defaults to `False`): the entry keeps the pooled vectors alone.
    """
    config = model.config
    vision = {
        k: v
        for k, v in config.vision_config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version")
    }
    image = processor.image_processor
    inputs = {
        "format": CACHE_FORMAT,
        "tower_weights": tower_fingerprint(model.vision_model),
        "vision_config": vision,
        "visual_tokens": config.visual_tokens,
        "grid_size": config.grid_size,
        "max_views": processor.max_views,
        "image": {
            "size": image.size,  # transformers' SizeDict: its text names every field
            "crop_size": image.crop_size,
            "mean": image.image_mean,
            "std": image.image_std,
            "resample": image.resample,
        },
        "precision": precision,
        "pooled_only": pooled_only,
        "split": {"fingerprint": split._fingerprint, "num_rows": len(split)},
    }
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], inputs


class _Rows(torch.utils.data.Dataset):
    """`(row, study)` items of some rows of a split, for a `StudyCollator`."""

    def __init__(self, split: datasets.Dataset, rows: range):
        self.split, self.rows = split, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return self.rows[index], self.split[self.rows[index]]


class FeatureCache:
    """The entries of one cache folder, written and read by every process of a run.

    Args:
        root (`str` or `Path`): the folder holding the entries (`<cache_dir>/feature_cache`).
        accelerator (`Accelerator`): the run's accelerator (device, processes, autocast).
        collator (`StudyCollator`): turns `(row, study)` items into `pixel_values` / `view_mask` (no text).
        batch_size (`int`): studies per encoder batch.
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers decoding the images.
    """

    def __init__(
        self, root: str | Path, accelerator: Accelerator, collator, batch_size: int, num_workers: int = 0
    ):
        self.root = Path(root)
        self.accelerator = accelerator
        self.collator = collator
        self.batch_size = batch_size
        self.num_workers = num_workers

    def features(
        self,
        model: torch.nn.Module,
        split: datasets.Dataset,
        pooled_only: bool = False,
        autocast: bool = True,
        desc: str = "split",
    ) -> datasets.Dataset:
        """The split's features, memory-mapped, one row per study in the split's order; encoded first if the
        entry is missing.

        Args:
            model (`XrayCapForConditionalGeneration`): the model (prepared or not; moved to the device).
            split (`datasets.Dataset`): the studies, with their `images`.
            pooled_only (`bool`, *optional*, defaults to `False`): keep only the pooled vectors.
            autocast (`bool`, *optional*, defaults to `True`): encode under the run's autocast (training's
                precision) rather than in fp32.
            desc (`str`, *optional*): the split's name, for the log and the progress bar.
        """
        accelerator = self.accelerator
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        precision = accelerator.mixed_precision if autocast else "no"
        key, inputs = feature_fingerprint(unwrapped, self.collator.processor, split, precision, pooled_only)
        key = broadcast_object_list([key])[0]  # one entry for all processes, whatever they computed
        entry = self.root / key
        say = logger.info if accelerator.is_local_main_process else logger.debug  # once per machine
        if (entry / INFO_FILE).is_file():
            say(f"Feature cache: reusing {entry} ({len(split)} studies of {desc})")
        else:
            say(f"Feature cache: encoding {len(split)} studies of {desc} into {entry}")
            self._encode(unwrapped, split, entry, pooled_only, autocast, desc)
            if accelerator.is_main_process:
                shards = sorted(path.name for path in entry.glob("shard-*.arrow"))
                info = {"num_rows": len(split), "shards": shards, "inputs": inputs}
                tmp = entry / f"{INFO_FILE}.tmp"
                tmp.write_text(json.dumps(info, indent=1, default=str))
                os.replace(tmp, entry / INFO_FILE)  # the entry is complete from here on
            accelerator.wait_for_everyone()
        return load_entry(entry, len(split))

    @torch.no_grad()
    def _encode(
        self,
        model: torch.nn.Module,
        split: datasets.Dataset,
        entry: Path,
        pooled_only: bool,
        autocast: bool,
        desc: str,
    ) -> None:
        """Each process encodes its block of rows into `entry/shard-<rank>-of-<n>.arrow`."""
        accelerator = self.accelerator
        if accelerator.is_main_process and entry.exists():
            shutil.rmtree(entry)  # an unfinished entry (a run stopped while encoding)
        accelerator.wait_for_everyone()
        entry.mkdir(parents=True, exist_ok=True)
        rows = process_rows(len(split), accelerator)
        model.to(accelerator.device)
        was_training = model.training
        model.eval()
        loader = DataLoader(  # its own generator: encoding draws nothing from the global RNG (dropout stays as it was)
            _Rows(split, rows),
            batch_size=self.batch_size,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            generator=torch.Generator(),
        )
        shard = entry / f"shard-{accelerator.process_index:05d}-of-{accelerator.num_processes:05d}.arrow"
        writer = None
        # One iterator, handed to tqdm: given the loader itself, tqdm.auto would open a second one, whose idle
        # workers would each hold a copy of this process and prefetched batches until encoding ends.
        batches = tqdm(
            iter(loader),
            total=len(loader),
            desc=f"encoding {desc}",
            disable=not accelerator.is_local_main_process,
        )
        for batch in batches:
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            view_mask = batch["view_mask"].to(accelerator.device, non_blocking=True)
            with (
                accelerator.autocast() if autocast else torch.autocast(accelerator.device.type, enabled=False)
            ):
                encoded = model.get_image_features(pixel_values=pixel_values, view_mask=view_mask)
            columns = {"pooled": pool_views(encoded, view_mask).cpu().numpy()}
            if not pooled_only:
                columns["image_features"] = features_to_storage(encoded)
                columns["view_mask"] = view_mask.cpu().numpy()
            if writer is None:
                writer = ArrowWriter(features=_schema(columns), path=str(shard.with_suffix(".tmp")))
            writer.write_batch({name: list(values) for name, values in columns.items()})
        model.train(was_training)
        if writer is not None:
            writer.finalize()
            writer.close()
            os.replace(shard.with_suffix(".tmp"), shard)
        accelerator.wait_for_everyone()


def process_rows(num_rows: int, accelerator: Accelerator) -> range:
    """This process's contiguous block of `num_rows` rows (`split_between_processes`; the blocks follow the process
    order, so the shards concatenate back into the split's order)."""
    with accelerator.split_between_processes(torch.arange(num_rows)) as block:
        return range(int(block[0]), int(block[-1]) + 1) if len(block) else range(0)


def _schema(columns: dict[str, np.ndarray]) -> datasets.Features:
    """The `datasets` features of an entry, from one batch's arrays."""
    features = {"pooled": datasets.Sequence(datasets.Value("float32"), length=columns["pooled"].shape[1])}
    if "image_features" in columns:
        array = columns["image_features"]
        features["image_features"] = datasets.Array3D(shape=array.shape[1:], dtype=str(array.dtype))
        features["view_mask"] = datasets.Sequence(
            datasets.Value("bool"), length=columns["view_mask"].shape[1]
        )
    return datasets.Features(features)


def load_entry(entry: Path, num_rows: int) -> datasets.Dataset:
    """A complete entry's shards, memory-mapped and concatenated in row order."""
    info = json.loads((entry / INFO_FILE).read_text())
    if info["num_rows"] != num_rows:
        raise ValueError(
            f"The feature cache entry {entry} holds {info['num_rows']} rows, not the split's {num_rows}: delete the "
            "folder and run again."
        )
    shards = [datasets.Dataset.from_file(str(entry / name)) for name in info["shards"]]
    return datasets.concatenate_datasets(shards)


def with_features(split: datasets.Dataset, features: datasets.Dataset) -> datasets.Dataset:
    """The split with its features as columns and without its images: its studies are then never decoded.

    Args:
        split (`datasets.Dataset`): a split as built (no `select` applied: rows must line up with `features`).
        features (`datasets.Dataset`): its entry ([`FeatureCache.features`]).
    """
    kept = split.remove_columns([name for name in ("images", *FEATURE_COLUMNS) if name in split.column_names])
    return datasets.concatenate_datasets([kept, features], axis=1)
