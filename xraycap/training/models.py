"""The config, processor and model a run trains, from run_captioning's arguments.

`build_config` applies the command line's architecture overrides to a preset (and the image size a pretrained vision
tower fixes); `build_processor` takes the text tower's tokenizer or trains a ByteLevel BPE on the train reports, and
the vision tower's image normalisation; `build_model` builds the model from the config, or from pretrained towers
(`--vision_model`, `--text_model`, through `model_from_pretrained_towers`), and freezes its vision tower when the run
keeps it fixed (`freeze_vision_tower`): freezing is a training choice, not part of the model or its config.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GPT2LMHeadModel
from transformers.utils import logging

from configuration_xraycap import XrayCapConfig, check_tower_types, fixed_input_size
from modeling_xraycap import XrayCapForConditionalGeneration, tower_input_size
from processing_xraycap import XrayCapImageProcessor, XrayCapProcessor, train_tokenizer

logger = logging.get_logger(__name__)

# The XrayCapConfig fields the command line can override.
ARCHITECTURE_KEYS = ("visual_tokens", "grid_size", "projection", "max_views", "image_size")


def encoder_is_frozen(model_args) -> bool:
    """`--freeze_vision_encoder`, or by default whether the encoder is pretrained (`--vision_model`)."""
    frozen = model_args.freeze_vision_encoder
    return model_args.vision_model is not None if frozen is None else frozen


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen tower: it stays in eval mode (as LAVIS's BLIP-2 keeps its frozen vision encoder)."""
    return module


def freeze_vision_tower(model: XrayCapForConditionalGeneration, frozen: bool = True) -> None:
    """
    Freeze (default) or unfreeze the vision tower: a frozen tower gets no gradient and stays in eval mode (BatchNorm
    statistics fixed) even under `model.train()`. The model then runs the tower without grad (its features can be
    cached: `--cache_features`).

    Args:
        model (`XrayCapForConditionalGeneration`): the model, before `accelerator.prepare`.
        frozen (`bool`, *optional*, defaults to `True`): whether to freeze the tower.
    """
    tower = model.vision_model
    tower.requires_grad_(not frozen)
    if frozen:
        tower.eval()
        tower.train = types.MethodType(_stay_in_eval, tower)
    else:
        tower.__dict__.pop("train", None)
        tower.train(model.training)


def vision_tower_is_frozen(model: XrayCapForConditionalGeneration) -> bool:
    """Whether no parameter of the vision tower requires grad (the tower the model runs without grad)."""
    return not any(p.requires_grad for p in model.vision_model.parameters())


def sync_batchnorm(model: XrayCapForConditionalGeneration, accelerator) -> bool:
    """A trained vision tower's BatchNorm layers become `SyncBatchNorm` when several GPUs train: each GPU's batch
    is a fraction of the global one, and its statistics alone are noisier than one GPU's whole batch would give.

    A frozen tower (eval mode, fixed statistics) and CPU runs (SyncBatchNorm needs CUDA) are left as they are.
    timm towers are converted with timm's own function (its BatchNormAct2d carries the activation). Call it before
    `accelerator.prepare`. Returns whether the tower was converted.
    """
    if vision_tower_is_frozen(model) or accelerator.num_processes < 2 or accelerator.device.type != "cuda":
        return False
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return False
    if any(type(m).__module__.startswith("timm") for m in norms):
        from timm.layers import convert_sync_batchnorm
    else:
        convert_sync_batchnorm = torch.nn.SyncBatchNorm.convert_sync_batchnorm
    model.model.vision_model = convert_sync_batchnorm(model.vision_model)
    logger.info(
        f"{len(norms)} BatchNorm layers of the trained vision tower -> SyncBatchNorm over {accelerator.num_processes} GPUs"
    )
    return True


