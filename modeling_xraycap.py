"""XrayCap: image encoder -> projection -> prefix tokens -> GPT-2 decoder, as a transformers model.

Each view of a study is encoded by the vision tower (a transformers CNN or ViT, or a timm model); its
features (a pooled vector or class token, or the cells of the last feature map / patch grid) are projected into
GPT-2's embedding space, get a learned view embedding, and are put in front of the report tokens. As in
transformers' LLaVA, [`XrayCapModel`] is the base model (vision tower, projection, a plain `GPT2Model`; it returns
hidden states) and [`XrayCapForConditionalGeneration`] adds the LM head, the loss and `generate`. `generate`
hands the image to the model at prefill only, as GIT and LLaVA do: afterwards the KV cache holds the prefix, and
without a cache every step re-reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, GPT2Model, PreTrainedModel
from transformers.cache_utils import Cache, StaticCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithPast
from transformers.utils import logging

try:  # inside a package / a saved model folder (transformers' remote-code loader copies `.x` siblings)
    from .configuration_xraycap import XrayCapConfig, fixed_input_size
except ImportError:  # the repository root on sys.path (`import modeling_xraycap`)
    from configuration_xraycap import XrayCapConfig, fixed_input_size

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256  # the default report length, where `n_positions` leaves room for it
# Inputs that carry the image: `generate` hands them to the model at prefill only.
IMAGE_INPUTS = ("pixel_values", "image_features", "view_mask")

# Weight files keep the layout of the first XrayCap models (one GPT2LMHeadModel as `language_model`, the vision
# parts at the top). transformers maps it onto these classes when loading and back when saving, as it does
# for LLaVA, so folders saved before and after the base model was split out load in either code.
_RENAMES = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.transformer\.": "model.language_model.",
    **{rf"^{name}\.": f"model.{name}." for name in ("vision_model", "projection")},
    r"^view_embedding": "model.view_embedding",
}
_CONVERSIONS = [WeightRenaming(source_patterns=k, target_patterns=v) for k, v in _RENAMES.items()]
register_checkpoint_conversion_mapping("xraycap", _CONVERSIONS, overwrite=True)  # by model type: both classes


def tower_input_size(vision_model: nn.Module, vision_config) -> int | None:
    """The only image size a built tower takes (a timm ViT's strict patch embedding, or `fixed_input_size`), or None."""
    patch_embed = getattr(getattr(vision_model, "timm_model", None), "patch_embed", None)
    if getattr(patch_embed, "strict_img_size", False):
        return int(patch_embed.img_size[0])
    return fixed_input_size(vision_config)


def check_view_mask_rows(view_mask: torch.Tensor) -> None:
    """Refuses a `(batch, views)` mask with a study without any view (a read of the mask: once a batch)."""
    if not bool((present := view_mask.any(dim=1)).all()):
        raise ValueError(f"view_mask: no view present in rows {(~present).nonzero().flatten().tolist()}.")


@dataclass
class XrayCapModelOutputWithPast(BaseModelOutputWithPastAndCrossAttentions):
    """Output of [`XrayCapModel`]: GPT-2's over prefix + text, and `prefix_length`, the image-prefix positions in
    front (0 without an image)."""

    prefix_length: int | None = None


@dataclass
class XrayCapCausalLMOutput(CausalLMOutputWithPast):
    r"""
    Output of [`XrayCapForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): next-token cross-entropy over the report tokens.
        logits (`torch.FloatTensor` of shape `(batch, prefix_length + text_length, vocab_size)`): over prefix + text
            (the last `logits_to_keep` positions when that is given).
        prefix_length (`int`, *optional*):
            Number of image-prefix positions at the front of `logits` (0 when no image was given).
    """

    prefix_length: int | None = None


class XrayCapProjection(nn.Module):
    """Maps encoder features (..., C) into GPT-2's embedding space (..., n_embd): LayerNorm(C), then Linear
    (`"linear"`) or Linear-GELU-Linear (`"mlp"`). The LayerNorm makes the prefix scale independent of the
    encoder's raw activations (ResNet features after ReLU are large and all positive)."""

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
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["GPT2Block", "ResNetStage"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, XrayCapModel):
            nn.init.normal_(module.view_embedding, mean=0.0, std=self.config.initializer_range)


class XrayCapModel(XrayCapPreTrainedModel):
    r"""
    The base model: vision tower -> projection (+ view embedding) -> image prefix -> GPT-2 body, without an LM head.

    Args:
        config ([`XrayCapConfig`]):
            The whole configuration; the towers are built from `config.vision_config` and `config.text_config`
            with random weights.
    """

    def __init__(self, config: XrayCapConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        timm_model = getattr(self.vision_model, "timm_model", None)
        self._channels_last = getattr(timm_model, "output_fmt", None) == "NHWC"  # timm Swin: (N, h, w, C)
        fixed = tower_input_size(self.vision_model, config.vision_config)
        if fixed is not None and fixed != config.image_size:
            raise ValueError(
                f"image_size={config.image_size}, but the vision tower ({type(self.vision_model).__name__}) takes "
                f"only {fixed}-px images (its position embeddings are fixed): use image_size={fixed}."
            )
        self.vision_feature_dim, self._grid_side, self._prefix_tokens = self._tower_geometry()
        self.projection = XrayCapProjection(self.vision_feature_dim, config)
        self.view_embedding = nn.Parameter(torch.zeros(config.max_views, config.text_config.n_embd))
        self.language_model = GPT2Model(config.text_config)
        self.post_init()

    def _tower_geometry(self) -> tuple[int, int, int]:
        """The tower's feature width, the side of its last feature map or square patch grid (7 for ResNet-50 at
        224 px, 14 for ViT-B/16) and its class / distillation / register tokens, read from one forward of a
        blank `image_size` image (on the meta device while `from_pretrained` builds the model: no compute)."""
        size, weight = self.config.image_size, next(self.vision_model.parameters())
        was_training = self.vision_model.training
        with torch.no_grad():
            blank = torch.zeros(1, 3, size, size, device=weight.device, dtype=weight.dtype)
            hidden = self.vision_model.eval()(pixel_values=blank).last_hidden_state
        self.vision_model.train(was_training)
        if hidden.ndim == 4:  # a feature map (1, C, h, w), or timm Swin's (1, h, w, C)
            return int(hidden.shape[-1 if self._channels_last else 1]), int(hidden.shape[2]), 0
        side = math.isqrt(hidden.shape[1])  # tokens (1, prefix + side * side, C)
        return int(hidden.shape[-1]), side, int(hidden.shape[1]) - side * side

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

    def get_image_features(self, pixel_values: torch.Tensor, view_mask: torch.Tensor | None = None):
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
            grad while no tower parameter requires grad (a frozen tower), so it can be cached and fed back as `image_features`.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        batch, views = pixel_values.shape[:2]
        view_mask = self._check_view_mask(view_mask, pixel_values)
        flat = pixel_values.flatten(0, 1)[view_mask.flatten()]
        if not torch.is_autocast_enabled(flat.device.type):
            flat = flat.to(self.vision_model.dtype)
        trains = any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        view_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> XrayCapModelOutputWithPast:
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
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*):
                1 = real view, 0 = absent (its tokens are masked out of attention). Default: views whose
                pixels / features are all zero (the processor's and `get_image_features`' padding) are absent.
            image_features (`torch.FloatTensor` of shape `(batch, views, tokens, channels)`, *optional*):
                Precomputed `get_image_features` output used instead of `pixel_values`.
            inputs_embeds, position_ids, cache, use_cache:
                As in `GPT2Model`. Position ids count attended positions, so absent views shift nothing.

        Returns:
            [`XrayCapModelOutputWithPast`]: hidden states over prefix + text, and `prefix_length`.
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
            inputs_embeds, attention_mask, prefix_length = self._prepend_prefix(
                image_features, view_mask, inputs_embeds, attention_mask
            )
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
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, **kwargs,
        )  # fmt: skip
        return XrayCapModelOutputWithPast(**outputs, prefix_length=prefix_length)

    def _prepend_prefix(
        self, image_features: torch.Tensor, view_mask, inputs_embeds: torch.Tensor, attention_mask
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The image prefix in front of the text embeddings, and its mask in front of the text's (a mask that
        already spans prefix + text, from `generate`, is kept). Returns the embeddings, the mask, the prefix length."""
        prefix_embeds, prefix_mask = self.get_prefix_embeds(image_features, view_mask)
        batch, prefix_length = prefix_embeds.shape[:2]
        if inputs_embeds.shape[0] != batch:
            raise ValueError(
                f"{batch} studies of images but {inputs_embeds.shape[0]} texts: pass one report per study."
            )
        if attention_mask is None:
            attention_mask = prefix_mask.new_ones(inputs_embeds.shape[:2])
        if attention_mask.ndim == 2 and attention_mask.shape[1] == inputs_embeds.shape[1]:
            attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
        elif attention_mask.ndim != 2 or attention_mask.shape[1] != prefix_length + inputs_embeds.shape[1]:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}: give a 2D mask with one entry per "
                f"text token ({inputs_embeds.shape[1]}) or per image-prefix + text position ({prefix_length} "
                f"+ {inputs_embeds.shape[1]})."
            )
        inputs_embeds = torch.cat([prefix_embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        return inputs_embeds, attention_mask, prefix_length


class XrayCapForConditionalGeneration(XrayCapPreTrainedModel, GenerationMixin):
    r"""
    Radiology report generator: [`XrayCapModel`] and GPT-2's LM head (tied to the token embeddings), with the loss
    and `generate`.

    Args:
        config ([`XrayCapConfig`]):
            The whole configuration; the towers are built from `config.vision_config` and
            `config.text_config` with random weights (the training code loads pretrained towers into them);
            `from_pretrained` loads a saved XrayCap folder.

    Example:

    ```python
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> model = AutoModelForImageTextToText.from_pretrained("outputs/xraycap-demo", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("outputs/xraycap-demo", trust_remote_code=True)
    >>> inputs = processor(images=[["frontal.png", "lateral.png"]], return_tensors="pt")
    >>> ids = model.generate(**inputs, num_beams=3, max_new_tokens=120)
    >>> processor.batch_decode(ids, skip_special_tokens=True)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.wte.weight"}

    def __init__(self, config: XrayCapConfig):
        super().__init__(config)
        self.model = XrayCapModel(config)
        self.lm_head = nn.Linear(config.text_config.n_embd, config.text_config.vocab_size, bias=False)
        self.post_init()
        room = config.text_config.n_positions - self.max_prefix_length - 1
        if room < 1:
            raise ValueError(
                f"text_config.n_positions={config.text_config.n_positions} leaves no room for text after an "
                f"image prefix of {self.max_prefix_length} tokens: raise n_positions or lower image_size/max_views."
            )
        self.generation_config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        self.generation_config.max_length = None
        # `_auto_class` holds one Auto class ("AutoModel", below); the config names this class for the other.
        auto_map = {"AutoModelForImageTextToText": f"{__name__.rsplit('.', 1)[-1]}.{type(self).__name__}"}
        config.auto_map = {**auto_map, **(getattr(config, "auto_map", None) or {})}

    # The base model's parts, as LLaVA's head exposes them.
    vision_model = property(lambda self: self.model.vision_model, doc="The vision tower.")
    language_model = property(lambda self: self.model.language_model, doc="The GPT-2 body (`GPT2Model`).")
    projection = property(lambda self: self.model.projection, doc="The projection to GPT-2's width.")
    view_embedding = property(lambda self: self.model.view_embedding, doc="One embedding per view slot.")
    vision_feature_dim = property(lambda self: self.model.vision_feature_dim, doc="The tower's width.")
    tokens_per_view = property(lambda self: self.model.tokens_per_view, doc="Image tokens per view.")
    max_prefix_length = property(lambda self: self.model.max_prefix_length, doc="The longest image prefix.")

    def get_image_features(self, pixel_values: torch.Tensor, view_mask=None) -> torch.Tensor:
        """[`XrayCapModel.get_image_features`]: each view through the vision tower, before projection."""
        return self.model.get_image_features(pixel_values, view_mask)

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
            labels (`torch.LongTensor` of shape `(batch, text_length)`, *optional*):
                Targets aligned with `input_ids`, -100 where no loss is wanted (padding, the leading bos).
                The loss never covers the image prefix.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                As in `GPT2LMHeadModel`; with `labels` the loss covers the kept positions, so in training
                `k = text_length + 1` gives the same loss without the LM head on the image prefix.
            use_cache (`bool`, *optional*):
                Defaults to False for a training forward (train mode, with `labels`).
            input_ids, pixel_values, attention_mask, view_mask, image_features, inputs_embeds, position_ids, cache:
                As in [`XrayCapModel.forward`].

        Returns:
            [`XrayCapCausalLMOutput`] with `loss` (when `labels` is given) and `logits` over prefix + text.
        """
        if use_cache is None and labels is not None and self.training:
            use_cache = False
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, view_mask=view_mask,
            image_features=image_features, inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache,
            use_cache=use_cache, **kwargs,
        )  # fmt: skip
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep  # 0: all
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        loss = None
        if labels is not None:
            labels = torch.cat([labels.new_full((len(labels), outputs.prefix_length), -100), labels], dim=1)
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                labels = labels[:, -logits_to_keep:]  # the loss covers the kept logits only
            loss = self.loss_function(logits, labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return XrayCapCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, prefix_length=outputs.prefix_length,
        )  # fmt: skip

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
        view_mask = self.model._check_view_mask(view_mask, image_features)
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
            input_ids=bos, attention_mask=attention_mask, image_features=image_features, view_mask=view_mask,
            **generate_kwargs,
        )  # fmt: skip
        if isinstance(outputs, torch.Tensor):
            return outputs[:, 1:]
        outputs.sequences = outputs.sequences[:, 1:]
        return outputs


# Saved folders carry the code. `AutoModelForImageTextToText` (where transformers files GIT, BLIP and LLaVA) and
# `AutoModel` both give the generating model: `AutoModel.from_pretrained(dir, trust_remote_code=True).generate(...)`
# keeps working, as `AutoModel` gives the whole model for transformers' `VisionEncoderDecoderModel`. The base
# model loads from the same folder with `XrayCapModel.from_pretrained(dir)`.
XrayCapForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["XrayCapPreTrainedModel", "XrayCapModel", "XrayCapForConditionalGeneration", "tower_input_size"]
