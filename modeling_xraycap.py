"""XrayCap: image encoder -> projection -> prefix tokens -> GPT-2 decoder, as a transformers model.

Each view of a study is encoded by the vision tower (a transformers CNN or ViT, or a timm model); its
features (a pooled vector or class token, or the cells of the last feature map / patch grid) are projected into
GPT-2's embedding space, get a learned view embedding, and are put in front of the report tokens. The decoder
is a plain `GPT2LMHeadModel`, so the text path is exactly GPT-2. `generate` hands the image to the model at
prefill only, as GIT and LLaVA do: afterwards the KV cache holds the prefix, and without a cache every step
re-reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationMixin, GPT2LMHeadModel, PreTrainedModel
from transformers.cache_utils import Cache, StaticCache
from transformers.utils import ModelOutput, logging

try:  # inside a package / a saved model folder (transformers' remote-code loader copies `.x` siblings)
    from .configuration_xraycap import XrayCapConfig, check_tower_types, fixed_input_size
except ImportError:  # the repository root on sys.path (`import modeling_xraycap`)
    from configuration_xraycap import XrayCapConfig, check_tower_types, fixed_input_size

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256  # the default report length, where `n_positions` leaves room for it
# Inputs that carry the image: `generate` hands them to the model at prefill only.
IMAGE_INPUTS = ("pixel_values", "image_features", "view_mask")


def check_view_mask_rows(view_mask: torch.Tensor) -> None:
    """Refuses a `(batch, views)` mask with a study without any view (a read of the mask: once a batch)."""
    if not bool((present := view_mask.any(dim=1)).all()):
        raise ValueError(f"view_mask: no view present in rows {(~present).nonzero().flatten().tolist()}.")


@dataclass
class XrayCapCausalLMOutput(ModelOutput):
    r"""
    Output of [`XrayCapForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Mean next-token cross-entropy over the report tokens (the image prefix and -100 labels are ignored).
        logits (`torch.FloatTensor` of shape `(batch_size, prefix_length + text_length, vocab_size)`):
            Decoder scores for every position, image prefix included (the last `logits_to_keep` positions
            when that is given).
        cache (`Cache`, *optional*), hidden_states (`tuple`, *optional*), attentions (`tuple`, *optional*):
            As returned by GPT-2 (the KV cache when `use_cache=True`; the others when requested).
        prefix_length (`int`, *optional*):
            Number of image-prefix positions at the front of `logits` (0 when no image was given).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    prefix_length: int | None = None


class XrayCapProjection(nn.Module):
    """
    Maps encoder features (..., C) into GPT-2's embedding space (..., n_embd): LayerNorm(C), then Linear
    (`"linear"`) or Linear-GELU-Linear (`"mlp"`). The LayerNorm makes the prefix scale independent of the
    encoder's raw activations (ResNet features after ReLU are large and all positive).
    """

    def __init__(self, in_features: int, config: XrayCapConfig):
        super().__init__()
        out_features = config.text_config.n_embd
        self.norm = nn.LayerNorm(in_features)
        if config.projection == "mlp":
            self.proj = nn.Sequential(
                nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features)
            )
        else:
            self.proj = nn.Linear(in_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(features))


class XrayCapPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the settings transformers needs for XrayCap models."""

    config_class = XrayCapConfig
    config: XrayCapConfig
    base_model_prefix = "xraycap"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["GPT2Block", "ResNetStage"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XrayCapForConditionalGeneration):
            nn.init.normal_(module.view_embedding, mean=0.0, std=self.config.initializer_range)


class XrayCapForConditionalGeneration(XrayCapPreTrainedModel, GenerationMixin):
    r"""
    Radiology report generator: vision tower -> projection (+ view embedding) -> image prefix -> GPT-2.

    Args:
        config ([`XrayCapConfig`]):
            The whole configuration; the towers are built from `config.vision_config` and
            `config.text_config` with random weights. Use [`from_pretrained_towers`] to start from
            pretrained ResNet / GPT-2 weights, or `from_pretrained` to load a saved XrayCap folder.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("outputs/xraycap-demo", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("outputs/xraycap-demo", trust_remote_code=True)
    >>> inputs = processor(images=[["frontal.png", "lateral.png"]], return_tensors="pt")
    >>> ids = model.generate(**inputs, num_beams=3, max_new_tokens=120)
    >>> processor.batch_decode(ids, skip_special_tokens=True)
    ```
    """

    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.transformer.wte.weight"}

    def __init__(self, config: XrayCapConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        timm_model = getattr(self.vision_model, "timm_model", None)  # timm towers are read once built
        self.vision_feature_dim = config.vision_feature_dim(timm_model)
        self._grid_side, self._prefix_tokens = config.vision_grid(timm_model)
        self._channels_last = getattr(timm_model, "output_fmt", None) == "NHWC"  # timm Swin: (N, h, w, C)
        fixed = fixed_input_size(config.vision_config, timm_model)
        if fixed is not None and fixed != config.image_size:
            raise ValueError(
                f"image_size={config.image_size}, but the vision tower ({type(self.vision_model).__name__}) takes "
                f"only {fixed}-px images (its position embeddings are fixed): use image_size={fixed}."
            )
        self.projection = XrayCapProjection(self.vision_feature_dim, config)
        self.view_embedding = nn.Parameter(torch.zeros(config.max_views, config.text_config.n_embd))
        self.language_model = GPT2LMHeadModel(config.text_config)
        self.post_init()
        self.set_vision_encoder_frozen(config.freeze_vision_encoder)
        room = config.text_config.n_positions - self.max_prefix_length - 1
        if room < 1:
            raise ValueError(
                f"text_config.n_positions={config.text_config.n_positions} leaves no room for text after an "
                f"image prefix of {self.max_prefix_length} tokens: raise n_positions or lower image_size/max_views."
            )
        self.generation_config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        self.generation_config.max_length = None

    # ----------------------------------------------------------------------------------------- towers
    @classmethod
    def from_pretrained_towers(
        cls, vision: str = "microsoft/resnet-50", text: str = "gpt2", **config_kwargs
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
            `XrayCapForConditionalGeneration`
        """
        vision_config, text_config = AutoConfig.from_pretrained(vision), AutoConfig.from_pretrained(text)
        check_tower_types(vision_config.model_type, text_config.model_type)  # before loading any weights
        vision_tower = AutoModel.from_pretrained(vision, config=vision_config)
        text_tower = GPT2LMHeadModel.from_pretrained(text, config=text_config)
        fixed = fixed_input_size(vision_config, getattr(vision_tower, "timm_model", None))
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
        text_config["vocab_size"] = max(
            [text_tower.config.vocab_size, *(i + 1 for i in ids if i is not None)]
        )
        vision_config = vision_tower.config.to_dict()
        for key in ("id2label", "label2id", "architectures"):  # ImageNet head metadata: not used here
            vision_config.pop(key, None)
        config = XrayCapConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)
        model = cls(config)
        model.vision_model.load_state_dict(vision_tower.state_dict())
        if text_tower.config.vocab_size != config.text_config.vocab_size:
            text_tower.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=True)
        model.language_model.load_state_dict(text_tower.state_dict())
        model.language_model.tie_weights()
        return model

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then `config.freeze_vision_encoder` (loaded parameters require grad)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_vision_encoder_frozen(model.config.freeze_vision_encoder)
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def set_vision_encoder_frozen(self, frozen: bool = True) -> None:
        """
        Freeze (default) or unfreeze the vision tower: a frozen tower gets no gradient and stays in eval mode
        (BatchNorm statistics fixed) even under `model.train()`. Updates `config.freeze_vision_encoder`.

        Args:
            frozen (`bool`, *optional*, defaults to `True`): whether to freeze the encoder.
        """
        self.config.freeze_vision_encoder = bool(frozen)
        self.vision_model.requires_grad_(not frozen)
        self.vision_model.train(self.training and not frozen)

    def train(self, mode: bool = True) -> XrayCapForConditionalGeneration:
        super().train(mode)
        if self.config.freeze_vision_encoder:
            self.vision_model.eval()
        return self

    # ----------------------------------------------------------------------------------------- images
    @property
    def tokens_per_view(self) -> int:
        """Image tokens per view at `config.image_size` (1 for "pooled"; the map / patch-grid cells for "grid",
        at most `grid_size` per side), known without a forward."""
        if self.config.visual_tokens == "pooled":
            return 1
        side = min(self._grid_side, self.config.grid_size or self._grid_side)
        return side * side

    @property
    def max_prefix_length(self) -> int:
        """Image-prefix length with every view present."""
        return self.config.max_views * self.tokens_per_view

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(
                f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}: use XrayCapProcessor "
                "with return_tensors='pt'."
            )
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(1)
        if pixel_values.ndim != 5 or pixel_values.shape[2] != 3:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, 3, height, width) or "
                "(batch, views, 3, height, width) with 3 colour channels (the processor converts grayscale)."
            )
        if pixel_values.shape[1] > self.config.max_views:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} views but this model takes at most "
                f"max_views={self.config.max_views}: drop extra views or use a config with max_views=2."
            )
        if min(pixel_values.shape[-2:]) < 32:
            raise ValueError(f"pixel_values images are {tuple(pixel_values.shape[-2:])} px: below 32 px.")
        return pixel_values

    def _check_view_mask(self, view_mask: torch.Tensor | None, data: torch.Tensor) -> torch.Tensor:
        """Validate `view_mask` against `data` (B, V, ...); without one, all-zero views (the padding that
        XrayCapProcessor and get_image_features produce) are absent and every other view is present."""
        batch, views, device = data.shape[0], data.shape[1], data.device
        if view_mask is None:
            view_mask = data.detach().flatten(2).ne(0).any(dim=-1)
            return view_mask | ~view_mask.any(dim=1, keepdim=True)  # an all-zero study keeps its views
        view_mask = torch.as_tensor(view_mask, device=device).bool()
        if view_mask.ndim == 1 and views == 1:
            view_mask = view_mask.unsqueeze(1)
        if tuple(view_mask.shape) != (batch, views):
            raise ValueError(f"view_mask has shape {tuple(view_mask.shape)}; expected {(batch, views)}.")
        if not self.training:  # a read that waits for the GPU; in training the collator checks
            check_view_mask_rows(view_mask)
        return view_mask

    def get_image_features(
        self, pixel_values: torch.Tensor, view_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""
        Encode each view with the vision tower, before projection.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)` or `(batch, views, 3, H, W)`):
                Normalised images from `XrayCapProcessor`.
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*):
                1 for a real view, 0 for padding. Absent views are not encoded (zeros are returned), so they
                never touch the encoder's BatchNorm statistics. Default: all-zero views (the processor's
                padding) are absent, all others present.

        Returns:
            `torch.FloatTensor` of shape `(batch, views, tokens, channels)`: tokens = 1 ("pooled") or the cells
            of the last feature map / patch grid ("grid", pooled to `config.grid_size` per side). Computed without
            grad while the encoder is frozen, so it can be cached and fed back as `image_features`.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        batch, views = pixel_values.shape[:2]
        view_mask = self._check_view_mask(view_mask, pixel_values)
        flat = pixel_values.flatten(0, 1)[view_mask.flatten()]
        if not torch.is_autocast_enabled(flat.device.type):
            flat = flat.to(self.vision_model.dtype)
        frozen = self.config.freeze_vision_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            outputs = self.vision_model(pixel_values=flat)
            tokens = self._tokens_from_encoder_output(outputs)
        features = tokens.new_zeros(batch * views, *tokens.shape[1:])
        features[view_mask.flatten()] = tokens
        return features.view(batch, views, *tokens.shape[1:])

    def _tokens_from_encoder_output(self, outputs) -> torch.Tensor:
        """The tower's output -> `(N, tokens, C)`: the class token or pooled feature ("pooled"), or the feature
        map / square patch grid average-pooled to `grid_size` ("grid")."""
        hidden, prefix = outputs.last_hidden_state, self._prefix_tokens
        if self._channels_last:  # timm Swin's (N, h, w, C) maps -> (N, C, h, w)
            hidden = hidden.permute(0, 3, 1, 2)
        if self.config.visual_tokens == "pooled":
            pooled = hidden[:, 0] if prefix else getattr(outputs, "pooler_output", None)
            if pooled is None:
                pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
            return pooled.reshape(pooled.shape[0], 1, -1)
        if hidden.ndim == 3:  # tokens (N, prefix + h * w, C): drop class / distillation tokens, make the map
            patches = hidden[:, prefix:]
            side = math.isqrt(patches.shape[1])
            if side * side != patches.shape[1]:
                raise ValueError(f"{patches.shape[1]} patch tokens are not a square grid: use square images.")
            hidden = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        side = self.config.grid_size
        if side is not None and max(hidden.shape[-2:]) > side:
            hidden = nn.functional.adaptive_avg_pool2d(hidden, (side, side))
        return hidden.flatten(2).transpose(1, 2).contiguous()

    def get_prefix_embeds(
        self, image_features: torch.Tensor, view_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Project image features into the decoder's embedding space and add the view embeddings.

        Args:
            image_features (`torch.FloatTensor` of shape `(batch, views, tokens, channels)`):
                Output of [`get_image_features`].
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*): 1 = real view.

        Returns:
            `tuple(torch.FloatTensor, torch.LongTensor)`: the prefix `(batch, views * tokens, n_embd)` and its
            attention mask `(batch, views * tokens)` (0 on absent views).
        """
        if image_features.ndim == 3:
            image_features = image_features.unsqueeze(1)
        if image_features.ndim != 4 or image_features.shape[-1] != self.vision_feature_dim:
            raise ValueError(
                f"image_features has shape {tuple(image_features.shape)}; expected (batch, views, tokens, "
                f"{self.vision_feature_dim}) as returned by get_image_features."
            )
        batch, views, tokens = image_features.shape[:3]
        if views > self.config.max_views:
            raise ValueError(
                f"image_features has {views} views but this model takes at most max_views={self.config.max_views}."
            )
        view_mask = self._check_view_mask(view_mask, image_features)
        prefix = self.projection(image_features.to(self.projection.norm.weight.dtype))
        prefix = prefix + self.view_embedding[:views].to(prefix.dtype)[None, :, None, :]
        return prefix.reshape(batch, views * tokens, -1), view_mask.long().repeat_interleave(tokens, dim=1)

    # ----------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        view_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> XrayCapCausalLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, text_length)`, *optional*):
                Report tokens: `bos + report + eos`, right-padded (see `XrayCapProcessor`).
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)` or `(batch, views, 3, H, W)`, *optional*):
                Images; their prefix goes in front of the text. Without images (and without
                `image_features`) the model is exactly GPT-2 on the text.
            attention_mask (`torch.Tensor` of shape `(batch, text_length)`, *optional*):
                1 on text tokens, 0 on padding; the image prefix's mask is put in front of it. A mask that
                already spans prefix + text (as `generate` passes it) is used as it is.
            labels (`torch.LongTensor` of shape `(batch, text_length)`, *optional*):
                Targets aligned with `input_ids`, -100 where no loss is wanted (padding, the leading bos).
                The loss never covers the image prefix.
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*):
                1 = real view, 0 = absent (its tokens are masked out of attention). Default: views whose
                pixels / features are all zero (the processor's and `get_image_features`' padding) are absent.
            image_features (`torch.FloatTensor` of shape `(batch, views, tokens, channels)`, *optional*):
                Precomputed `get_image_features` output used instead of `pixel_values`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                As in `GPT2LMHeadModel`; with `labels` the loss covers the kept positions, so in training
                `k = text_length + 1` gives the same loss without the LM head on the image prefix.
            inputs_embeds, position_ids, cache, use_cache:
                As in `GPT2LMHeadModel`. Position ids count attended positions, so absent views shift nothing.
                `use_cache` defaults to False for a training forward (train mode, with `labels`).

        Returns:
            [`XrayCapCausalLMOutput`] with `loss` (when `labels` is given) and `logits` over prefix + text.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both.")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, view_mask)

        prefix_length = 0
        if image_features is not None:
            prefix_embeds, prefix_mask = self.get_prefix_embeds(image_features, view_mask)
            batch, prefix_length = prefix_embeds.shape[:2]
            if inputs_embeds.shape[0] != batch:
                raise ValueError(
                    f"{batch} studies of images but {inputs_embeds.shape[0]} texts: pass one report per study."
                )
            if attention_mask is None:
                attention_mask = prefix_mask.new_ones(inputs_embeds.shape[:2])
            # A mask over the text gets the prefix's in front; one over prefix + text (from `generate`) is kept.
            if attention_mask.ndim == 2 and attention_mask.shape[1] == inputs_embeds.shape[1]:
                attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
            elif (
                attention_mask.ndim != 2 or attention_mask.shape[1] != prefix_length + inputs_embeds.shape[1]
            ):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}: give a 2D mask with one entry per "
                    f"text token ({inputs_embeds.shape[1]}) or per image-prefix + text position ({prefix_length} "
                    f"+ {inputs_embeds.shape[1]})."
                )
            inputs_embeds = torch.cat([prefix_embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            if labels is not None:
                labels = torch.cat([labels.new_full((batch, prefix_length), -100), labels], dim=1)

        past = cache.get_seq_length() if cache is not None else 0
        if isinstance(past, torch.Tensor):  # a static cache's count is on the device: its size bounds it
            past = max(cache.get_max_length() - inputs_embeds.shape[1], 0)
        total = past + inputs_embeds.shape[1]
        n_positions = self.config.text_config.n_positions
        if total > n_positions:
            raise ValueError(
                f"Sequence of {total} positions ({prefix_length} image-prefix + {total - prefix_length} text) "
                f"exceeds the decoder's n_positions={n_positions}: shorten the report "
                "(XrayCapProcessor(max_length=...) truncates) or lower max_new_tokens."
            )
        if labels is not None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            labels = labels[:, -logits_to_keep:]  # the loss covers the kept logits only
        if use_cache is None and labels is not None and self.training:
            use_cache = False
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return XrayCapCausalLMOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            prefix_length=prefix_length,
        )

    # ----------------------------------------------------------------------------------------- generate
    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, is_first_iteration: bool = False, **kwargs
    ):
        # The image goes to the model at prefill; afterwards the KV cache holds its prefix. Without a cache
        # every step re-reads the whole sequence, image prefix included.
        image_inputs = {name: kwargs.pop(name, None) for name in IMAGE_INPUTS}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, is_first_iteration=is_first_iteration, **kwargs
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            # `forward` puts the prefix in front and derives positions and the mask from the 2D prefix + text mask
            model_inputs.update(image_inputs, attention_mask=kwargs.get("attention_mask"))
            model_inputs.pop("position_ids", None)
        return model_inputs

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        view_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        **generate_kwargs,
    ):
        r"""
        Write reports for a batch of studies.

        The images are encoded once; the prompt is `bos` after the image prefix, and transformers' `generate`
        decodes from it (with the KV cache unless `use_cache=False`). Every `generate` option passes through
        (`num_beams`, `do_sample`, `top_p`, `num_return_sequences`, `no_repeat_ngram_size`, `max_new_tokens`,
        `return_dict_in_generate`, ...).

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, 3, H, W)` or `(batch, views, 3, H, W)`):
                Images from `XrayCapProcessor`.
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*): 1 = real view.
            image_features (`torch.FloatTensor`, *optional*): precomputed `get_image_features` output.
            **generate_kwargs: passed to `GenerationMixin.generate`. `input_ids`/`attention_mask` from the
                processor (the reference text) are ignored, so a processor batch can be passed whole.
                `max_new_tokens` is capped (with a warning) to the positions left after the prefix.

        Returns:
            `torch.LongTensor` of shape `(batch * num_return_sequences, new_tokens)`: the new tokens only
            (no prefix, no bos), padded with `pad_token_id` after eos; or a `GenerateOutput` whose `sequences`
            are those tokens, with `return_dict_in_generate=True`.
        """
        if pixel_values is None and image_features is None:  # text only: a plain GPT-2 continuation
            return super().generate(**generate_kwargs)
        for key in ("input_ids", "attention_mask", "labels"):
            generate_kwargs.pop(key, None)
        if image_features is None:
            image_features = self.get_image_features(pixel_values, view_mask)
        view_mask = self._check_view_mask(view_mask, image_features)
        batch, views, tokens = image_features.shape[:3]
        bos_id = self.config.bos_token_id
        if bos_id is None:
            raise ValueError("config.bos_token_id is None: set it to the tokenizer's bos id.")
        bos = torch.full((batch, 1), bos_id, dtype=torch.long, device=image_features.device)
        prefix_mask = view_mask.long().repeat_interleave(tokens, dim=1)
        attention_mask = torch.cat([prefix_mask, torch.ones_like(bos)], dim=1)

        room = self.config.text_config.n_positions - attention_mask.shape[1]
        generation_config = generate_kwargs.get("generation_config") or self.generation_config
        if generate_kwargs.get("max_length") is not None and "max_new_tokens" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = generate_kwargs.pop("max_length") - 1  # the prompt is bos
        max_new = generate_kwargs.get("max_new_tokens", generation_config.max_new_tokens) or room
        if max_new > room:
            logger.warning(
                f"max_new_tokens={max_new} exceeds the {room} positions left after the "
                f"{attention_mask.shape[1]}-token image prefix + bos; capping it."
            )
        generate_kwargs["max_new_tokens"] = min(max_new, room)
        if generate_kwargs.get("cache_implementation") == "static":  # sized for the prefix too, which
            del generate_kwargs["cache_implementation"]  # transformers would not count in the prompt
            max_cache_len = attention_mask.shape[1] + generate_kwargs["max_new_tokens"]
            generate_kwargs["cache"] = StaticCache(self.config.text_config, max_cache_len=max_cache_len)
        generate_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        generate_kwargs.setdefault("bos_token_id", bos_id)
        outputs = super().generate(
            input_ids=bos,
            attention_mask=attention_mask,
            image_features=image_features,
            view_mask=view_mask,
            **generate_kwargs,
        )
        if isinstance(outputs, torch.Tensor):
            return outputs[:, 1:]
        outputs.sequences = outputs.sequences[:, 1:]
        return outputs


# Saved folders carry the code and load with AutoModel.from_pretrained(dir, trust_remote_code=True).
XrayCapForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["XrayCapPreTrainedModel", "XrayCapForConditionalGeneration", "XrayCapCausalLMOutput"]
