"""How studies become batches: row indices kept, processor applied, encoder features optionally cached.

- `IndexedStudies` pairs each study with its row index, so generated reports can be matched to their studies
  after `gather_for_metrics`.
- `StudyCollator` runs the processor (images -> pixel_values / view_mask, reports -> input_ids / labels),
  optionally with mid-grey images (the ablation), or with randomly augmented images (`--augment`, training only;
  see `training.augmentation`); a split that carries cached encoder features (`training.feature_cache`) gives
  them instead, and no image is decoded.
- `study_dataloader` is the DataLoader of a split, with its own seeded generator; `dataloader_workers` is its
  default worker count; `make_dataloaders` builds a run's loaders, every split's once.
- `load_studies` builds (or loads) the train / validation / test studies, synthetic phantoms by default;
  `run_splits` makes a run's splits from them (its cross-validation fold, `--max_eval_samples`).
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
from transformers.utils import logging

from modeling_xraycap import check_view_mask_rows
from processing_xraycap import XrayCapProcessor
from xraycap.dataset_builder import build_dataset, download, synthesize
from xraycap.training.augmentation import XrayAugmentation

from .feature_cache import FEATURE_COLUMNS, FeatureCache, features_from_storage, with_features
from .repeats import cross_validation_fold

logger = logging.get_logger(__name__)


class IndexedStudies(Dataset):
    """A split with each study's row index attached, so predictions can be matched after a gather.

    A batch is read from Arrow in one call (`__getitems__`); cached features come as numpy arrays.

    Args:
        split (`datasets.Dataset` or `list[dict]`): a split built by `dataset_builder` (`uid`, `images`, `report`),
            or one that carries cached features instead of images (`training.feature_cache.with_features`).
    """

    def __init__(self, split: datasets.Dataset):
        if cached := [name for name in FEATURE_COLUMNS if name in getattr(split, "column_names", ())]:
            split = split.with_format("numpy", columns=cached, output_all_columns=True)
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.split[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, dict[str, Any]]]:
        if not isinstance(self.split, datasets.Dataset):  # a list of studies
            return [self[index] for index in indices]
        columns = self.split[list(indices)]
        return [
            (index, {name: values[j] for name, values in columns.items()}) for j, index in enumerate(indices)
        ]


class StudyCollator:
    """Turns `(index, study)` items into model inputs with the processor.

    Studies that carry cached encoder features (`image_features`, `view_mask`: a split from
    `training.feature_cache.with_features`) give them to the model as they are; the others' images go through the
    processor.

    Args:
        processor (`XrayCapProcessor`): images -> pixel_values / view_mask, reports -> input_ids / labels.
        max_views (`int`): views kept per study (the builder orders frontal first).
        max_target_length (`int`): report tokens kept, bos and eos included.
        with_text (`bool`, *optional*, defaults to `True`): tokenize the reports (training).
        ablate (`bool`, *optional*, defaults to `False`): replace every image with constant mid-grey.
        augmentation (`XrayAugmentation`, *optional*): applied to each view before the processor, drawn anew for
            each epoch (see `set_epoch`). Only for the training collator: never with `ablate` (the grey image must
            stay constant) nor with cached features (features computed once cannot follow images that change).
    """

    def __init__(
        self,
        processor: XrayCapProcessor,
        max_views: int,
        max_target_length: int,
        with_text: bool = True,
        ablate: bool = False,
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
        self.augmentation = augmentation
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches belong to: with an augmentation, each epoch draws different images."""
        self.epoch = epoch

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in items]
        text = [example["report"] for _, example in items] if self.with_text else None
        if "image_features" in items[0][1]:
            if self.augmentation is not None or self.ablate:
                raise ValueError(
                    "StudyCollator got cached encoder features with an augmentation or the grey-image ablation: "
                    "features computed once cannot follow changed images. Give this collator a split with images "
                    "(run_captioning turns the cache off under --augment)."
                )
            batch = {}
            if text:
                batch = dict(
                    self.processor(text=text, return_tensors="pt", max_length=self.max_target_length)
                )
            batch["image_features"] = torch.stack(
                [features_from_storage(example["image_features"]) for _, example in items]
            )
            batch["view_mask"] = torch.stack([torch.as_tensor(example["view_mask"]) for _, example in items])
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
        # Checked here, on the CPU, so that the model's training forward never waits for the device to read it.
        if "view_mask" in batch:
            check_view_mask_rows(batch["view_mask"].bool())
        batch["index"] = torch.tensor(indices)
        return batch


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
        pin_memory (`bool`, *optional*, defaults to `False`): pin batches for non-blocking copies to a GPU.

    Workers persist across epochs (no restart at each epoch), except with an augmenting collator: a persistent
    worker keeps the collator it was started with, so `set_epoch` would never reach it and every epoch would
    repeat the first epoch's draws.
    """
    return DataLoader(
        IndexedStudies(split),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0 and collator.augmentation is None,
        generator=torch.Generator().manual_seed(seed),
    )


# Enough workers to keep an accelerator fed with decoded images; more only add memory.
MAX_DEFAULT_WORKERS = 8


def dataloader_workers(requested: int | None, num_processes: int = 1) -> int:
    """`--dataloader_num_workers`, by default what the machine offers each process: its usable CPU cores divided
    by the training processes on this machine (`LOCAL_WORLD_SIZE`, set by `accelerate launch` / torchrun), at most
    `MAX_DEFAULT_WORKERS`.

    Args:
        requested (`int`, *optional*): the workers asked for; None for the default.
        num_processes (`int`, *optional*, defaults to 1): the run's processes, when `LOCAL_WORLD_SIZE` is unset.
    """
    if requested is not None:
        return requested
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(MAX_DEFAULT_WORKERS, cores // max(1, local_processes))


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
            `cache_dir` ([`cache_root`]), `section`, `min_images`, `build_image_size`, `r2gen`, `split_file`,
            `num_proc`.
        views (`str`): `"frontal"`, `"pair"` or `"all"`.
        seed (`int`): the seed of the synthetic studies and of the split.
        accelerator (`Accelerator`): the run's accelerator.
    """
    if data_args.dataset_dir is not None:
        report_path = Path(data_args.dataset_dir) / "build_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return datasets.load_from_disk(data_args.dataset_dir), report
    cache = cache_root(data_args)
    # Each node's first process builds into its node's cache (often node-local), then that node's others read it.
    with accelerator.local_main_process_first():
        if data_args.download:
            data_dir = Path(download(cache / "kaggle"))
        elif data_args.data_dir is not None:
            data_dir = Path(data_args.data_dir)
        else:
            data_dir = cache / f"synthetic-{data_args.synthetic_studies}-seed{seed}"
            # returns at once when the folder holds these studies; re-draws those of an older generator
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
            num_proc=data_args.num_proc,
        )


