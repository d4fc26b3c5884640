"""master_weights: AdamW with fp32 master weights for a model that computes with bf16 weights."""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import make_tiny_model_and_processor
from torch import nn

import master_weights
from master_weights import MasterWeightsAdamW


class _Net(nn.Module):
    """Every kind of parameter the optimizer meets: a tied embedding / head, a channels_last convolution, a
    layer norm and biases."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv2d(3, 16, 3).to(memory_format=torch.channels_last)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight


def _grads(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """bf16-valued gradients laid out like their parameters (as autograd lays them out)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator)
        .to(torch.bfloat16)
        .float()
        .to(memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)
        for name, p in net.named_parameters()
    }


def _assign(net: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in net.named_parameters():
        p.grad = grads[name].to(p.dtype, copy=True)


def test_update_is_torch_adamw_on_the_master_weights():
    """Five steps (the last two with a clipping factor) against torch's AdamW on fp32 weights given the same
    gradients: the master weights agree to fp32 rounding and the model's weights are them rounded to bf16."""
    torch.manual_seed(0)
    reference = _Net()
    net = copy.deepcopy(reference)
    torch_adamw = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    ours = MasterWeightsAdamW(net.parameters(), lr=0.01, weight_decay=0.1)
    assert net.head.weight is net.embed.weight  # still tied: the same Parameter, now bf16
    dtypes = {name: p.dtype for name, p in net.named_parameters()}
    assert dtypes == {
        "embed.weight": torch.bfloat16,
        "conv.weight": torch.bfloat16,
        "conv.bias": torch.float32,
        "norm.weight": torch.float32,
        "norm.bias": torch.float32,
        "proj.weight": torch.bfloat16,
        "proj.bias": torch.float32,
    }
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for step in range(5):
        grads = _grads(reference, step)
        _assign(reference, grads)
        _assign(net, grads)
        if step >= 3:
            for p in reference.parameters():
                p.grad.div_(4.0)
            ours.grad_scale = torch.tensor(4.0)
        torch_adamw.step()
        ours.step()
    for (name, expected), p in zip(reference.named_parameters(), net.parameters()):
        master = ours.state[p].get("master", p)
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, expected.detach(), rtol=0, atol=2e-6, msg=name)
        if p.dtype == torch.bfloat16:
            assert torch.equal(p.detach(), master.to(torch.bfloat16)), name
    assert master_weights._compiled_update_and_round.compiled not in (None, False)  # the compiled pass ran


def test_compiled_pass_equals_torch_ops_and_odd_layouts_take_them():
    """The compiled update against the same function run by torch's ops; a gradient laid out unlike its weight
    takes torch's ops and gives the same update."""
    torch.manual_seed(1)
    shape = (64, 48)
    master = torch.randn(shape)
    grad = torch.randn(shape).to(torch.bfloat16)
    moments = (torch.rand(shape) * 0.1, torch.rand(shape) * 0.01)
    hyper = torch.tensor([1e-3, 0.01, 0.9, 0.999, 1e-8, 1 - 0.9**3, (1 - 0.999**3) ** 0.5, 0.5])
    results = []
    for update in (master_weights._compiled_update_and_round, master_weights._adamw_update_and_round):
        state = [master.clone(), moments[0].clone(), moments[1].clone()]
        weight = torch.empty(shape, dtype=torch.bfloat16)
        update(weight.view(-1), state[0].view(-1), grad.view(-1), state[1].view(-1), state[2].view(-1), hyper)
        results.append((weight, *state))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)

    layer = nn.Linear(48, 64)
    twin = copy.deepcopy(layer)
    optimizers = [MasterWeightsAdamW(m.parameters(), lr=0.01) for m in (layer, twin)]
    layer.weight.grad = grad.clone()
    twin.weight.grad = grad.t().contiguous().t()  # transposed strides
    layer.bias.grad = twin.bias.grad = torch.ones(64)
    for optimizer in optimizers:
        optimizer.step()
    torch.testing.assert_close(
        optimizers[1].state[twin.weight]["master"], optimizers[0].state[layer.weight]["master"]
    )


