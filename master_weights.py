"""bf16 weights with fp32 master weights: mixed-precision training without a weight or gradient cast per step.

Under autocast, a model held in fp32 pays for its precision twice in every step: autocast casts each weight to
bf16 at its first use in the forward, and autograd casts each bf16 weight gradient back to fp32 for `.grad`. At the
real size (126M trainable parameters) on the 2-core CPU those casts are ~1,100 copies and 150-250 ms of a 0.8-1.2 s
step (profiled); the tied 50k x 768 embedding alone costs 11 ms forward and 10-55 ms back.

[`MasterWeightsAdamW`] is the classic mixed-precision recipe (fp32 master weights, Micikevicius et al., 2018) in
the shape of a torch optimizer. At construction it takes the model's fp32 parameters, keeps an fp32 copy of each
weight matrix in its state (the master weight) and turns the parameter itself into bf16. The forward then reads
the bf16 weights as they are, and the backward writes bf16 gradients. Each step reads a bf16 gradient, updates the
fp32 master weight and the fp32 AdamW moments exactly as `torch.optim.AdamW` does, and writes the weight rounded to
bf16: one pass per tensor, compiled by inductor on first use (`modeling_xraycap._CompiledOrFallback`; without a
compiler, the same function runs eagerly). Vectors (biases, layer and batch norms) stay fp32 in the model and take
torch's fused AdamW: they are 0.1% of the weights, and norms run in fp32 under autocast anyway.

What changes against fp32 weights under autocast: the products read the same bf16 weights (autocast's casts round
to nearest, as the update does), and their weight gradients were bf16 before autograd's cast. What differs: the
token and position embeddings enter the residual stream rounded to bf16 (the stream itself stays fp32), and the tied
embedding's gradient is rounded to bf16 once, its rows summed in fp32 first (`modeling_xraycap`'s
`_CpuTiedEmbeddingFunction`). Gradients accumulated over several batches would be summed in bf16, so
`run_captioning.py` uses this optimizer only with `--gradient_accumulation_steps 1` (see
`run_captioning.uses_master_weights`).

Call [`MasterWeightsAdamW.restore_fp32_parameters`] when training ends: the model gets its fp32 master weights back
and is saved and evaluated exactly as an fp32-trained model. Checkpoints (`state_dict`) carry the master weights,
so a resumed run continues from the fp32 values, not from their bf16 rounding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw

from modeling_xraycap import _CompiledOrFallback

logger = logging.getLogger(__name__)

# The per-step scalars, packed into one fp32 tensor in this order, so that the compiled update never recompiles when
# they change.
_LR, _WEIGHT_DECAY, _BETA1, _BETA2, _EPS = 0, 1, 2, 3, 4
_BIAS_CORRECTION1, _BIAS_CORRECTION2_SQRT, _INV_GRAD_SCALE = 5, 6, 7


def _adamw_update_and_round(
    weight: torch.Tensor,
    master: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hyper: torch.Tensor,
) -> None:
    """`torch.optim.AdamW`'s update of one fp32 master weight, in place, from a half-precision gradient; then the
    half-precision weight set to it (rounded to nearest)."""
    grad = grad.float() * hyper[_INV_GRAD_SCALE]
    master.mul_(1 - hyper[_LR] * hyper[_WEIGHT_DECAY])
    exp_avg.lerp_(grad, 1 - hyper[_BETA1])
    exp_avg_sq.mul_(hyper[_BETA2]).add_((1 - hyper[_BETA2]) * grad * grad)
    denom = exp_avg_sq.sqrt() / hyper[_BIAS_CORRECTION2_SQRT] + hyper[_EPS]
    master.sub_(hyper[_LR] / hyper[_BIAS_CORRECTION1] * exp_avg / denom)
    weight.copy_(master)


_compiled_update_and_round = _CompiledOrFallback(_adamw_update_and_round, _adamw_update_and_round)


def _memory_order(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of `tensor`'s values in memory order when it is contiguous or channels_last (convolution weights
    in `channels_last`), else None. Tensors of one layout line up element for element, whatever their shape."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).view(-1)
    return None


class MasterWeightsAdamW(torch.optim.Optimizer):
    """
    AdamW (decoupled weight decay, as `torch.optim.AdamW`) over a model whose weight matrices it holds in
    `weight_dtype`, with their fp32 master weights and the fp32 moments in its state.

    At construction every parameter of two or more dimensions becomes `weight_dtype` in place (the same
    `nn.Parameter` objects, so tied weights stay tied); its fp32 values become the master weight. Vectors stay
    fp32 and are updated by torch's fused AdamW. Like torch's fused AdamW, `step()` divides the gradients by the
    optimizer's `grad_scale` tensor when one is set (the contract [`gradient_clipping.clip_grad_norm_`] uses to fold
    clipping into the step); the clipped gradient of a weight matrix is not written back to `.grad`.

    Args:
        params (`Iterable`): fp32 parameters or parameter groups, as for `torch.optim.AdamW`.
        lr (`float`, *optional*, defaults to 1e-3): learning rate.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): the moments' decay rates.
        eps (`float`, *optional*, defaults to 1e-8): added to the denominator.
        weight_decay (`float`, *optional*, defaults to 1e-2): decoupled weight decay.
        weight_dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): the dtype of the weights the model
            computes with.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        weight_dtype: torch.dtype = torch.bfloat16,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"lr={lr}: the learning rate must be >= 0.")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas}: each must be in [0, 1).")
        if weight_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"weight_dtype={weight_dtype}: use torch.bfloat16 or torch.float16.")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.weight_dtype = weight_dtype
        for param in self._parameters():
            if param.dtype != torch.float32:
                raise ValueError(
                    f"MasterWeightsAdamW takes fp32 parameters (it makes the master weights from them); got one of "
                    f"dtype {param.dtype} and shape {tuple(param.shape)}. Build the optimizer before casting the model."
                )
            state = self.state[param]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if param.ndim >= 2:
                state["master"] = param.detach().clone()
                param.data = param.data.to(weight_dtype)

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [param for group in self.param_groups for param in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter with a gradient.

        Args:
            closure (`Callable`, *optional*): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if any(param.grad.is_sparse for param in params):
                raise RuntimeError("MasterWeightsAdamW does not support sparse gradients.")
            matrices = [param for param in params if param.ndim >= 2]
            vectors = [param for param in params if param.ndim < 2]
            if matrices:
                self._step_matrices(group, matrices, grad_scale)
            if vectors:  # fp32 weights and gradients: torch's own AdamW, fused where it can be
                states = [self.state[param] for param in vectors]
                beta1, beta2 = group["betas"]
                adamw(
                    [param.detach() for param in vectors],
                    [param.grad for param in vectors],
                    [state["exp_avg"] for state in states],
                    [state["exp_avg_sq"] for state in states],
                    [],
                    [state["step"] for state in states],
                    fused=vectors[0].device.type in ("cpu", "cuda"),
                    grad_scale=grad_scale,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                )
        return loss

    def _step_matrices(
        self, group: dict[str, Any], matrices: list[torch.nn.Parameter], grad_scale: torch.Tensor | None
    ) -> None:
        """The master-weight update of `matrices`, one compiled pass each."""
        states = [self.state[param] for param in matrices]
        if any("master" not in state for state in states):
            raise RuntimeError(
                "A weight matrix has no master weight: restore_fp32_parameters() ended training with this "
                "optimizer; build a new one to go on."
            )
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        inv_grad_scale = 1.0 if grad_scale is None else float(1.0 / grad_scale)
        hyper_by_step: dict[float, torch.Tensor] = {}
        for param, state, step in zip(matrices, states, steps):
            step = float(step)
            hyper = hyper_by_step.get(step)
            if hyper is None:
                hyper = hyper_by_step[step] = torch.tensor(
                    [
                        group["lr"],
                        group["weight_decay"],
                        beta1,
                        beta2,
                        group["eps"],
                        1 - beta1**step,
                        math.sqrt(1 - beta2**step),
                        inv_grad_scale,
                    ],
                    dtype=torch.float32,
                    device=param.device,
                )
            tensors = [param.detach(), state["master"], param.grad, state["exp_avg"], state["exp_avg_sq"]]
            flat = [_memory_order(tensor) for tensor in tensors]
            # `is not None`, not `None not in flat`, which compares each tensor with None (~25 us a tensor).
            if all(view is not None for view in flat) and len({tensor.stride() for tensor in tensors}) == 1:
                _compiled_update_and_round(*flat, hyper)
            else:  # a gradient laid out unlike its weight, or another layout: the same update, by torch's ops
                _adamw_update_and_round(*tensors, hyper)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """`torch.optim.Optimizer.load_state_dict`, keeping the master weights and moments in fp32 (torch casts an
        optimizer's state to its parameters' dtype), then the model's weights set to the loaded master weights."""
        params = self._parameters()
        dtypes = [param.dtype for param in params]
        for param in params:  # the cast follows the parameters' dtype: fp32 while loading
            param.data = param.data.float()
        super().load_state_dict(state_dict)
        for param, dtype in zip(params, dtypes):
            state = self.state[param]
            if param.ndim >= 2 and "master" not in state:  # e.g. saved by a run with --master_weights off
                logger.warning(
                    f"The loaded optimizer state has no master weight for a {tuple(param.shape)} weight: it starts "
                    "from the model's current values."
                )
                state["master"] = param.detach().clone()
            param.data = state.get("master", param.data).to(dtype)

    def restore_fp32_parameters(self) -> None:
        """Puts the fp32 master weights back into the model, each parameter fp32 again: for saving and evaluating the
        trained model. The optimizer cannot step after this."""
        for param in self._parameters():
            master = self.state[param].pop("master", None)
            if master is not None:
                param.data = master
        logger.info("Restored the fp32 master weights into the model.")
