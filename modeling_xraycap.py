"""XrayCap: image encoder -> projection -> prefix tokens -> GPT-2 decoder, as a transformers model.

Each view of a study is encoded by the vision tower (a transformers ResNet or a timm model); its features
(one pooled vector, or every cell of the last feature map) are projected into GPT-2's embedding space,
get a learned view embedding, and are prepended to the report tokens. The decoder is a plain
`GPT2LMHeadModel`, so the text path is exactly GPT-2 and `generate` reuses transformers' decoding loop:
the prefix is embedded once at prefill and the KV cache carries it afterwards. Only its dropout (with the
attention's softmax), its loss, its activation, its linear layers' products and its tied weight's gradient are
computed differently in CPU training (the "CPU training" section below: the same distribution, loss, function,
products and gradient, with fewer passes over memory and both cores busy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, GPT2LMHeadModel, PreTrainedModel
from transformers.activations import GELUTanh
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, logging

try:  # inside a package / a saved model folder (transformers' remote-code loader copies `.x` siblings)
    from .configuration_xraycap import XrayCapConfig
except ImportError:  # the repository root on sys.path (`import modeling_xraycap`)
    from configuration_xraycap import XrayCapConfig

logger = logging.get_logger(__name__)

# Room left for the report when the default generation length is derived from `n_positions`.
DEFAULT_MAX_NEW_TOKENS = 256


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
        cache (`Cache`, *optional*):
            The decoder's key/value cache (when `use_cache=True`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*), attentions (`tuple(torch.FloatTensor)`, *optional*):
            As returned by GPT-2 when requested.
        prefix_length (`int`, *optional*):
            Number of image-prefix positions at the front of `logits` (0 on the text-only path).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    prefix_length: int | None = None


# ----------------------------------------------------------------------------------------- CPU training
# On CPU, `F.dropout` draws its Bernoulli mask with one Mersenne-Twister number and one float compare per
# element, keeps the mask for the backward, and SDPA with `dropout_p > 0` falls back to its math path with that
# same mask. The dropout below is counter-based instead, as CUDA's Philox dropout is: each call draws one 64-bit
# key from torch's CPU generator (so `torch.manual_seed` and activation checkpointing replay it), element `i` is
# kept when a 32-bit integer hash of `(i, key)` clears a threshold, and the backward recomputes the mask from the
# key rather than storing it. Mask, scale and cast are one compiled pass; the attention's softmax and its dropout
# are another (one more each for the backwards; without a compiler the same functions run eagerly). Against
# torch's masks a real-size bf16 training step on the 2-core CPU went from 1.07 s to 0.90 s with a Mersenne-Twister
# mask drawn 16 bits an element, and these kernels are 1.03x faster again than that mask (paired median of 10
# alternating steps). Both run only when dropout is active on a CPU tensor; everywhere else (eval, generation,
# CUDA) they defer to torch / SDPA. The model installs both on its decoder (`XrayCapForConditionalGeneration.
# __init__`), with the row-split linear layers, the compiled tanh-GELU, the chunked causal-LM loss and the tied
# weight's gradient further down. `_CompiledOrFallback` (next) compiles all of them.


class _CompiledOrFallback:
    """Calls `function` compiled by `torch.compile(dynamic=True)` (compiled on the first call), or `fallback` when
    compiling is disabled or the compilation fails: it then logs why, once, and keeps using `fallback`."""

    def __init__(self, function, fallback):
        self.function, self.fallback = function, fallback
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            if torch._dynamo.config.disable:  # TORCHDYNAMO_DISABLE=1
                self.compiled = False
            else:
                logger.info(
                    f"Compiling xraycap's CPU {self.function.__name__} (once; inductor caches it on disk)."
                )
                self.compiled = torch.compile(self.function, dynamic=True)
                try:
                    return self.compiled(*args)
                except Exception as error:  # no C++ compiler, an unsupported platform, ...
                    logger.warning(
                        f"Could not compile xraycap's CPU {self.function.__name__} ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); running "
                        f"{self.fallback.__name__} eagerly instead (the same function, slower). Set "
                        "TORCHDYNAMO_DISABLE=1 to skip the attempt."
                    )
                    self.compiled = False
        if self.compiled is False:
            return self.fallback(*args)
        return self.compiled(*args)


_DROPOUT_LEVELS = 1 << 16  # the drop probability is rounded to a multiple of 2**-16 (0.1 -> 0.100006)
# The hash's two odd multipliers (C. Wellons' "lowbias32"), as the int32 values of their 32-bit patterns.
_HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix of an int32 tensor (xor-shift, multiply, xor-shift, multiply, xor-shift),
    with wrapping products; the right shifts are logical (the sign bits masked off)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MULTIPLIERS[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _HASH_MULTIPLIERS[1]
    return x ^ ((x >> 16) & 0xFFFF)


def _dropout_keep_mask(shape: torch.Size, key: torch.Tensor, drop_count: int) -> torch.Tensor:
    """
    The keep mask of one dropout call: bool, `shape`, False with probability `drop_count / 2**16`.

    Element `i` (row-major) is dropped when the low 16 bits of `hash(hash(i ^ key[0]) ^ key[1])` fall below
    `drop_count`. Two rounds keyed by two words make the masks of different keys unrelated (with one round, the
    mask of one key would be the mask of another with its elements permuted).

    Args:
        shape (`torch.Size`): the mask's shape (fewer than 2**31 elements).
        key (`torch.Tensor`): two int32 words, from [`_dropout_key`].
        drop_count (`int`): the drop probability in 2**-16 units.
    """
    index = torch.arange(shape.numel(), dtype=torch.int32, device=key.device)
    bits = _hash32(_hash32(index ^ key[0]) ^ key[1])
    return ((bits & 0xFFFF) >= drop_count).view(shape)


def _dropout_scale(drop_count: int) -> float:
    """The exact 1 / (1 - drop probability), applied as a Python float (not rounded to the tensor's dtype)."""
    return _DROPOUT_LEVELS / (_DROPOUT_LEVELS - drop_count)


def _dropout_key() -> torch.Tensor:
    """Two int32 words from torch's default CPU generator: one dropout call's key."""
    return torch.randint(-(1 << 31), 1 << 31, (2,), dtype=torch.int32)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision tensors, else the tensor's own dtype: where the fused kernels do their arithmetic."""
    return torch.float32 if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.dtype


def _dropout_apply(
    hidden_states: torch.Tensor, key: torch.Tensor, drop_count: int, scale: float
) -> torch.Tensor:
    """`hidden_states` times the keep mask of `key`, times `scale`, rounded once to its dtype: the dropout's
    forward, and (applied to the output gradient) its backward."""
    keep = _dropout_keep_mask(hidden_states.shape, key, drop_count)
    return torch.where(keep, hidden_states.to(_compute_dtype(hidden_states)) * scale, 0.0).to(
        hidden_states.dtype
    )


_compiled_dropout_apply = _CompiledOrFallback(_dropout_apply, _dropout_apply)


class _CpuDropoutFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, drop_count: int) -> torch.Tensor:
        key = _dropout_key()
        ctx.scale, ctx.drop_count = _dropout_scale(drop_count), drop_count
        ctx.save_for_backward(key)
        return _compiled_dropout_apply(hidden_states.contiguous(), key, drop_count, ctx.scale)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (key,) = ctx.saved_tensors
        return _compiled_dropout_apply(grad_output.contiguous(), key, ctx.drop_count, ctx.scale), None