def test_checkpoint_keeps_the_fp32_master_weights_and_resumes_exactly():
    """`state_dict` holds the master weights in fp32 (torch would cast an optimizer's state to its parameters'
    bf16); a model and optimizer rebuilt from fp32 weights and loaded continue bit for bit."""
    torch.manual_seed(2)
    initial = _Net()
    net = copy.deepcopy(initial)
    optimizer = MasterWeightsAdamW(net.parameters(), lr=0.01)
    for step in range(3):
        _assign(net, _grads(net, step))
        optimizer.step()
    model_state, optimizer_state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    for step in range(3, 5):
        _assign(net, _grads(net, step))
        optimizer.step()

    resumed = copy.deepcopy(initial)
    resumed_optimizer = MasterWeightsAdamW(resumed.parameters(), lr=0.01)
    resumed.load_state_dict(model_state)
    resumed_optimizer.load_state_dict(optimizer_state)
    loaded = resumed_optimizer.state[resumed.embed.weight]["master"]
    assert loaded.dtype == torch.float32 and not torch.equal(loaded, loaded.to(torch.bfloat16).float())
    assert resumed.embed.weight.dtype == torch.bfloat16
    for step in range(3, 5):
        _assign(resumed, _grads(resumed, step))
        resumed_optimizer.step()
    for (name, expected), p in zip(net.named_parameters(), resumed.parameters()):
        assert torch.equal(p, expected), name
        assert torch.equal(
            resumed_optimizer.state[p].get("master", p), optimizer.state[expected].get("master", expected)
        )


def test_restore_fp32_parameters_ends_training():
    torch.manual_seed(3)
    net = _Net()
    optimizer = MasterWeightsAdamW(net.parameters(), lr=0.01)
    _assign(net, _grads(net, 0))
    optimizer.step()
    masters = {
        name: optimizer.state[p]["master"].clone() for name, p in net.named_parameters() if p.ndim >= 2
    }
    optimizer.restore_fp32_parameters()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    for name, p in net.named_parameters():
        if name in masters:
            assert torch.equal(p.detach(), masters[name]), name
    _assign(net, _grads(net, 1))
    with pytest.raises(RuntimeError, match="restore_fp32_parameters"):
        optimizer.step()


def test_bad_inputs_name_the_fix():
    with pytest.raises(ValueError, match="Build the optimizer before casting the model"):
        MasterWeightsAdamW(nn.Linear(4, 4).to(torch.bfloat16).parameters())
    with pytest.raises(ValueError, match="weight_dtype=torch.float32"):
        MasterWeightsAdamW(nn.Linear(4, 4).parameters(), weight_dtype=torch.float32)


def test_model_trains_like_fp32_weights_under_autocast():
    """The tiny XrayCap model, dropout off: three steps with bf16 weights + fp32 master weights against fp32
    weights under bf16 autocast. The first loss differs only by the embeddings' bf16 rounding; the residual
    stream stays fp32; the two runs move the weights the same way."""
    model, processor = make_tiny_model_and_processor(image_size=64)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    inputs = processor(
        images=[torch.rand(3, 64, 64), torch.rand(3, 64, 64)],
        text=["No acute disease.", "Small left pleural effusion. Heart size normal."],
        return_tensors="pt",
    )
    runs = {}
    for name, net, optimizer in (
        ("master", model, MasterWeightsAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)),
        (
            "fp32",
            reference,
            torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-3),
        ),
    ):
        net.train()
        seen, losses = [], []
        hook = net.language_model.transformer.h[0].register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append(args[0].dtype)
        )
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        hook.remove()
        assert set(seen) == {torch.float32}, (name, seen)
        runs[name] = losses
    assert runs["master"] == pytest.approx(runs["fp32"], rel=2e-3)
    # AdamW's first steps move each weight by about +-lr whatever its gradient's size, so weights whose gradient
    # is rounding noise (the key bias's is 0 in exact arithmetic) move at random in both runs: compare directions.
    updates = {"master": [], "fp32": []}
    for (name, p), q, start in zip(model.named_parameters(), reference.parameters(), initial.parameters()):
        if not p.requires_grad:
            continue
        ours, theirs = (p.detach().float() - start).flatten(), (q.detach() - start).flatten()
        updates["master"].append(ours)
        updates["fp32"].append(theirs)
        if p.ndim >= 2:
            assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.99, name
    together = [torch.cat(updates[name]) for name in ("master", "fp32")]
    assert torch.nn.functional.cosine_similarity(*together, dim=0) > 0.99


def test_state_without_master_weights_starts_them_from_the_model(caplog):
    """A state saved without master weights (an fp32-weights run) loads with a warning: the master weights start
    from the model's values, and training goes on."""
    torch.manual_seed(4)
    net = _Net()
    optimizer = MasterWeightsAdamW(net.parameters(), lr=0.01)
    state = optimizer.state_dict()
    for entry in state["state"].values():
        entry.pop("master", None)
    with caplog.at_level("WARNING", logger="master_weights"):
        optimizer.load_state_dict(state)
    assert "no master weight for a (50, 16) weight" in caplog.text
    master = optimizer.state[net.embed.weight]["master"]
    assert master.dtype == torch.float32 and torch.equal(master.to(torch.bfloat16), net.embed.weight.detach())
    _assign(net, _grads(net, 0))
    optimizer.step()
