"""How studies become batches: row indices kept, processor applied, encoder features optionally cached.

- `IndexedStudies` pairs each study with its row index, so generated reports can be matched to their studies
  after `gather_for_metrics`.
- `StudyCollator` runs the processor (images -> pixel_values / view_mask, reports -> input_ids / labels),
  optionally with mid-grey images (the ablation), with precomputed encoder features, or with randomly augmented
  images (`--augment`, training only; see `training.augmentation`).
- `study_dataloader` is the DataLoader of a split, with its own seeded generator.
- `precompute_features` runs the encoder once over a split (`--cache_features`; pooled, the nearest-train floor).
- `load_studies` builds (or loads) the train / validation / test studies, synthetic phantoms by default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers.utils import logging

from dataset_builder import build_dataset, download, synthesize
from processing_xraycap import XrayCapProcessor
from training.augmentation import XrayAugmentation

logger = logging.get_logger(__name__)


class IndexedStudies(Dataset):
    """A split with each study's row index attached, so predictions can be matched after a gather.

    Args:
        split (`datasets.Dataset`): a split built by `dataset_builder` (`uid`, `images`, `report`).
    """

    def __init__(self, split: datasets.Dataset):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.split[index]


class StudyCollator:
    """Turns `(index, study)` items into model inputs with the processor.

    Args:
        processor (`XrayCapProcessor`): images -> pixel_values / view_mask, reports -> input_ids / labels.
        max_views (`int`): views kept per study (the builder orders frontal first).
        max_target_length (`int`): report tokens kept, bos and eos included.
        with_text (`bool`, *optional*, defaults to `True`): tokenize the reports (training).
        ablate (`bool`, *optional*, defaults to `False`): replace every image with constant mid-grey.
        feature_cache (`dict[int, tuple[torch.Tensor, torch.Tensor]]`, *optional*): precomputed encoder
            features and view masks by row index; when given, images are not decoded at all.
        augmentation (`XrayAugmentation`, *optional*): applied to each view before the processor, drawn anew for
            each epoch (see `set_epoch`). Only for the training collator: never with `ablate` (the grey image must
            stay constant) nor with `feature_cache` (features computed once cannot follow images that change).
    """

    def __init__(
        self,
        processor: XrayCapProcessor,
        max_views: int,
        max_target_length: int,
        with_text: bool = True,
        ablate: bool = False,
        feature_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        augmentation: XrayAugmentation | None = None,
    ):
        if augmentation is not None and ablate:
            raise ValueError(
                "StudyCollator(ablate=True, augmentation=...): the ablation's constant grey image must not be "
                "augmented; pass augmentation=None (only the training collator augments)."
            )
        self.processor = processor
        self.max_views = max_views
        self.max_target_length = max_target_length
        self.with_text = with_text
        self.ablate = ablate
        self.feature_cache = feature_cache
        self.augmentation = augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches belong to: with an augmentation, each epoch draws different images."""
        self.epoch = epoch

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        if self.feature_cache is not None and self.augmentation is not None:
            raise ValueError(
                "StudyCollator has both a feature_cache and an augmentation: cached encoder features cannot follow "
                "images augmented anew every epoch. Drop one of them (run_captioning turns the cache off under "
                "--augment)."
            )
        indices = [index for index, _ in items]
        text = [example["report"] for _, example in items] if self.with_text else None
        if self.feature_cache is not None:
            batch = {}
            if text:
                batch = dict(
                    self.processor(text=text, return_tensors="pt", max_length=self.max_target_length)
                )
            batch["image_features"] = torch.stack([self.feature_cache[i][0] for i in indices])
            batch["view_mask"] = torch.stack([self.feature_cache[i][1] for i in indices])
        else:
            images = [example["images"][: self.max_views] for _, example in items]
            if self.ablate:
                images = [[Image.new("L", view.size, 128) for view in views] for views in images]
            elif self.augmentation is not None:
                images = [
                    [
                        self.augmentation(view, self.augmentation.generator(self.epoch, row, v))
                        for v, view in enumerate(views)
                    ]
                    for row, views in zip(indices, images)
                ]
            batch = dict(
                self.processor(
                    images=images, text=text, return_tensors="pt", max_length=self.max_target_length
                )
            )
        batch["index"] = torch.tensor(indices)
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch without its row indices: the keyword arguments of the model's `forward` / `generate`."""
    return {k: v for k, v in batch.items() if k != "index"}


