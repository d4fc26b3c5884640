"""XrayCap configuration: a vision tower (a transformers CNN or ViT, or any timm model), a projection and a GPT-2
decoder.

The config is the single source of truth: the model builds every submodule from it, and `from_preset`
gives the two sizes the project uses ("tiny" for tests and the CPU demo, "resnet50-gpt2" for real runs).
"""

import copy
from typing import Any, ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The vision towers XrayCap reads, by `model_type`: transformers CNNs and ViT-style towers, and "timm_wrapper"
# (`TimmWrapperConfig`), any timm CNN or ViT.
VISION_MODEL_TYPES = (
    "resnet",
    "convnext",
    "convnextv2",
    "vit",
    "deit",
    "dinov2",
    "dinov2_with_registers",
    "swin",
)
VISION_MODEL_TYPES += ("timm_wrapper",)

# The two presets. Each entry is (vision_config kwargs, text_config kwargs, top-level kwargs).
_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # Real sizes: ResNet-50 (microsoft/resnet-50 layout, ~23.5M parameters) and GPT-2 small (124M).
    # GPT-2 has no pad token: one is appended after the 50,257 BPE tokens (id 50257).
    # The 7x7 feature map is pooled to a 4x4 grid: 2 views x 16 tokens + a 60-token report = 92 decoder
    # positions instead of 158, about 1.6x fewer FLOPs per training step (`grid_size=None` keeps 7x7).
    # "gelu_pytorch_tanh" is GPT-2's own "gelu_new" formula as one fused kernel.
    "resnet50-gpt2": (
        {
            "model_type": "resnet",
            "embedding_size": 64,
            "hidden_sizes": [256, 512, 1024, 2048],
            "depths": [3, 4, 6, 3],
            "layer_type": "bottleneck",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
        },
        {
            "model_type": "gpt2",
            "vocab_size": 50258,
            "n_positions": 1024,
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "activation_function": "gelu_pytorch_tanh",
        },
        {
            "visual_tokens": "grid",
            "grid_size": 4,
            "projection": "linear",
            "image_size": 224,
            "max_views": 2,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "pad_token_id": 50257,
        },
    ),
    # A few-MB model: ResNet widths 32-256 with one basic block per stage, a 3-layer GPT-2 192 wide,
    # 128-px images -> a 4x4 grid = 16 tokens per view. Token ids match `train_tokenizer`
    # (<|endoftext|> = 0, <|pad|> = 1). 256 positions = 2 views x 16 tokens + bos + ~220 report tokens.
    "tiny": (
        {
            "model_type": "resnet",
            "embedding_size": 32,
            "hidden_sizes": [32, 64, 128, 256],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
        },
        {
            "model_type": "gpt2",
            "vocab_size": 2000,
            "n_positions": 256,
            "n_embd": 192,
            "n_layer": 3,
            "n_head": 4,
            "n_inner": 768,
            "activation_function": "gelu_pytorch_tanh",
        },
        {
            "visual_tokens": "grid",
            "projection": "linear",
            "image_size": 128,
            "max_views": 2,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
        },
    ),
}


