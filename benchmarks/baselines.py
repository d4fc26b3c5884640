"""The baselines xraycap is measured against, each faithful to what it stands for.

(a) `SeedCaptioner` + `seed_train_step`: the seed notebook's training loop. A frozen ResNet-50 runs on every step
    in fp32, its pooled image vector is added to EVERY token embedding of a stock GPT-2 (no prefix), the labels
    are the input ids themselves, no autocast, the default (for-loop) AdamW.
(b) `model.generate(..., use_cache=False)`: every beam-search step re-runs the whole sequence (no KV cache).
(c) in `sections.data_section`: an epoch that decodes the original full-size PNGs instead of the built dataset.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel


class SeedCaptioner(nn.Module):
    """The seed notebook's model, `GPT-2(wte(ids) + W . pooled_resnet(image))`, built from an xraycap model's
    weights: a copy of its vision tower (frozen) and a stock GPT-2 (`GPT2Config` defaults such as the "gelu_new"
    activation) holding a copy of its decoder's weights. Several views are averaged, so both read the same images.

    Args:
        model (`XrayCapForConditionalGeneration`): the model whose weights are copied.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
        text = model.language_model.config
        self.decoder = GPT2LMHeadModel(GPT2Config(**{key: getattr(text, key) for key in sizes}))
        self.decoder.transformer.load_state_dict(model.language_model.state_dict())
        self.encoder = copy.deepcopy(model.vision_model).requires_grad_(False)
        feature_dim = model.config.vision_config.hidden_sizes[-1]
        self.image_projection = nn.Linear(feature_dim, text.n_embd)

    def train(self, mode: bool = True) -> SeedCaptioner:
        super().train(mode)
        self.encoder.eval()  # frozen BatchNorm statistics
        return self

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask, view_mask):
        batch, views = pixel_values.shape[:2]
        with torch.no_grad():
            pooled = self.encoder(pixel_values=pixel_values.flatten(0, 1)).pooler_output.flatten(1)
        weights = view_mask.to(pooled.dtype).view(batch, views, 1)
        image = (pooled.view(batch, views, -1) * weights).sum(1) / weights.sum(1).clamp(min=1)
        embeds = self.decoder.get_input_embeddings()(input_ids) + self.image_projection(image)[:, None, :]
        # The seed trains on labels = input_ids (padding unmasked): kept, it is what the loop computed.
        return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, labels=input_ids)


def seed_train_step(model: SeedCaptioner, optimizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One step of the seed loop: fp32 forward (encoder included), backward, AdamW. Returns the loss."""
    loss = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["view_mask"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
