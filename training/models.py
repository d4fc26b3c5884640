"""The config, processor and model a run trains, from run_captioning's arguments.

`build_config` applies the command line's architecture overrides to a preset (and the image size a pretrained vision
tower fixes); `build_processor` takes the text tower's tokenizer or trains a ByteLevel BPE on the train reports, and
the vision tower's image normalisation; `build_model` builds the model from the config, or from pretrained towers
(`--vision_model`, `--text_model`).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.utils import logging

from configuration_xraycap import XrayCapConfig, fixed_input_size
from modeling_xraycap import XrayCapForConditionalGeneration
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer

logger = logging.get_logger(__name__)

# The XrayCapConfig fields the command line can override.
ARCHITECTURE_KEYS = ("visual_tokens", "grid_size", "projection", "max_views", "image_size")


def encoder_is_frozen(model_args) -> bool:
    """`--freeze_vision_encoder`, or by default whether the encoder is pretrained (`--vision_model`)."""
    frozen = model_args.freeze_vision_encoder
    return model_args.vision_model is not None if frozen is None else frozen


def sync_batchnorm(model: XrayCapForConditionalGeneration, accelerator) -> bool:
    """A trained vision tower's BatchNorm layers become `SyncBatchNorm` when several GPUs train: each GPU's batch
    is a fraction of the global one, and its statistics alone are noisier than one GPU's whole batch would give.

    A frozen tower (eval mode, fixed statistics) and CPU runs (SyncBatchNorm needs CUDA) are left as they are.
    timm towers are converted with timm's own function (its BatchNormAct2d carries the activation). Call it before
    `accelerator.prepare`. Returns whether the tower was converted.
    """
    if (
        model.config.freeze_vision_encoder
        or accelerator.num_processes < 2
        or accelerator.device.type != "cuda"
    ):
        return False
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    if any(type(m).__module__.startswith("timm") for m in norms):
        from timm.layers import convert_sync_batchnorm
    else:
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    model.vision_model = convert_sync_batchnorm(model.vision_model)
    logger.info(
        f"{len(norms)} BatchNorm layers of the trained vision tower -> SyncBatchNorm over {accelerator.num_processes} GPUs"
    )
    return True


def build_config(model_args, synthetic_default: bool = False) -> XrayCapConfig:
    """The preset with the command line's overrides; the config is then the single source of truth.

    Args:
        model_args (`ModelArguments`):
            run_captioning's model arguments: `preset`, `freeze_vision_encoder`, `vision_model` and the
            overrides in `ARCHITECTURE_KEYS` (None keeps the preset's; `grid_size` 0 is the native map). Without
            `image_size`, a `vision_model` with fixed position embeddings (ViT, DeiT) gives its own.
        synthetic_default (`bool`, *optional*, defaults to `False`):
            The run trains on the embedded synthetic demo with no view choice: one view (frontal), to fit the
            CPU budget, unless `max_views` is given.
    """
    overrides = {
        key: getattr(model_args, key) for key in ARCHITECTURE_KEYS if getattr(model_args, key) is not None
    }
    if overrides.get("grid_size") == 0:
        overrides["grid_size"] = None  # the encoder's native feature map
    if synthetic_default and model_args.max_views is None:
        overrides["max_views"] = 1
    if model_args.vision_model and model_args.image_size is None:
        fixed = fixed_input_size(AutoConfig.from_pretrained(model_args.vision_model))
        if fixed is not None:
            logger.info(f"image_size {fixed}: the only size {model_args.vision_model} takes")
            overrides["image_size"] = fixed
    return XrayCapConfig.from_preset(
        model_args.preset, freeze_vision_encoder=encoder_is_frozen(model_args), **overrides
    )


def build_processor(model_args, config: XrayCapConfig, train_reports: list[str]) -> XrayCapProcessor:
    """The text tower's tokenizer when pretrained, else a ByteLevel BPE trained on the TRAIN reports only; the image
    mean/std of the vision tower when pretrained (`--vision_model`), else ImageNet's.

    Args:
        model_args (`ModelArguments`): `tokenizer_name`, `text_model`, `tokenizer_vocab_size`, `vision_model`.
        config (`XrayCapConfig`): gives the image size and the views per study.
        train_reports (`list[str]`): the train split's reports (never validation or test).
    """
    vision = model_args.vision_model
    if name := model_args.tokenizer_name or model_args.text_model:
        return XrayCapProcessor.from_tokenizer(
            name, image_size=config.image_size, max_views=config.max_views, vision_model=vision
        )
    logger.info(
        f"Training a ByteLevel BPE tokenizer (vocab {model_args.tokenizer_vocab_size}) on "
        f"{len(train_reports)} train reports"
    )
    tokenizer = train_tokenizer(train_reports, vocab_size=model_args.tokenizer_vocab_size)
    if vision:
        image_processor = XrayCapImageProcessor.from_vision_tower(vision, size=config.image_size)
    else:
        image_processor = XrayCapImageProcessor(size=config.image_size)
    return XrayCapProcessor(image_processor, tokenizer, max_views=config.max_views)


def build_model(
    model_args, config: XrayCapConfig, processor: XrayCapProcessor
) -> XrayCapForConditionalGeneration:
    """The model from the preset, or from pretrained towers where `--vision_model` / `--text_model` are given.

    Args:
        model_args (`ModelArguments`): `preset`, `vision_model`, `text_model`.
        config (`XrayCapConfig`): from [`build_config`].
        processor (`XrayCapProcessor`): its tokenizer gives the vocabulary size and the special token ids.
    """
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs = {key: getattr(config, key) for key in (*ARCHITECTURE_KEYS, "freeze_vision_encoder")}
    kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id)
    if model_args.vision_model or model_args.text_model:
        model = XrayCapForConditionalGeneration.from_pretrained_towers(
            vision=model_args.vision_model or "microsoft/resnet-50",
            text=model_args.text_model or "gpt2",
            **kwargs,
        )
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        return model
    text_config = {**config.text_config.to_dict(), "vocab_size": len(tokenizer)}
    vision_config = config.vision_config.to_dict()
    return XrayCapForConditionalGeneration(
        XrayCapConfig.from_preset(
            model_args.preset, vision_config=vision_config, text_config=text_config, **kwargs
        )
    )