@strict
class XrayCapConfig(PreTrainedConfig):
    r"""
    Configuration of [`XrayCapForConditionalGeneration`]: an image encoder whose features are projected into
    GPT-2's embedding space and prepended to the report tokens as a prefix.

    Whether the vision tower trains is a training choice, not part of the config (`run_captioning.py
    --freeze_vision_encoder`); an older `config.json` that has a `freeze_vision_encoder` field still loads, and
    the field is ignored.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the image encoder, built with `AutoModel.from_config`: a transformers ResNet, ConvNeXt
            (V2), ViT, DeiT, DINOv2 or Swin config (default: ResNet-50), or a `TimmWrapperConfig` (any timm CNN
            or ViT); see `VISION_MODEL_TYPES`.
        text_config (`dict` or `GPT2Config`, *optional*):
            Config of the GPT-2 decoder (default: GPT-2 small); any GPT-2-family size (distilgpt2, gpt2-medium,
            ...).
        visual_tokens (`str`, *optional*, defaults to `"grid"`):
            `"pooled"`: one token per view: the class token of towers that have one (ViT, DeiT, DINOv2), else
            the tower's pooled output (the mean of its feature map or patch tokens). `"grid"`: one token per
            cell of the last feature map, or per patch (class and distillation tokens dropped), so the decoder
            attends over image regions (7x7 = 49 per view at 224 px for ResNet-50, 14x14 for ViT-B/16).
        grid_size (`int`, *optional*, defaults to 4):
            With `visual_tokens="grid"`, the feature map, or the square grid of patch tokens, is average-pooled
            to `grid_size x grid_size` tokens per view (4x4 = 16 for ResNet-50 at 224 px, whose native map is
            7x7). Fewer prefix positions make every decoder step cheaper. `None` keeps the native map. A map
            already that small is left as it is.
        projection (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (one `nn.Linear` from the encoder width to `n_embd`) or `"mlp"` (Linear-GELU-Linear).
        max_views (`int`, *optional*, defaults to 2):
            Views per study (1: frontal only; 2: frontal + lateral). Each view adds its tokens plus a learned
            view embedding.
        image_size (`int`, *optional*, defaults to 224):
            Side in pixels of the square images the processor feeds. Towers with fixed position embeddings
            (ViT, DeiT, timm ViTs) take only their own size (see [`fixed_input_size`]).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of the projection and view embeddings.
        pad_token_id (`int`, *optional*), bos_token_id (`int`, *optional*), eos_token_id (`int`, *optional*):
            Special token ids; they are copied into `text_config`. The pad id must differ from eos.

    Example:

    ```python
    >>> from configuration_xraycap import XrayCapConfig
    >>> config = XrayCapConfig.from_preset("tiny", vocab_size=500)
    >>> config.text_config.n_layer, config.image_size
    (3, 128)
    ```
    """

    model_type = "xraycap"
    PRESETS: ClassVar[tuple[str, ...]] = ("tiny", "resnet50-gpt2")
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    visual_tokens: Literal["pooled", "grid"] = "grid"
    grid_size: int | None = 4
    projection: Literal["linear", "mlp"] = "linear"
    max_views: int = 2
    image_size: int = 224
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # Folders saved before freezing became a training choice have this field.
        if "freeze_vision_encoder" in kwargs:
            logger.warning(
                "config.json has freeze_vision_encoder=%s: ignored (whether the vision tower trains is chosen in "
                "training, run_captioning.py --freeze_vision_encoder).",
                kwargs.pop("freeze_vision_encoder"),
            )
        if self.vision_config is None:
            self.vision_config = copy.deepcopy(_PRESETS["resnet50-gpt2"][0])
        if self.text_config is None:  # GPT-2 small with its pad row, and the matching special ids
            self.text_config = copy.deepcopy(_PRESETS["resnet50-gpt2"][1])
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                if getattr(self, name) is None:
                    setattr(self, name, _PRESETS["resnet50-gpt2"][2][name])
        super().__post_init__(**kwargs)
        # The decoder's special ids follow the top-level ones (one source of truth).
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, getattr(self.text_config, name, None))
            else:
                setattr(self.text_config, name, value)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", True))

    def validate_towers(self):
        """Part of `@strict`-powered validation: a vision tower XrayCap reads and a GPT-2 decoder."""
        check_tower_types(self.vision_config.model_type, self.text_config.model_type)

    def validate_image_prefix(self):
        """Part of `@strict`-powered validation: the views, grid and image size give a usable image prefix."""
        if self.grid_size is not None and (isinstance(self.grid_size, bool) or self.grid_size < 1):
            raise ValueError(
                f"grid_size={self.grid_size!r}: use a positive number of cells per side, or None for the "
                "encoder's native feature map."
            )
        if self.max_views not in (1, 2):
            raise ValueError(f"max_views={self.max_views!r}: use 1 (frontal) or 2 (frontal + lateral).")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size!r} px is too small: use at least 32 px.")

    def validate_pad_token(self):
        """Part of `@strict`-powered validation: a pad id equal to eos works, but a distinct one is recommended."""
        if self.pad_token_id is not None and self.pad_token_id == self.eos_token_id:
            logger.warning_once(
                f"pad_token_id == eos_token_id ({self.pad_token_id}): labels mask padding by position, but a "
                "distinct pad token is recommended."
            )

    @property
    def vocab_size(self) -> int:
        """The decoder's vocabulary size (stored in `text_config`)."""
        return self.text_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self.text_config.vocab_size = value

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "XrayCapConfig":
        """
        Build one of the named configurations in `XrayCapConfig.PRESETS`.

        Args:
            name (`str`):
                `"tiny"` (a few-MB model for tests and the CPU demo) or `"resnet50-gpt2"` (ResNet-50 +
                GPT-2 small, 224 px).
            **overrides:
                Top-level fields (`visual_tokens`, `projection`, `max_views`, `image_size`, token ids, ...);
                `vocab_size`, `n_positions`, `n_embd`, `n_layer`, `n_head` for the decoder; and
                `vision_config` / `text_config` dicts merged into the preset's sub-configs.

        Returns:
            `XrayCapConfig`
        """
        if name not in _PRESETS:
            raise ValueError(f"Unknown preset {name!r}: choose one of {cls.PRESETS}.")
        vision, text, top = (copy.deepcopy(part) for part in _PRESETS[name])
        text_keys = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"}
        for key, value in overrides.items():
            if key == "vision_config":
                vision = value.to_dict() if isinstance(value, PreTrainedConfig) else {**vision, **value}
            elif key == "text_config":
                text = value.to_dict() if isinstance(value, PreTrainedConfig) else {**text, **value}
            elif key in text_keys:
                text[key] = value
            else:
                top[key] = value
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if top.get(key) is not None:
                text[key] = top[key]
        return cls(vision_config=vision, text_config=text, **top)