def build_config(model_args, synthetic_default: bool = False) -> XrayCapConfig:
    """The preset with the command line's overrides; the config is then the single source of truth.

    Args:
        model_args (`ModelArguments`):
            run_captioning's model arguments: `preset`, `vision_model` and the
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
    return XrayCapConfig.from_preset(model_args.preset, **overrides)


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
    """The model from the preset, or from pretrained towers where `--vision_model` / `--text_model` are given; its
    vision tower frozen where the run keeps it fixed ([`encoder_is_frozen`]).

    Args:
        model_args (`ModelArguments`): `preset`, `vision_model`, `text_model`, `freeze_vision_encoder`.
        config (`XrayCapConfig`): from [`build_config`].
        processor (`XrayCapProcessor`): its tokenizer gives the vocabulary size and the special token ids.
    """
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    kwargs = {key: getattr(config, key) for key in ARCHITECTURE_KEYS}
    kwargs.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id)
    if model_args.vision_model or model_args.text_model:
        model = model_from_pretrained_towers(
            vision=model_args.vision_model or "microsoft/resnet-50",
            text=model_args.text_model or "gpt2",
            **kwargs,
        )
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        text_config = {**config.text_config.to_dict(), "vocab_size": len(tokenizer)}
        vision_config = config.vision_config.to_dict()
        model = XrayCapForConditionalGeneration(
            XrayCapConfig.from_preset(
                model_args.preset, vision_config=vision_config, text_config=text_config, **kwargs
            )
        )
    freeze_vision_tower(model, encoder_is_frozen(model_args))
    return model


def model_from_pretrained_towers(
    vision: str = "microsoft/resnet-50", text: str = "gpt2", **config_kwargs
) -> XrayCapForConditionalGeneration:
    r"""
    Build a model from a pretrained image encoder and a pretrained GPT-2 (Hub ids or local folders).

    The projection and view embeddings start random. `image_size` defaults to the only size a tower with fixed
    position embeddings takes (ViT, DeiT), else to 224. GPT-2 has no pad token, so unless `pad_token_id` is
    given one row is appended to its vocabulary (id = the original vocabulary size); pair the model with
    `XrayCapProcessor.from_tokenizer(text, vision_model=vision)`, which adds the matching `<|pad|>` token.

    Args:
        vision (`str`, *optional*, defaults to `"microsoft/resnet-50"`):
            A transformers ResNet, ConvNeXt, ViT, DeiT, DINOv2 or Swin checkpoint
            (`"google/vit-base-patch16-224-in21k"`), or a timm one (`"timm/resnet50.a1_in1k"`).
        text (`str`, *optional*, defaults to `"gpt2"`):
            A GPT-2-family checkpoint (`"gpt2"`, `"distilgpt2"`, `"gpt2-medium"`, ...).
        **config_kwargs:
            Other `XrayCapConfig` fields (`visual_tokens`, `projection`, `max_views`, `image_size`, ...).

    Returns:
        `XrayCapForConditionalGeneration`, every parameter trainable (see [`freeze_vision_tower`]).
    """
    vision_config, text_config = AutoConfig.from_pretrained(vision), AutoConfig.from_pretrained(text)
    check_tower_types(vision_config.model_type, text_config.model_type)  # before loading any weights
    vision_tower = AutoModel.from_pretrained(vision, config=vision_config)
    text_tower = GPT2LMHeadModel.from_pretrained(text, config=text_config)
    fixed = tower_input_size(vision_tower, vision_config)
    if config_kwargs.get("image_size") is None and fixed is not None:
        config_kwargs["image_size"] = fixed
    text_config = text_tower.config.to_dict()
    if text_config.get("activation_function") == "gelu_new":  # the same formula, one fused kernel
        text_config["activation_function"] = "gelu_pytorch_tanh"
    if config_kwargs.get("pad_token_id") is None:
        config_kwargs["pad_token_id"] = text_tower.config.vocab_size
    for key in ("bos_token_id", "eos_token_id"):
        if config_kwargs.get(key) is None:
            config_kwargs[key] = text_config.get(key)
    ids = [config_kwargs[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    text_config["vocab_size"] = max([text_tower.config.vocab_size, *(i + 1 for i in ids if i is not None)])
    vision_config = vision_tower.config.to_dict()
    for key in ("id2label", "label2id", "architectures"):  # ImageNet head metadata: not used here
        vision_config.pop(key, None)
    config = XrayCapConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)
    model = XrayCapForConditionalGeneration(config)
    model.vision_model.load_state_dict(vision_tower.state_dict())
    if text_tower.config.vocab_size != config.text_config.vocab_size:
        text_tower.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=True)
    model.language_model.load_state_dict(text_tower.transformer.state_dict())
    model.tie_weights()
    return model
