"""The baselines the benchmark measures xraycap against, each faithful to what it stands for.

(a) `SeedStyleCaptioner` + `seed_train_step`: the seed notebook's training loop. A frozen ResNet-50 runs on
    every step in fp32, its pooled image vector is added to EVERY token embedding of GPT-2 (no prefix),
    labels are the input ids themselves, no autocast, the default (for-loop) AdamW, and GPT-2 with its stock
    settings (`seed_language_model`).
(b) `generate_without_cache`: the same `generate` call re-running the whole sequence (image prefix + bos +
    the tokens so far) at every step, without the KV cache.
(c) `FullSizePngStudies`: an epoch that decodes the original full-size PNGs of every study, instead of the
    images the dataset builder stored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel


class SeedStyleCaptioner(nn.Module):
    """
    The seed notebook's model: `GPT-2(wte(ids) + W . pooled_resnet(image))`.

    Args:
        vision_model (`nn.Module`): a transformers `ResNetModel` (its `pooler_output` is the image vector).
        language_model (`GPT2LMHeadModel`): the decoder.
        feature_dim (`int`): width of the pooled image vector (2048 for ResNet-50).

    The encoder is frozen and runs under `no_grad` at every step. With several views per study the pooled
    vectors of the views are averaged, so the baseline reads exactly the images xraycap reads.
    """

    def __init__(self, vision_model: nn.Module, language_model: nn.Module, feature_dim: int):
        super().__init__()
        self.encoder = vision_model
        self.decoder = language_model
        self.image_projection = nn.Linear(feature_dim, language_model.config.n_embd)
        self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> SeedStyleCaptioner:
        super().train(mode)
        self.encoder.eval()  # frozen BatchNorm statistics
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        view_mask: torch.Tensor | None = None,
    ):
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(1)
        batch, views = pixel_values.shape[:2]
        with torch.no_grad():
            pooled = self.encoder(pixel_values=pixel_values.flatten(0, 1)).pooler_output.flatten(1)
        pooled = pooled.view(batch, views, -1)
        if view_mask is None:
            image = pooled.mean(dim=1)
        else:
            weights = view_mask.to(pooled.dtype)[..., None]
            image = (pooled * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        embeds = self.decoder.get_input_embeddings()(input_ids) + self.image_projection(image)[:, None, :]
        # The seed trains on labels = input_ids (padding unmasked): kept, it is what the loop computed.
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, labels=input_ids)


def seed_language_model(language_model: nn.Module) -> GPT2LMHeadModel:
    """The seed notebook's decoder: GPT-2 with its stock settings (`GPT2Config` defaults, such as the
    unfused "gelu_new" activation), the sizes and a copy of the weights of `language_model`."""
    sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    config = GPT2Config(**{key: getattr(language_model.config, key) for key in sizes})
    decoder = GPT2LMHeadModel(config)
    decoder.load_state_dict(language_model.state_dict())
    return decoder


def seed_train_step(
    model: SeedStyleCaptioner, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> float:
    """One step of the seed loop: fp32 forward (encoder included), backward, AdamW. Returns the loss."""
    loss = model(
        pixel_values=batch["pixel_values"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        view_mask=batch.get("view_mask"),
    ).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_seed_optimizer(model: SeedStyleCaptioner, learning_rate: float = 1e-4) -> torch.optim.AdamW:
    """The notebook's `torch.optim.AdamW(model.parameters())` over what trains (encoder frozen), defaults."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)


@torch.no_grad()
def generate_without_cache(model, **generate_kwargs: Any) -> torch.LongTensor:
    """Baseline (b): `model.generate(**generate_kwargs)` with every step re-reading the whole sequence
    (image prefix + bos + the tokens so far). XrayCap honours `use_cache=False` itself (transformers alone
    would switch the cache back on for an `inputs_embeds` prompt)."""
    return model.generate(**generate_kwargs, use_cache=False)


class FullSizePngStudies(Dataset):
    """
    Baseline (c): studies whose views are the ORIGINAL full-size PNG files, decoded at every access.

    Args:
        studies (`list[tuple[list[str], str]]`): per study, the paths of its views (frontal first) and its
            report.

    Items are `(index, {"images": [path, ...], "report": str})`, the shape `run_captioning.StudyCollator`
    takes, so the collator (and so the processor) is the same as on xraycap's data path: only where the
    images come from differs.
    """

    def __init__(self, studies: list[tuple[list[str], str]]):
        self.studies = studies

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        paths, report = self.studies[index]
        return index, {"images": list(paths), "report": report}