def _drop_count(p: float, device: torch.device, numel: int) -> int | None:
    """`p` in 2**-16 units when the CPU dropout kernels take a tensor of `numel` elements on `device`, else None
    (`F.dropout` or SDPA do)."""
    drop_count = round(p * _DROPOUT_LEVELS)
    if device.type != "cpu" or not 0 < drop_count < _DROPOUT_LEVELS or numel >= 1 << 31:
        return None
    return drop_count


def xraycap_dropout(hidden_states: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """
    `F.dropout(hidden_states, p, training)`, with a counter-based mask for CPU tensors.

    On CPU each element is zeroed with probability `round(p * 2**16) / 2**16` and the others are scaled by the
    exact inverse of the keep probability, so the output is unbiased. Other devices, probabilities that round to 0
    or 1, and tensors of 2**31 elements or more use `F.dropout`.

    Args:
        hidden_states (`torch.Tensor`): the input.
        p (`float`): probability of zeroing an element.
        training (`bool`): dropout is applied only when True.
    """
    if not training or p == 0.0:
        return hidden_states
    drop_count = _drop_count(p, hidden_states.device, hidden_states.numel())
    if drop_count is None:
        return nn.functional.dropout(hidden_states, p, training=True)
    return _CpuDropoutFunction.apply(hidden_states, drop_count)


class XrayCapDropout(nn.Dropout):
    """`nn.Dropout` running [`xraycap_dropout`] (same `p`; `inplace` is ignored): a faster mask on CPU. XrayCap puts
    it in place of GPT-2's dropout modules."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return xraycap_dropout(hidden_states, self.p, self.training)


def _replace_dropout_modules(model: nn.Module) -> None:
    """Puts an [`XrayCapDropout`] with the same `p` in place of every `nn.Dropout` of `model` (no weights
    change; GPT-2 has four kinds: embedding, attention, residual and MLP dropout)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, XrayCapDropout(child.p))


