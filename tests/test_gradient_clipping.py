"""gradient_clipping: the chunked CPU norm, and clipping folded into the fused AdamW step."""

import pytest
import torch
from accelerate import Accelerator

import run_captioning
from gradient_clipping import clip_grad_norm_, total_grad_norm


def _params_and_grads(seed: int, grad_scale: float):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(300, 70), (70,), (2_500_000,)]  # the last spans 39 2**16-element chunks
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    grads = [torch.randn(s, generator=generator) * grad_scale for s in shapes]
    return params, grads


def _copy(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def test_total_grad_norm_is_exact_to_fp32():
    _, grads = _params_and_grads(0, 1e-3)
    grads.append(torch.randn(1000).to(torch.bfloat16))
    reference = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
    norm = total_grad_norm(grads)
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert abs(norm.item() / reference.item() - 1) < 1e-6
    assert total_grad_norm([]).item() == 0.0


@pytest.mark.parametrize("grad_scale", [1.0, 1e-6])  # clipped (norm ~1,600), and left alone (norm ~1.6e-3)
def test_clipping_folded_into_fused_adamw_equals_torch_clipping(grad_scale):
    """Three steps of torch's clip + fused AdamW against ours with the factor handed to the step."""
    params, _ = _params_and_grads(0, grad_scale)
    ours = _copy(params)
    torch_optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True)
    our_optimizer = torch.optim.AdamW(ours, lr=0.01, weight_decay=0.1, fused=True)
    for step in range(3):
        _, grads = _params_and_grads(step + 1, grad_scale)
        for p, q, g in zip(params, ours, grads):
            p.grad, q.grad = g.clone(), g.clone()
        exact = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        expected_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # torch's CPU norm: off by ~4e-5 here
        norm = clip_grad_norm_(ours, 1.0, our_optimizer)
        assert abs(norm.item() / exact - 1) < 1e-6
        torch.testing.assert_close(norm, expected_norm, rtol=1e-4, atol=0)
        clipped = expected_norm.item() > 1.0
        assert hasattr(our_optimizer, "grad_scale") == clipped  # handed to the step, not applied to .grad
        if clipped:
            assert torch.equal(ours[0].grad, grads[0])
        torch_optimizer.step()
        our_optimizer.step()
        assert not hasattr(our_optimizer, "grad_scale")  # used once
        for p, q in zip(params, ours):
            # The step wrote the clipped gradients back (torch's and ours differ by the norms' ~4e-5).
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5)


def test_clipping_without_a_fused_optimizer_rescales_the_gradients():
    params, grads = _params_and_grads(0, 1.0)
    ours = _copy(params)
    for p, q, g in zip(params, ours, grads):
        p.grad, q.grad = g.clone(), g.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer = torch.optim.AdamW(ours, lr=0.01, foreach=False)  # not fused: nothing to hand the factor to
    torch.testing.assert_close(clip_grad_norm_(ours, 1.0, optimizer), expected_norm, rtol=1e-4, atol=0)
    assert not hasattr(optimizer, "grad_scale")
    for p, q in zip(params, ours):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-9)


def test_run_captioning_clips_through_the_fused_step_behind_accelerate():
    accelerator = Accelerator(cpu=True)
    params, grads = _params_and_grads(0, 1.0)
    model = torch.nn.Module()
    model.weights = torch.nn.ParameterList(params)
    optimizer = accelerator.prepare(torch.optim.AdamW(params, lr=0.01, fused=True))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    expected = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
    norm = run_captioning.clip_gradients(accelerator, model, optimizer, 1.0)
    assert abs(norm.item() / expected - 1) < 1e-6
    inner = optimizer.optimizer
    torch.testing.assert_close(
        inner.grad_scale, torch.tensor(expected / 1.0, dtype=torch.float32), rtol=1e-5, atol=0
    )
    optimizer.step()
    assert not hasattr(inner, "grad_scale")
    clipped_norm = total_grad_norm([p.grad for p in params]).item()
    assert abs(clipped_norm - 1.0) < 1e-5


def test_total_grad_norm_of_bf16_gradients():
    """bf16 gradients (master-weights training) are squared and summed in fp32, compiled or not: within 1e-5 of
    the exact norm (fp32 partial sums), which clipping needs to a few percent at most."""
    import gradient_clipping

    generator = torch.Generator().manual_seed(5)
    grads = [torch.randn(s, generator=generator).to(torch.bfloat16) for s in ((2_500_000,), (300, 70), (7,))]
    reference = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
    assert abs(total_grad_norm(grads).item() / reference - 1) < 1e-5
    assert gradient_clipping._half_sum_of_squares.compiled not in (None, False)  # the compiled pass ran
    eager = (
        sum(gradient_clipping._chunked_sum_of_squares(g.reshape(-1)).double() for g in grads).sqrt().item()
    )
    assert abs(eager / reference - 1) < 1e-5


def test_clipping_folded_into_master_weights_adamw():
    """Clipping hands its factor to a MasterWeightsAdamW as to a fused AdamW: three clipped steps on bf16 gradients
    give torch's AdamW on the clipped fp32 values of the same gradients."""
    from master_weights import MasterWeightsAdamW

    params, _ = _params_and_grads(0, 1.0)
    ours = _copy(params)
    torch_optimizer = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    our_optimizer = MasterWeightsAdamW(ours, lr=0.01, weight_decay=0.1)
    for step in range(3):
        _, grads = _params_and_grads(step + 1, 1.0)
        grads = [g.to(q.dtype) for g, q in zip(grads, ours)]
        exact = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
        for p, q, g in zip(params, ours, grads):
            p.grad, q.grad = g.float() / exact, g.clone()
        norm = clip_grad_norm_(ours, 1.0, our_optimizer)
        assert abs(norm.item() / exact - 1) < 1e-5
        torch.testing.assert_close(our_optimizer.grad_scale, torch.tensor(exact), rtol=1e-5, atol=0)
        torch_optimizer.step()
        our_optimizer.step()
        assert not hasattr(our_optimizer, "grad_scale")
    for p, q in zip(params, ours):
        torch.testing.assert_close(our_optimizer.state[q].get("master", q), p.detach(), rtol=0, atol=2e-6)