def cache_root(data_args) -> Path:
    """The run's cache folder: `--cache_dir`, else `$XRAYCAP_CACHE`, else `~/.cache/xraycap`. It holds the
    synthetic phantoms, the built datasets (`datasets/`) and the encoder features (`feature_cache/`)."""
    return Path(data_args.cache_dir or os.environ.get("XRAYCAP_CACHE", Path.home() / ".cache" / "xraycap"))


def run_splits(
    dataset: datasets.DatasetDict, data_args, split_seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """A run's train / validation / test splits: the built ones, or the cross-validation fold's train and
    validation (`--fold`), and validation and test cut to `--max_eval_samples`.

    Args:
        dataset (`datasets.DatasetDict`): the built splits (with or without cached features).
        data_args (`DataArguments`): `folds`, `fold`, `max_eval_samples`.
        split_seed (`int`): the seed the folds are dealt with.
    """
    train_split, val_split, test_split = dataset["train"], dataset["validation"], dataset["test"]
    if data_args.fold is not None:
        train_split, val_split = cross_validation_fold(
            train_split, val_split, data_args.folds, data_args.fold, split_seed
        )
    if data_args.max_eval_samples is not None:
        val_split, test_split = (
            s.select(range(min(len(s), data_args.max_eval_samples))) for s in (val_split, test_split)
        )
    return train_split, val_split, test_split


def make_dataloaders(
    dataset: datasets.DatasetDict,
    processor: XrayCapProcessor,
    model: torch.nn.Module,
    accelerator: Accelerator,
    data_args,
    train_args,
    max_views: int,
    split_seed: int,
) -> tuple[dict[str, DataLoader], dict[str, datasets.Dataset], FeatureCache]:
    """Every DataLoader of a run, each built once: `train` (shuffled, augmented with `--augment`), `validation`,
    `test` and `test_image_ablated` (every image mid-grey). Each has its own seeded generator, so creating an
    iterator never draws from the global RNG.

    With `--cache_features` (and no `--augment`) the train and validation studies carry their encoder features
    (computed once by the frozen tower, kept on disk) instead of their images.

    Args:
        dataset (`datasets.DatasetDict`): the built studies, from [`load_studies`].
        processor (`XrayCapProcessor`): the run's processor.
        model (`XrayCapForConditionalGeneration`): the model (its frozen tower encodes the cached features).
        accelerator (`Accelerator`): the run's accelerator (its processes and device).
        data_args (`DataArguments`): `max_target_length`, `dataloader_num_workers`, the cache folder, the fold.
        train_args (`TrainingArguments`): `augment`, `cache_features`, `seed` and the batch sizes.
        max_views (`int`): views kept per study.
        split_seed (`int`): the seed the folds are dealt with ([`run_splits`]).

    Returns:
        `tuple`: the loaders by name, the run's splits by name (`train`, `validation`, `test`; train and validation
        with their features when cached), and the run's `FeatureCache` (the nearest-train floor reads it too).
    """
    # --augment: the training images only, drawn anew each epoch (keyed on seed, epoch, row, view).
    augmentation = XrayAugmentation(seed=train_args.seed) if train_args.augment else None
    collator = StudyCollator(processor, max_views, data_args.max_target_length, augmentation=augmentation)
    eval_collator = StudyCollator(processor, max_views, data_args.max_target_length, with_text=False)
    ablated_collator = StudyCollator(
        processor, max_views, data_args.max_target_length, with_text=False, ablate=True
    )
    eval_batch = train_args.per_device_eval_batch_size
    workers = dataloader_workers(data_args.dataloader_num_workers, accelerator.num_processes)
    pin = accelerator.device.type == "cuda"  # pinned batches: non-blocking copies to the GPU
    features = FeatureCache(
        cache_root(data_args) / "feature_cache", accelerator, eval_collator, eval_batch, workers
    )
    if train_args.cache_features and train_args.augment:
        logger.warning(
            "--cache_features is off: --augment changes the training images every epoch, so their encoder "
            "features cannot be computed once; the frozen encoder runs on every batch instead."
        )
    elif train_args.cache_features:  # the built splits carry their features (on disk) instead of their images
        for name in ("train", "validation"):
            dataset[name] = with_features(dataset[name], features.features(model, dataset[name], desc=name))
    splits = dict(zip(("train", "validation", "test"), run_splits(dataset, data_args, split_seed)))
    if data_args.fold is not None:
        logger.info(
            f"fold {data_args.fold} of {data_args.folds}: {len(splits['train'])} train, "
            f"{len(splits['validation'])} validation"
        )
    eval_loader = dict(batch_size=eval_batch, num_workers=workers, pin_memory=pin)
    loaders = {
        "train": study_dataloader(
            splits["train"],
            collator,
            train_args.per_device_train_batch_size,
            shuffle=True,
            num_workers=workers,
            seed=train_args.seed,
            pin_memory=pin,
        ),
        "validation": study_dataloader(splits["validation"], eval_collator, **eval_loader),
        "test": study_dataloader(splits["test"], eval_collator, **eval_loader),
        "test_image_ablated": study_dataloader(splits["test"], ablated_collator, **eval_loader),
    }
    return loaders, splits, features