def _attention_probs_forward(
    scores: torch.Tensor, bias: torch.Tensor, key: torch.Tensor, scaling: float, drop_count: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax(scores * scaling + bias)` with the dropout of `key`, in `scores`' dtype, and the softmax before
    the dropout (kept for the backward)."""
    compute = _compute_dtype(scores)
    probs = torch.softmax(scores.to(compute) * scaling + bias.to(compute), dim=-1)
    keep = _dropout_keep_mask(probs.shape, key, drop_count)
    return torch.where(keep, probs * scale, 0.0).to(scores.dtype), probs.to(scores.dtype)


def _attention_probs_backward(
    grad_output: torch.Tensor,
    probs: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    drop_count: int,
    scale: float,
) -> torch.Tensor:
    """The gradient of the scores: the dropout's, then the softmax's (`p * (g - sum(g * p))`), times `scaling`."""
    compute = _compute_dtype(grad_output)
    keep = _dropout_keep_mask(probs.shape, key, drop_count)
    grad = torch.where(keep, grad_output.to(compute) * scale, 0.0)
    probs = probs.to(compute)
    grad = probs * (grad - (grad * probs).sum(dim=-1, keepdim=True))
    return (grad * scaling).to(grad_output.dtype)


_compiled_attention_probs_forward = _CompiledOrFallback(_attention_probs_forward, _attention_probs_forward)
_compiled_attention_probs_backward = _CompiledOrFallback(_attention_probs_backward, _attention_probs_backward)


class _CpuAttentionProbsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, scores: torch.Tensor, bias: torch.Tensor, scaling: float, drop_count: int
    ) -> torch.Tensor:
        key = _dropout_key()
        ctx.scaling, ctx.drop_count = scaling, drop_count
        ctx.scale = _dropout_scale(drop_count)
        dropped, probs = _compiled_attention_probs_forward(
            scores.contiguous(), bias, key, scaling, drop_count, ctx.scale
        )
        ctx.save_for_backward(probs, key)
        return dropped

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        probs, key = ctx.saved_tensors
        grad = _compiled_attention_probs_backward(
            grad_output.contiguous(), probs, key, ctx.scaling, ctx.drop_count, ctx.scale
        )
        return grad, None, None, None


def xraycap_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """
    transformers' SDPA attention, except when attention dropout is active on CPU: there SDPA runs its math path
    with a slow Bernoulli mask, and this runs the same math (scores, mask, softmax, dropout, weighted sum) with
    [`xraycap_dropout`]'s mask, the softmax and the dropout in one compiled pass. Registered as the
    `"xraycap_sdpa"` attention implementation, with SDPA's masks; XrayCap sets it on its decoder wherever
    transformers resolved "sdpa" (eager or flash attention are left as chosen).

    Args:
        module (`nn.Module`): the attention layer (its `is_causal` is read when `is_causal` is None).
        query, key, value (`torch.Tensor` of shape `(batch, heads, length, head_dim)`): the projected states.
        attention_mask (`torch.Tensor`, *optional*): SDPA's mask: bool (True = attend) or additive float.
        dropout (`float`): attention dropout probability (0 outside training).
        scaling (`float`, *optional*): score scale, `head_dim ** -0.5` when None.
        is_causal (`bool`, *optional*): causal masking when no mask is given.
    """
    q_length, kv_length = query.shape[2], key.shape[2]
    drop_count = _drop_count(dropout, query.device, query.shape[0] * query.shape[1] * q_length * kv_length)
    if (
        drop_count is None
        or getattr(module, "num_key_value_groups", 1) > 1
        or any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "sinks"))
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is None and is_causal and q_length > 1:
        attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(kv_length - q_length)
    compute = _compute_dtype(query)
    if attention_mask is None:
        bias = torch.zeros((), dtype=compute, device=query.device)
    elif attention_mask.dtype == torch.bool:
        # A finite minimum, not -inf: a fully masked row (a left-padding query) softmaxes to uniform, not NaN.
        bias = torch.zeros(attention_mask.shape, dtype=compute, device=query.device)
        bias.masked_fill_(~attention_mask, torch.finfo(compute).min)
    else:
        bias = attention_mask
    scores = torch.matmul(query, key.transpose(-1, -2))
    with torch.autocast("cpu", enabled=False):  # the kernels fix their own compute dtype
        probs = _CpuAttentionProbsFunction.apply(scores, bias, scaling, drop_count)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


AttentionInterface.register("xraycap_sdpa", xraycap_sdpa_attention_forward)
AttentionMaskInterface.register("xraycap_sdpa", sdpa_mask)


# GPT-2's linear layers (`Conv1D`: `addmm(bias, rows, weight)`). On the 2-core AMX CPU, oneDNN (3.x, brgemm) runs a
# matmul with a 768-wide output and 641-1,280 rows on a single thread when the inner dimension is 4x the width: the
# MLP's down projection (736 x 3072 -> 768 for a batch of 8 reports) and the input gradient of its up projection,
# 24 products a real-size step. Taken as two halves of its rows, the same product runs on both cores: 2.2-2.5 ms
# against 3.7-4.9 ms (minimums of interleaved repeats). Below ~650 rows and above ~1,310 the product is threaded
# already (and 1,472 rows split in two would make two single-thread halves), so only 641-1,280 rows are split,
# whose halves fall below the band. A row split leaves every output row's dot products as they were. fp32 products go
# to MKL, which threads them already (a split is ~3% slower there), so only bf16 / fp16 products are split.
# The weight gradient `rows^T @ grad` reads `rows` transposed, and oneDNN runs a bf16 product whose left operand is
# a transposed view ~1.6x slower than the same product on a contiguous copy (768 x 736 @ 736 x 3072: 2.5 against
# 1.5 ms; 768 x 736 @ 736 x 2304: 1.9 against 1.1 ms, medians of 15 interleaved calls). A compiled transpose makes
# that copy in 0.1 ms for 736 x 768 values and 0.5 ms for 736 x 3072 (torch's strided copy: 0.5 and 2.5 ms), so the
# backward makes it first for weights of 1.5M elements or more: the attention's qkv and the MLP's two products,
# not the 768 x 768 output projection, where the copy does not pay.

# Row counts taken in two halves, when the inner dimension is >= 4x the output width.
_ROW_SPLIT_BAND = (641, 1280)
_ROW_SPLIT_DTYPES = (torch.bfloat16, torch.float16)
# Weights (elements) whose gradient product takes a contiguous transposed copy of its rows.
_TRANSPOSED_ROWS_MIN_WEIGHT = 1_500_000


def _splits_rows(count: int, inner: int, width: int, dtype: torch.dtype) -> bool:
    """Whether a `count x inner @ inner x width` product of `dtype` is taken in two row halves."""
    in_band = _ROW_SPLIT_BAND[0] <= count <= _ROW_SPLIT_BAND[1]
    return in_band and inner >= 4 * width and dtype in _ROW_SPLIT_DTYPES


def _transposes_rows(inner: int, width: int, dtype: torch.dtype) -> bool:
    """Whether the weight gradient of an `inner x width` bf16 / fp16 weight is taken from a transposed copy of the
    rows."""
    return inner * width >= _TRANSPOSED_ROWS_MIN_WEIGHT and dtype in _ROW_SPLIT_DTYPES


def _transpose(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix.t()`, contiguous."""
    return matrix.t().contiguous()


_compiled_transpose = _CompiledOrFallback(_transpose, _transpose)


def _row_split_matmul(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`rows @ weight (+ bias)` for 2-D tensors, in two row halves where [`_splits_rows`] says so."""
    count, (inner, width) = rows.shape[0], weight.shape
    if not _splits_rows(count, inner, width, rows.dtype):
        return torch.mm(rows, weight) if bias is None else torch.addmm(bias, rows, weight)
    out = rows.new_empty(count, width)
    for half in (slice(0, count // 2), slice(count // 2, count)):
        if bias is None:
            torch.mm(rows[half], weight, out=out[half])
        else:
            torch.addmm(bias, rows[half], weight, out=out[half])
    return out


class _CpuConv1DFunction(torch.autograd.Function):
    """`addmm(bias, rows, weight)` and its gradients, with [`_row_split_matmul`] for the two row-major products and
    the weight gradient from a contiguous `rows^T` where [`_transposes_rows`] says so."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        return _row_split_matmul(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        grad_rows = _row_split_matmul(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            transposed = (
                _compiled_transpose(rows) if _transposes_rows(*weight.shape, rows.dtype) else rows.t()
            )
            grad_weight = transposed.mm(grad)
        grad_bias = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias


class XrayCapConv1D(Conv1D):
    """GPT-2's `Conv1D` (same weight `(nx, nf)` and bias, same state-dict keys), computed with [`_CpuConv1DFunction`]
    for bf16 / fp16 products on CPU whose forward or input gradient falls in the single-thread band above, or whose
    weight gradient takes the transposed copy (in training); elsewhere it is `Conv1D`. Under autocast its inputs are
    cast as autocast casts `addmm`'s."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu":
            return super().forward(hidden_states)
        rows = hidden_states.numel() // self.nx
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else hidden_states.dtype
        # The forward is `rows x nx @ nx x nf`, the input gradient `rows x nf @ nf x nx`.
        splits = _splits_rows(rows, self.nx, self.nf, dtype) or _splits_rows(rows, self.nf, self.nx, dtype)
        trains = torch.is_grad_enabled() and self.weight.requires_grad
        if not (splits or (trains and _transposes_rows(self.nx, self.nf, dtype))):
            return super().forward(hidden_states)
        inputs = (hidden_states.reshape(rows, self.nx), self.weight, self.bias)
        if autocast:
            inputs = tuple(tensor.to(dtype) for tensor in inputs)
        with torch.autocast("cpu", enabled=False):
            out = _CpuConv1DFunction.apply(*inputs)
        return out.view(*hidden_states.shape[:-1], self.nf)


def _replace_conv1d_modules(model: nn.Module) -> None:
    """Makes every GPT-2 `Conv1D` of `model` an [`XrayCapConv1D`], keeping its parameters (no weights change)."""
    for module in model.modules():
        if type(module) is Conv1D:
            module.__class__ = XrayCapConv1D


# GPT-2's activation, tanh-GELU: `x * (1 + tanh(z)) / 2` with `z = sqrt(2 / pi) * (x + 0.044715 x^3)`. torch's CPU
# kernel spends most of its time in `tanh` (3.9-4.5 ms for one real-size 8 x 92 x 3072 bf16 activation, where
# `sigmoid` takes 1.1 ms). The same function is `x * sigmoid(2z)`, and the two functions below compute it that way
# in fp32, each compiled by inductor into one vectorised pass: 2.2-2.5 + 2.5-2.8 ms forward + backward against
# 4.3-4.5 + 4.6 ms (medians of 15 interleaved calls, two runs). The outputs are the exact function rounded to the
# input's dtype, as torch's are; ~1.6% of bf16 values differ from torch's kernel, by one unit in the last place.
# The forward keeps its fp32 gate `sigmoid(2z)` for the backward (4 bytes an activation), which then computes no
# exponential: 1.8 against 2.4-2.9 ms forward + backward under load, the same bits. They are compiled on first use
# (a few seconds, cached on disk by inductor) and only in training on CPU; when compiling is off or fails (no C++
# compiler), torch's kernels run instead.

_GELU_TANH_SCALE = 2.0 * (2.0 / torch.pi) ** 0.5  # 2 sqrt(2 / pi): sigmoid(2z) = (1 + tanh(z)) / 2
_GELU_TANH_CUBIC = 0.044715


def _gelu_tanh_gate(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(_GELU_TANH_SCALE * (x + _GELU_TANH_CUBIC * x * x * x))  # (1 + tanh(z)) / 2


def _gelu_tanh_forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation, and its fp32 gate for the backward."""
    x = hidden_states.float()
    gate = _gelu_tanh_gate(x)
    return (x * gate).to(hidden_states.dtype), gate


def _gelu_tanh_backward(
    grad_output: torch.Tensor, hidden_states: torch.Tensor, gate: torch.Tensor | None
) -> torch.Tensor:
    """The input gradient, from the forward's gate (recomputed when None)."""
    x = hidden_states.float()
    gate = _gelu_tanh_gate(x) if gate is None else gate
    slope = gate + x * gate * (1.0 - gate) * _GELU_TANH_SCALE * (1.0 + 3.0 * _GELU_TANH_CUBIC * x * x)
    return (grad_output.float() * slope).to(grad_output.dtype)


def _torch_gelu_tanh(hidden_states: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(hidden_states, approximate="tanh")


def _torch_gelu_tanh_without_gate(hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
    return _torch_gelu_tanh(hidden_states), None


def _torch_gelu_tanh_backward(
    grad_output: torch.Tensor, hidden_states: torch.Tensor, gate: torch.Tensor | None = None
) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad_output, hidden_states, approximate="tanh")


_compiled_gelu_tanh_forward = _CompiledOrFallback(_gelu_tanh_forward, _torch_gelu_tanh_without_gate)
_compiled_gelu_tanh_backward = _CompiledOrFallback(_gelu_tanh_backward, _torch_gelu_tanh_backward)


class _CpuGeluTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor) -> torch.Tensor:
        out, gate = _compiled_gelu_tanh_forward(hidden_states)
        ctx.save_for_backward(hidden_states, gate)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        hidden_states, gate = ctx.saved_tensors
        return _compiled_gelu_tanh_backward(grad_output.contiguous(), hidden_states, gate)


def xraycap_gelu_tanh(hidden_states: torch.Tensor) -> torch.Tensor:
    """
    `F.gelu(hidden_states, approximate="tanh")`, computed as `x * sigmoid(2z)` by compiled kernels when it trains
    on CPU (the input requires grad); elsewhere (inference, CUDA, inside `torch.compile`) torch's kernel.

    Args:
        hidden_states (`torch.Tensor`): the input.
    """
    if (
        hidden_states.device.type != "cpu"
        or not (torch.is_grad_enabled() and hidden_states.requires_grad)
        or torch.compiler.is_compiling()
    ):
        return _torch_gelu_tanh(hidden_states)
    with torch.autocast("cpu", enabled=False):  # the kernels fix their own compute dtype
        return _CpuGeluTanhFunction.apply(hidden_states)


class XrayCapGELUTanh(GELUTanh):
    """transformers' `GELUTanh` (GPT-2's `"gelu_pytorch_tanh"`) running [`xraycap_gelu_tanh`]: faster in CPU
    training. XrayCap puts it in place of its decoder's `GELUTanh` modules."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return xraycap_gelu_tanh(hidden_states)


def _replace_gelu_tanh_modules(model: nn.Module) -> None:
    """Makes every `GELUTanh` of `model` an [`XrayCapGELUTanh`] (no weights)."""
    for module in model.modules():
        if type(module) is GELUTanh:
            module.__class__ = XrayCapGELUTanh


# The causal-LM loss. transformers' `ForCausalLMLoss` upcasts the whole bf16 logits tensor to fp32, runs
# log-softmax and NLL, and its backward runs log-softmax's backward, fills a zero NLL gradient and casts the result
# back to bf16: five or six passes over `tokens x vocab_size` fp32 values in memory (~60 ms a real-size step on the
# 2-core CPU). On CPU the function below walks the logits in row chunks small enough to stay in cache, and in the
# same pass writes the gradient `(softmax - one_hot) / count` in the logits' dtype; its backward only scales it.

_LOSS_CHUNK_ELEMENTS = 1 << 19  # fp32 elements per chunk (2 MB): ~10 rows of GPT-2's 50k vocabulary


class _CpuCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of `(rows, vocab)` logits over `divisor`, its logit gradient written in the same pass."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        rows, vocab_size = logits.shape
        valid = targets != -100
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)
        row_scale = valid.to(torch.float32).div_(divisor).unsqueeze(1)  # 1 / divisor, or 0 where ignored
        row_losses = torch.empty(rows, 1, dtype=torch.float32)
        grad_logits = torch.empty_like(logits)
        chunk_rows = max(1, _LOSS_CHUNK_ELEMENTS // vocab_size)
        buffer = torch.empty(min(chunk_rows, rows), vocab_size, dtype=torch.float32)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            chunk, target = buffer[: end - start], safe_targets[start:end]
            chunk.copy_(logits[start:end])
            chunk.sub_(chunk.amax(dim=1, keepdim=True))  # shifted: x - max
            target_shifted = chunk.gather(1, target)
            chunk.exp_()
            total = chunk.sum(dim=1, keepdim=True)
            row_losses[start:end] = total.log() - target_shifted  # logsumexp(x) - x[target]
            chunk.mul_(row_scale[start:end] / total)  # softmax / divisor
            chunk.scatter_add_(1, target, -row_scale[start:end])  # minus the one-hot / divisor
            grad_logits[start:end].copy_(chunk)
        ctx.save_for_backward(grad_logits)
        return (row_losses * row_scale).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_logits,) = ctx.saved_tensors
        if grad_output.item() == 1.0:  # the usual `loss.backward()`: already the gradient
            return grad_logits, None, None
        return grad_logits * grad_output.to(grad_logits.dtype), None, None


def xraycap_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """
    transformers' `ForCausalLMLoss` (next-token cross-entropy, fp32 softmax, mean over the counted tokens or sum
    over `num_items_in_batch`), computed in cache-sized chunks when it will be differentiated on CPU with bf16 or
    fp32 logits. The value matches to fp32 rounding and the gradient to the logits' rounding; everywhere else it
    calls `ForCausalLMLoss`. XrayCap sets it as its decoder's `loss_function`.

    Args:
        logits (`torch.Tensor` of shape `(batch, length, vocab_size)`): decoder scores.
        labels (`torch.Tensor` of shape `(batch, length)`): targets aligned with the inputs (shifted here), or
            ignored when `shift_labels` is given.
        vocab_size (`int`): last dimension of `logits`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): divide the summed loss by this (gradient
            accumulation over batches) instead of taking the mean.
        ignore_index (`int`): target value that adds nothing to the loss.
        shift_labels (`torch.Tensor`, *optional*): targets already aligned with `logits`.
    """
    chunked = (
        logits.device.type == "cpu"
        and logits.requires_grad
        and torch.is_grad_enabled()
        and logits.dtype in (torch.bfloat16, torch.float32)
    )
    if not chunked:
        return ForCausalLMLoss(
            logits, labels, vocab_size, num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
            shift_labels=shift_labels, **kwargs,
        )  # fmt: skip
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    if ignore_index != -100:
        targets = targets.masked_fill(targets == ignore_index, -100)
    if num_items_in_batch is None:
        divisor = (targets != -100).sum().to(torch.float32)
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logits.device)
    return _CpuCrossEntropyFunction.apply(logits.reshape(-1, vocab_size), targets, divisor)


# The tied weight's gradient. GPT-2's input embedding and LM head share one `vocab_size x n_embd` weight (50k x 768),
# whose gradient is the LM head's (a dense product) plus the embedding's (one row per token). Autograd builds the
# embedding's as a zero-filled 154 MB fp32 tensor with the rows added in, then adds it into the LM head's: two
# passes over 154 MB a real-size step, 20-75 ms on the 2-core CPU. In CPU training XrayCap's forward links the two
# (`_TiedGradient`): the LM head's backward hands its weight gradient to the embedding's backward, which runs after
# it (every decoder output depends on the embeddings), adds its rows in place and returns the sum as the weight's
# only gradient. Same sum, no zero fill, and one arrival, so a DDP hook on the weight sees the whole gradient.


class _TiedGradient:
    """The LM head's weight gradient, carried from its backward to the tied embedding's in one forward."""

    grad: torch.Tensor | None = None


class _CpuTiedEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids: torch.Tensor, weight: torch.Tensor, link: _TiedGradient) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.link, ctx.weight_shape, ctx.weight_dtype = link, weight.shape, weight.dtype
        return nn.functional.embedding(input_ids, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (input_ids,) = ctx.saved_tensors
        grad_weight, ctx.link.grad = ctx.link.grad, None
        if grad_weight is None:  # the LM head was not linked to this forward: the embedding's rows alone
            grad_weight = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad_output.device)
        rows, ids = grad_output.reshape(-1, ctx.weight_shape[1]), input_ids.reshape(-1)
        if grad_weight.dtype == torch.float32:
            return None, grad_weight.index_add_(0, ids, rows.float()), None
        # A bf16 weight (`master_weights.py`): each token's rows summed in fp32, then added with one rounding.
        tokens, positions = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(tokens), rows.shape[1], device=rows.device).index_add_(
            0, positions, rows.float()
        )
        grad_weight[tokens] = (grad_weight[tokens].float() + sums).to(grad_weight.dtype)
        return None, grad_weight, None


class _CpuTiedLMHeadFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden_states: torch.Tensor, weight: torch.Tensor, link: _TiedGradient, dtype: torch.dtype
    ) -> torch.Tensor:
        hidden, matrix = hidden_states.to(dtype), weight.to(dtype)  # autocast's casts for `linear`
        ctx.save_for_backward(hidden, matrix)
        ctx.link, ctx.hidden_dtype, ctx.weight_dtype = link, hidden_states.dtype, weight.dtype
        return nn.functional.linear(hidden, matrix)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        hidden, matrix = ctx.saved_tensors
        grad_logits = grad_logits.to(matrix.dtype)
        grad_hidden = grad_logits.matmul(matrix).to(ctx.hidden_dtype)
        grad_rows = grad_logits.reshape(-1, matrix.shape[0])
        ctx.link.grad = grad_rows.t().mm(hidden.reshape(-1, matrix.shape[1])).to(ctx.weight_dtype)
        return grad_hidden, None, None, None


class XrayCapLMHead(nn.Linear):
    """GPT-2's LM head (`nn.Linear` without bias, its weight tied to the input embedding; same state-dict keys).
    While XrayCap's forward links it to the embedding (`tied_gradient`), it computes the product with
    [`_CpuTiedLMHeadFunction`], which passes its weight gradient to the embedding's backward; otherwise it is
    `nn.Linear`. Under autocast its inputs are cast as autocast casts `linear`'s."""

    tied_gradient: _TiedGradient | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.tied_gradient is None:
            return super().forward(hidden_states)
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else hidden_states.dtype
        with torch.autocast("cpu", enabled=False):
            return _CpuTiedLMHeadFunction.apply(hidden_states, self.weight, self.tied_gradient, dtype)


@contextlib.contextmanager
def _linked_lm_head(head: nn.Module, link: _TiedGradient | None):
    """Within the block, `head` (an [`XrayCapLMHead`]) hands its weight gradient to `link` (nothing when None)."""
    if link is None:
        yield
        return
    head.tied_gradient = link
    try:
        yield
    finally:
        head.tied_gradient = None


def _links_tied_gradient(embedding: nn.Module, head: nn.Module, input_ids: torch.Tensor) -> bool:
    """Whether this forward can carry the LM head's gradient into the tied embedding's backward: CPU training of
    one shared weight by a plain `nn.Embedding` and an [`XrayCapLMHead`]."""
    return (
        type(embedding) is nn.Embedding
        and isinstance(head, XrayCapLMHead)
        and head.bias is None
        and head.weight is embedding.weight
        and embedding.weight.requires_grad
        and embedding.weight.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and embedding.padding_idx is None
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
        and input_ids.numel() > 0
    )


class XrayCapProjection(nn.Module):
    """
    Maps encoder features (..., C) into GPT-2's embedding space (..., n_embd).

    `"linear"`: LayerNorm(C) then Linear(C, n_embd); `"mlp"`: LayerNorm(C), Linear, GELU, Linear. The
    LayerNorm makes the prefix scale independent of the encoder's raw activation scale (ResNet features
    after ReLU are large and all positive).
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

    @property
    def proj_dtype(self) -> torch.dtype:
        """The dtype of the projection weights (inputs are cast to it outside autocast)."""
        return self.norm.weight.dtype

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


def _vision_feature_dim(vision_model: nn.Module, config: XrayCapConfig) -> int:
    """Channels of the encoder's last feature map, for ResNet or timm towers."""
    timm_model = getattr(vision_model, "timm_model", None)
    if timm_model is not None:
        return int(timm_model.num_features)
    dim = config.vision_feature_dim()
    if dim <= 0:
        raise ValueError(
            f"Cannot infer the feature width of vision tower {type(vision_model).__name__}: "
            "use a ResNetConfig or a TimmWrapperConfig as vision_config."
        )
    return dim


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
        self.vision_feature_dim = _vision_feature_dim(self.vision_model, config)
        self.projection = XrayCapProjection(self.vision_feature_dim, config)
        self.view_embedding = nn.Parameter(torch.zeros(config.max_views, config.text_config.n_embd))
        self.language_model = GPT2LMHeadModel(config.text_config)
        self.language_model.loss_function = xraycap_causal_lm_loss  # ForCausalLMLoss, chunked on CPU
        _replace_dropout_modules(self.language_model)  # the CPU-fast dropout; no weights change
        # The MLP's products on both CPU cores; no weights change.
        _replace_conv1d_modules(self.language_model)
        _replace_gelu_tanh_modules(self.language_model)  # tanh-GELU as x * sigmoid(2z), compiled
        # The LM head hands its gradient of the tied weight to the embedding's backward; no weights change.
        if type(self.language_model.lm_head) is nn.Linear:
            self.language_model.lm_head.__class__ = XrayCapLMHead
        self.post_init()
        if self.language_model.config._attn_implementation == "sdpa":  # SDPA, with that dropout on CPU
            self.language_model.set_attn_implementation("xraycap_sdpa")
        self.set_vision_encoder_frozen(config.freeze_vision_encoder)
        room = config.text_config.n_positions - self.max_prefix_length - 1
        if room < 1:
            raise ValueError(
                f"text_config.n_positions={config.text_config.n_positions} leaves no room for text after an "
                f"image prefix of {self.max_prefix_length} tokens: raise n_positions or lower image_size/max_views."
            )
        self.generation_config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, room)
        self.generation_config.max_length = None
        self._generate_without_cache = False  # set by generate(use_cache=False)

    # ----------------------------------------------------------------------------------------- towers
    @classmethod
    def from_pretrained_towers(
        cls,
        vision: str = "microsoft/resnet-50",
        text: str = "gpt2",
        **config_kwargs,
    ) -> XrayCapForConditionalGeneration:
        r"""
        Build a model from a pretrained image encoder and a pretrained GPT-2 (Hub ids or local folders).

        The projection and view embeddings start random. GPT-2 has no pad token, so unless `pad_token_id`
        is given one row is appended to its vocabulary (id = the original vocabulary size); pair the model
        with `XrayCapProcessor.from_tokenizer(text)`, which adds the matching `<|pad|>` token.

        Args:
            vision (`str`, *optional*, defaults to `"microsoft/resnet-50"`):
                A transformers ResNet checkpoint or a timm checkpoint (`"timm/resnet50.a1_in1k"`).
            text (`str`, *optional*, defaults to `"gpt2"`):
                A GPT-2 checkpoint.
            **config_kwargs:
                Other `XrayCapConfig` fields (`visual_tokens`, `projection`, `max_views`, `image_size`, ...).

        Returns:
            `XrayCapForConditionalGeneration`
        """
        vision_tower = AutoModel.from_pretrained(vision)
        text_tower = GPT2LMHeadModel.from_pretrained(text)
        text_config = text_tower.config.to_dict()
        if text_config.get("activation_function") == "gelu_new":  # the same formula, one fused kernel
            text_config["activation_function"] = "gelu_pytorch_tanh"
        if config_kwargs.get("pad_token_id") is None:
            config_kwargs["pad_token_id"] = text_tower.config.vocab_size
        for key in ("bos_token_id", "eos_token_id"):
            if config_kwargs.get(key) is None:
                config_kwargs[key] = text_config.get(key)
        ids = [
            config_kwargs[k]
            for k in ("pad_token_id", "bos_token_id", "eos_token_id")
            if config_kwargs[k] is not None
        ]
        text_config["vocab_size"] = max([text_tower.config.vocab_size, *(i + 1 for i in ids)])
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
        """`PreTrainedModel.from_pretrained`, then re-applies `config.freeze_vision_encoder` (loading
        materialises fresh parameters that would otherwise require grad)."""
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
        if frozen:
            self.vision_model.eval()
        else:
            self.vision_model.train(self.training)

    def train(self, mode: bool = True) -> XrayCapForConditionalGeneration:
        super().train(mode)
        if self.config.freeze_vision_encoder:
            self.vision_model.eval()
        return self

    # ----------------------------------------------------------------------------------------- images
    @property
    def tokens_per_view(self) -> int:
        """Image tokens per view at `config.image_size` (1 for "pooled"; the feature-map cells for "grid")."""
        if self.config.visual_tokens == "pooled":
            return 1
        cells = getattr(self, "_grid_cells", None)  # measured on the last forward
        if cells is not None:
            return cells
        reduction, extra = 32, 0  # transformers ResNets downsample by 32
        timm_model = getattr(self.vision_model, "timm_model", None)
        feature_map = timm_model is None or not hasattr(timm_model, "patch_embed")  # CNN, not ViT tokens
        if timm_model is not None:
            feature_info = getattr(timm_model, "feature_info", None) or [{}]
            reduction = int(feature_info[-1].get("reduction", 32))
            extra = int(getattr(timm_model, "num_prefix_tokens", 0) or 0)  # ViT class tokens
        side = -(-int(self.config.image_size) // reduction)
        if feature_map and self.config.grid_size is not None:  # CNN maps are pooled to grid_size
            side = min(side, int(self.config.grid_size))
        return side * side + extra

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
            raise ValueError(
                f"pixel_values images are {tuple(pixel_values.shape[-2:])} px; need at least 32 px."
            )
        return pixel_values

    def _check_view_mask(self, view_mask: torch.Tensor | None, data: torch.Tensor) -> torch.Tensor:
        """Validate `view_mask` against `data` (B, V, ...); without one, all-zero views (the padding that
        XrayCapProcessor and get_image_features produce) are absent and every other view is present."""
        batch, views, device = data.shape[0], data.shape[1], data.device
        if view_mask is None:
            view_mask = data.detach().flatten(2).ne(0).any(dim=-1)
            return view_mask | ~view_mask.any(dim=1, keepdim=True)  # an all-zero study keeps its views
        view_mask = torch.as_tensor(view_mask, device=device)
        if view_mask.ndim == 1 and views == 1:
            view_mask = view_mask.unsqueeze(1)
        if tuple(view_mask.shape) != (batch, views):
            raise ValueError(
                f"view_mask has shape {tuple(view_mask.shape)}; expected (batch, views) = {(batch, views)}."
            )
        view_mask = view_mask.bool()
        if not bool(view_mask.any(dim=1).all()):
            empty = (~view_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(
                f"view_mask marks no view as present for batch rows {empty}: each study needs one."
            )
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
            `torch.FloatTensor` of shape `(batch, views, tokens, channels)`: tokens = 1 ("pooled") or the
            cells of the last feature map ("grid"; pooled to `config.grid_size` per side: 4x4 = 16 for
            ResNet-50 at 224 px, 7x7 = 49 with `grid_size=None`). Computed without grad
            while the encoder is frozen, so it can be cached and fed back as `image_features`.
        """
        pixel_values = self._check_pixel_values(pixel_values)
        batch, views = pixel_values.shape[:2]
        view_mask = self._check_view_mask(view_mask, pixel_values)
        flat = pixel_values.flatten(0, 1)[view_mask.flatten()]
        param = next(p for p in self.vision_model.parameters() if p.ndim == 4)  # the stem convolution
        if not torch.is_autocast_enabled(flat.device.type):
            flat = flat.to(param.dtype)
        if not param.is_contiguous() and param.is_contiguous(memory_format=torch.channels_last):
            flat = flat.contiguous(memory_format=torch.channels_last)  # model.to(memory_format=channels_last)
        frozen = self.config.freeze_vision_encoder
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            outputs = self.vision_model(pixel_values=flat)
            tokens = self._tokens_from_encoder_output(outputs)
        features = tokens.new_zeros(batch * views, *tokens.shape[1:])
        features[view_mask.flatten()] = tokens
        return features.view(batch, views, *tokens.shape[1:])

    def _tokens_from_encoder_output(self, outputs) -> torch.Tensor:
        hidden = outputs.last_hidden_state
        pooled = getattr(outputs, "pooler_output", None)
        if hidden.ndim == 4:  # CNN feature map (N, C, h, w)
            if self.config.visual_tokens == "grid":
                side = self.config.grid_size
                if side is not None and max(hidden.shape[-2:]) > side:
                    hidden = nn.functional.adaptive_avg_pool2d(hidden, (side, side))
                self._grid_cells = hidden.shape[-2] * hidden.shape[-1]
                return hidden.flatten(2).transpose(1, 2).contiguous()
            if pooled is None:
                pooled = hidden.mean(dim=(2, 3))
        else:  # transformer tokens (N, L, C)
            if self.config.visual_tokens == "grid":
                return hidden
            if pooled is None:
                pooled = hidden.mean(dim=1)
        return pooled.reshape(pooled.shape[0], 1, -1)

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
        prefix = self.projection(image_features.to(self.projection.proj_dtype))
        prefix = prefix + self.view_embedding[:views].to(prefix.dtype)[None, :, None, :]
        prefix_mask = view_mask[:, :, None].expand(batch, views, tokens).reshape(batch, views * tokens)
        return prefix.reshape(batch, views * tokens, -1), prefix_mask.long()

    # ----------------------------------------------------------------------------------------- forward
    def _embed_tokens(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, _TiedGradient | None]:
        """The tokens' embeddings and, in CPU training, the link that carries the LM head's gradient of the tied
        weight into their backward (see "The tied weight's gradient" above)."""
        embedding = self.get_input_embeddings()
        if not _links_tied_gradient(embedding, self.get_output_embeddings(), input_ids):
            return embedding(input_ids), None
        link = _TiedGradient()
        return _CpuTiedEmbeddingFunction.apply(input_ids, embedding.weight, link), link

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
                1 on text tokens, 0 on padding. The image prefix mask is prepended internally.
            labels (`torch.LongTensor` of shape `(batch, text_length)`, *optional*):
                Targets aligned with `input_ids`, -100 where no loss is wanted (padding, the leading bos).
                The loss never covers the image prefix.
            view_mask (`torch.Tensor` of shape `(batch, views)`, *optional*):
                1 = real view, 0 = absent (its tokens are masked out of attention). Default: views whose
                pixels / features are all zero (the processor's and `get_image_features`' padding) are absent.
            image_features (`torch.FloatTensor` of shape `(batch, views, tokens, channels)`, *optional*):
                Precomputed `get_image_features` output used instead of `pixel_values`.
            logits_to_keep (`int` or `torch.Tensor`, *optional*, defaults to 0):
                As in `GPT2LMHeadModel`: an int `k > 0` computes logits for the last `k` positions only. With
                `labels`, the loss then covers those positions, so in training `k = text_length + 1` gives the
                same loss while skipping the LM head and softmax on the image prefix (see
                `run_captioning.training_loss`).
            inputs_embeds, position_ids, cache, use_cache:
                As in `GPT2LMHeadModel` (used by `generate`). Position ids default to the running count of
                attended positions, so absent views shift nothing. `use_cache` defaults to False for a training
                forward (train mode, with `labels`), whose cache nothing would read.

        Returns:
            [`XrayCapCausalLMOutput`] with `loss` (when `labels` is given) and `logits` over prefix + text.

        Raises:
            `ValueError` when prefix + text is longer than `text_config.n_positions` (GPT-2 has no position
            embedding beyond it; the processor truncates reports to `max_length` with a warning).
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both.")
        prefix_embeds = prefix_mask = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, view_mask)
        if image_features is not None:
            prefix_embeds, prefix_mask = self.get_prefix_embeds(image_features, view_mask)

        link = None
        if inputs_embeds is None:
            if input_ids is not None:
                inputs_embeds, link = self._embed_tokens(input_ids)
            elif prefix_embeds is not None:
                inputs_embeds = prefix_embeds[:, :0]
            else:
                raise ValueError("Pass input_ids, inputs_embeds, pixel_values or image_features.")
        elif input_ids is not None:
            raise ValueError("Pass either input_ids or inputs_embeds, not both.")

        prefix_length = 0
        if prefix_embeds is not None:
            batch, prefix_length = prefix_embeds.shape[:2]
            if inputs_embeds.shape[0] != batch:
                raise ValueError(
                    f"{batch} studies of images but {inputs_embeds.shape[0]} texts: pass one report per study."
                )
            if attention_mask is None:
                attention_mask = torch.ones(
                    inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device
                )
            attention_mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)
            inputs_embeds = torch.cat([prefix_embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)
            if labels is not None:
                ignore = labels.new_full((batch, prefix_length), -100)
                labels = torch.cat([ignore, labels], dim=1)

        if inputs_embeds.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(
            inputs_embeds.device.type
        ):  # half-precision weights (`master_weights.py`): the residual stream is fp32, as from fp32 weights
            inputs_embeds = inputs_embeds.float()

        past_length = cache.get_seq_length() if cache is not None else 0
        total = past_length + inputs_embeds.shape[1]
        n_positions = self.config.text_config.n_positions
        if total > n_positions:
            raise ValueError(
                f"Sequence of {total} positions ({prefix_length} image-prefix + "
                f"{total - prefix_length} text) exceeds the decoder's n_positions={n_positions}: shorten the "
                "report (XrayCapProcessor(max_length=...) truncates) or lower max_new_tokens."
            )
        if labels is not None and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            labels = labels[:, -logits_to_keep:]  # the loss covers the kept logits only
        if use_cache is None and labels is not None and self.training:
            use_cache = (
                False  # nothing reads a training step's cache; filling it copies every layer's keys/values
            )
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

        with _linked_lm_head(self.get_output_embeddings(), link):
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
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # Without a KV cache every step re-reads the whole sequence: image prefix + bos (the prompt
        # embeddings) followed by the tokens generated so far.
        if self._generate_without_cache:
            cache, kwargs["use_cache"] = None, False
        no_cache = cache is None or not kwargs.get("use_cache", True)
        if inputs_embeds is not None and not is_first_iteration and no_cache:
            inputs_embeds = torch.cat([inputs_embeds, self.get_input_embeddings()(input_ids)], dim=1)
            is_first_iteration = True
            next_sequence_length = None
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        view_mask: torch.Tensor | None = None,
        image_features: torch.FloatTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        r"""
        Write reports for a batch of studies.

        The prompt is `[image prefix; bos]`, embedded once; transformers' `generate` then decodes with the
        KV cache. Every `generate` option passes through (`num_beams`, `do_sample`, `top_p`,
        `num_return_sequences`, `no_repeat_ngram_size`, `max_new_tokens`, `use_cache`, ...).

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
            (no prefix, no bos), padded with `pad_token_id` after eos.
        """
        if pixel_values is None and image_features is None:
            if generate_kwargs.get("input_ids") is None and generate_kwargs.get("inputs_embeds") is None:
                raise ValueError(
                    "generate needs pixel_values or image_features (or input_ids for text only)."
                )
            return super().generate(**generate_kwargs)  # text-only: plain GPT-2 continuation
        for key in ("input_ids", "attention_mask", "labels"):
            if generate_kwargs.pop(key, None) is not None and key == "input_ids":
                logger.info(
                    "generate: ignoring input_ids; reports are generated from the image prefix + bos."
                )
        if image_features is None:
            image_features = self.get_image_features(pixel_values, view_mask)
        prefix_embeds, prefix_mask = self.get_prefix_embeds(image_features, view_mask)
        batch = prefix_embeds.shape[0]
        bos_id = self.config.bos_token_id
        if bos_id is None:
            raise ValueError("config.bos_token_id is None: set it to the tokenizer's bos id.")
        bos = torch.full((batch, 1), bos_id, dtype=torch.long, device=prefix_embeds.device)
        bos_embeds = self.get_input_embeddings()(bos)
        inputs_embeds = torch.cat([prefix_embeds.to(bos_embeds.dtype), bos_embeds], dim=1)
        attention_mask = torch.cat([prefix_mask, torch.ones_like(bos)], dim=1)

        room = self.config.text_config.n_positions - inputs_embeds.shape[1]
        generation_config = generate_kwargs.get("generation_config") or self.generation_config
        max_new = generate_kwargs.get("max_new_tokens", generation_config.max_new_tokens)
        if generate_kwargs.get("max_length") is not None and "max_new_tokens" not in generate_kwargs:
            max_new = generate_kwargs.pop("max_length") - 1
        if max_new is None or max_new > room:
            if max_new is not None:
                logger.warning(
                    "max_new_tokens=%s exceeds the %s positions left after the %s-token image prefix + bos; "
                    "capping it.",
                    max_new,
                    room,
                    inputs_embeds.shape[1],
                )
            max_new = room
        generate_kwargs["max_new_tokens"] = max_new
        generate_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        generate_kwargs.setdefault("bos_token_id", bos_id)
        if generate_kwargs.get("use_cache", True):
            return super().generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )
        # transformers turns the cache back on for prompts given as inputs_embeds, so `use_cache=False` is
        # honoured here: the cache is dropped where the decoding loop hands it to the model.
        self._generate_without_cache = True
        try:
            return super().generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )
        finally:
            self._generate_without_cache = False

    def _reorder_cache(self, cache, beam_idx):
        # Beam search reorders the cache with this hook when it exists (the cache's own method otherwise).
        if cache is not None and not self._generate_without_cache:
            cache.reorder_cache(beam_idx)
        return cache


# Saved folders carry the code and load with AutoModel.from_pretrained(dir, trust_remote_code=True).
XrayCapForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["XrayCapPreTrainedModel", "XrayCapForConditionalGeneration", "XrayCapCausalLMOutput"]