def study_dataloader(
    split: datasets.Dataset,
    collator: StudyCollator,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """The DataLoader of a split's `(index, study)` items.

    It has its own generator: creating an iterator never draws from the global RNG, so dropout after a resume
    (RNG states restored, iterator re-created) matches the uninterrupted run bit for bit.

    Args:
        split (`datasets.Dataset`): the studies.
        collator (`StudyCollator`): turns items into model inputs.
        batch_size (`int`): studies per batch (per process).
        shuffle (`bool`, *optional*, defaults to `False`): shuffle each epoch (training).
        num_workers (`int`, *optional*, defaults to 0): DataLoader worker processes.
        seed (`int`, *optional*, defaults to 0): seed of the loader's generator (the shuffling order).
        pin_memory (`bool`, *optional*, defaults to `False`): pin batches for faster copies to a GPU.
    """
    return DataLoader(
        IndexedStudies(split),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def pool_views(features: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
    """One vector per study: encoder features `(batch, views, tokens, channels)` averaged over the tokens and
    over the study's present views (`view_mask`, `(batch, views)`). Returns `(batch, channels)` in fp32."""
    weights = view_mask.to(torch.float32)[:, :, None]
    per_view = features.float().mean(dim=2)
    return (per_view * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


@torch.no_grad()
def precompute_features(
    model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator, pooled: bool = False
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Runs the encoder once over a split, in eval mode; returns `(features, view_mask)` by row index, on CPU.

    All processes get the whole split's features (gathered), whichever shard each one encoded.

    Args:
        model (`XrayCapForConditionalGeneration`): the prepared model (its `get_image_features` is used).
        dataloader (`DataLoader`): the prepared loader of the split, with images and without text.
        accelerator (`Accelerator`): the run's accelerator.
        pooled (`bool`, *optional*, defaults to `False`): keep one `(channels,)` vector per study ([`pool_views`])
            instead of its `(views, tokens, channels)` features: what retrieval needs, in a fraction of the memory.
    """
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    was_training = unwrapped.training
    unwrapped.eval()
    indices, features, view_masks = [], [], []
    for batch in tqdm(dataloader, desc="encoding images", disable=not accelerator.is_local_main_process):
        encoded = unwrapped.get_image_features(
            pixel_values=batch["pixel_values"], view_mask=batch["view_mask"]
        )
        if pooled:
            encoded = pool_views(encoded, batch["view_mask"])
        gathered = accelerator.gather_for_metrics((batch["index"], encoded, batch["view_mask"]))
        for store, values in zip((indices, features, view_masks), gathered):
            store.extend(values.cpu())
    unwrapped.train(was_training)
    return {int(i): (f, m) for i, f, m in zip(indices, features, view_masks)}


def load_studies(
    data_args, views: str, seed: int, accelerator: Accelerator
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """The train / validation / test studies and the build report.

    Without `data_dir`, `dataset_dir` or `download` this is the embedded default: synthetic phantom studies,
    generated once (cached by size and seed) and built with `dataset_builder` like real data. The main process
    builds first; the others then read its cache.

    Args:
        data_args (`DataArguments`):
            run_captioning's data arguments: `data_dir`, `dataset_dir`, `download`, `synthetic_studies`,
            `cache_dir` (default `$XRAYCAP_CACHE` or `~/.cache/xraycap`), `section`, `min_images`,
            `build_image_size`, `r2gen`, `split_file`.
        views (`str`): `"frontal"`, `"pair"` or `"all"`.
        seed (`int`): the seed of the synthetic studies and of the split.
        accelerator (`Accelerator`): the run's accelerator.
    """
    if data_args.dataset_dir is not None:
        report_path = Path(data_args.dataset_dir) / "build_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return datasets.load_from_disk(data_args.dataset_dir), report
    cache = Path(data_args.cache_dir or os.environ.get("XRAYCAP_CACHE", Path.home() / ".cache" / "xraycap"))
    # Each node's first process builds into its node's cache (often node-local), then that node's others read it.
    with accelerator.local_main_process_first():
        if data_args.download:
            data_dir = Path(download(cache / "kaggle"))
        elif data_args.data_dir is not None:
            data_dir = Path(data_args.data_dir)
        else:
            data_dir = cache / f"synthetic-{data_args.synthetic_studies}-seed{seed}"
            if not (data_dir / "indiana_projections.csv").is_file():
                logger.info(f"Synthesizing {data_args.synthetic_studies} phantom studies into {data_dir}")
                synthesize(data_dir, num_studies=data_args.synthetic_studies, seed=seed)
        return build_dataset(
            data_dir,
            section=data_args.section,
            views=views,
            min_images=data_args.min_images,
            image_size=data_args.build_image_size,
            seed=seed,
            r2gen=data_args.r2gen,
            split_file=data_args.split_file,
            cache_dir=str(cache / "datasets"),
        )