def _side(value: int | list | tuple) -> int:
    """A square size given as `n` or `(n, n)`."""
    return int(value if isinstance(value, int) else value[0])


def check_tower_types(vision_type: str, text_type: str) -> None:
    """
    Refuse a vision tower XrayCap cannot read, or a decoder that is not GPT-2.

    Args:
        vision_type (`str`): the vision config's `model_type`; one of `VISION_MODEL_TYPES`.
        text_type (`str`): the text config's `model_type`; must be `"gpt2"` (gpt2, distilgpt2, gpt2-medium, ...).

    Raises:
        `ValueError` naming the model type and the fix.
    """
    if vision_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"Vision tower model_type {vision_type!r} is not supported: use one of {VISION_MODEL_TYPES} "
            "(a transformers checkpoint of those, or any timm model, e.g. 'timm/vit_base_patch16_224.augreg_in21k')."
        )
    if text_type != "gpt2":
        raise ValueError(
            f"Text tower model_type {text_type!r} is not GPT-2: XrayCap's decoder is a GPT2LMHeadModel; use a "
            "GPT-2-family checkpoint or config (gpt2, distilgpt2, gpt2-medium, gpt2-large, ...)."
        )


def fixed_input_size(vision_config: PreTrainedConfig) -> int | None:
    """
    The only image size a vision tower's config allows: ViT and DeiT position embeddings (`image_size`), or a
    timm checkpoint's `pretrained_cfg` with `fixed_input_size`. `None` where any size works (CNNs, Swin, DINOv2,
    which interpolates). A built timm tower is checked by the model itself (its strict patch embedding).

    Args:
        vision_config (`PreTrainedConfig`): the vision tower's config.

    Returns:
        `int` or `None`: the side in pixels.
    """
    if vision_config.model_type in ("vit", "deit"):
        return _side(vision_config.image_size)
    pretrained_cfg = getattr(vision_config, "pretrained_cfg", None) or {}
    if pretrained_cfg.get("fixed_input_size") and pretrained_cfg.get("input_size"):
        return int(pretrained_cfg["input_size"][-1])
    return None


XrayCapConfig.register_for_auto_class()  # AutoConfig: saved folders carry this file

__all__ = ["XrayCapConfig", "check_tower_types", "fixed_input_size"]
