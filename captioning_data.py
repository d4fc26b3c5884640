"""How studies become batches for run_captioning.py: row indices kept, processor applied, features cached.

- `IndexedStudies` pairs each study with its row index, so generated reports can be matched to their
  studies after `gather_for_metrics`.
- `StudyCollator` runs the processor (images -> pixel_values / view_mask, reports -> input_ids / labels),
  optionally with mid-grey images (the ablation) or with precomputed encoder features.
- `precompute_features` runs a frozen encoder once over a split (`--cache_features`).
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from processing_xraycap import XrayCapProcessor


class IndexedStudies(Dataset):
    """A split with each study's row index attached, so predictions can be matched after a gather."""

    def __init__(self, split: datasets.Dataset):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.split[index]


class StudyCollator:
    """Turns studies into model inputs with the processor.

    Args:
        processor (`XrayCapProcessor`): images -> pixel_values / view_mask, reports -> input_ids / labels.
        max_views (`int`): views kept per study (the builder orders frontal first).
        max_target_length (`int`): report tokens kept, bos and eos included.
        with_text (`bool`, *optional*, defaults to `True`): tokenize the reports (training).
        ablate (`bool`, *optional*, defaults to `False`): replace every image with constant mid-grey.
        feature_cache (`dict[int, tuple[torch.Tensor, torch.Tensor]]`, *optional*): precomputed encoder
            features and view masks by row index;
            when given, images are not decoded at all.
    """

    def __init__(
        self,
        processor: XrayCapProcessor,
        max_views: int,
        max_target_length: int,
        with_text: bool = True,
        ablate: bool = False,
        feature_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.processor = processor
        self.max_views = max_views
        self.max_target_length = max_target_length
        self.with_text = with_text
        self.ablate = ablate
        self.feature_cache = feature_cache

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, torch.Tensor]:
        indices = [index for index, _ in items]
        text = [example["report"] for _, example in items] if self.with_text else None
        if self.feature_cache is not None:
            batch = (
                dict(self.processor(text=text, return_tensors="pt", max_length=self.max_target_length))
                if text
                else {}
            )
            batch["image_features"] = torch.stack([self.feature_cache[i][0] for i in indices])
            batch["view_mask"] = torch.stack([self.feature_cache[i][1] for i in indices])
        else:
            images = [example["images"][: self.max_views] for _, example in items]
            if self.ablate:
                images = [[Image.new("L", view.size, 128) for view in views] for views in images]
            batch = dict(
                self.processor(
                    images=images, text=text, return_tensors="pt", max_length=self.max_target_length
                )
            )
        batch["index"] = torch.tensor(indices)
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "index"}


@torch.no_grad()
def precompute_features(
    model, dataloader: DataLoader, accelerator: Accelerator
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Runs the frozen encoder once over a split; returns `(features, view_mask)` by row index, on CPU.

    All processes get the whole split's features (gathered), whichever shard each one encoded.
    """
    unwrapped = accelerator.unwrap_model(model)
    indices, features, view_masks = [], [], []
    for batch in tqdm(dataloader, desc="encoding images once", disable=not accelerator.is_local_main_process):
        encoded = unwrapped.get_image_features(
            pixel_values=batch["pixel_values"], view_mask=batch["view_mask"]
        )
        gathered = accelerator.gather_for_metrics((batch["index"], encoded, batch["view_mask"]))
        for store, values in zip((indices, features, view_masks), gathered):
            store.extend(values.cpu())
    return {int(i): (f, m) for i, f, m in zip(indices, features, view_masks)}
