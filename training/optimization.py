"""The optimizer and the training loss of run_captioning.py: stock AdamW, logits only where the loss looks."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device | None = None
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over the trainable parameters, with no weight decay on biases and norms.

    The fused implementation (one kernel per step instead of several per tensor) is used where training runs
    on CPU or CUDA.

    Args:
        model (`nn.Module`):
            The model; frozen parameters (`requires_grad=False`) are left out.
        learning_rate (`float`):
            The peak learning rate.
        weight_decay (`float`):
            Decoupled weight decay for the weight matrices.
        device (`torch.device`, *optional*):
            Where training runs (`accelerator.device`); by default where the parameters are now.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name or "ln_" in name else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("The model has no trainable parameters: unfreeze a part of it before training.")
    device = torch.device(device) if device is not None else (decay or no_decay)[0].device
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, fused=device.type in ("cpu", "cuda"))


def training_loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training forward: `model(**inputs).loss`, with logits computed only where the loss looks.

    The loss never covers the image prefix, so the LM head runs on the report positions plus the last prefix
    position (which predicts the first report token): the same loss as the full forward, without
    `prefix_length x vocab_size` logits per study.

    Args:
        model (`XrayCapForConditionalGeneration`):
            The model (or its Accelerate / compiled wrapper).
        inputs (`dict[str, torch.Tensor]`):
            The processor's output with `labels` (`input_ids`, `attention_mask`, `labels`, and
            `pixel_values` or `image_features`, `view_mask`).
    """
    return model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] + 1).loss
