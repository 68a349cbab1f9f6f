"""`cast_params` (autocast's casts of the GEMM parameters, once per forward), per backend: the
same values and gradients as per-tensor casts, and the model's outputs and gradients unchanged
by batching them (bitwise)."""

from __future__ import annotations

import pytest
import torch

from crossvit_fast import CrossViT
from crossvit_fast.backends import resolve

from ..conftest import DEVICE, tiny_config

BACKENDS = ["reference", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_values_and_gradients_match_per_tensor_casts(backend, dtype):
    cast_params = resolve(backend, DEVICE).cast_params
    params = [
        torch.randn(5, 3, device=DEVICE, requires_grad=True),
        torch.randn(7, device=DEVICE, requires_grad=True),
        torch.randn(2, 2, 2, device=DEVICE, requires_grad=True),
    ]
    out = cast_params(params, dtype)
    assert [o.shape for o in out] == [p.shape for p in params]
    assert all(
        o.dtype == dtype and torch.equal(o, p.detach().to(dtype)) for o, p in zip(out, params)
    )
    # the last output unused: its parameter's gradient is zero, the others the cast-back grads
    weights = [torch.randn(p.shape, device=DEVICE, dtype=dtype) for p in params[:2]]
    sum((o * w).float().sum() for o, w in zip(out, weights)).backward()
    for p, w in zip(params[:2], weights):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, w.float())
    assert params[2].grad is None or torch.count_nonzero(params[2].grad) == 0


def test_triton_rejects_mixed_inputs():
    cast_params = resolve("triton", "cpu").cast_params
    assert cast_params([], torch.bfloat16) == []
    with pytest.raises(ValueError, match="one device and dtype"):
        cast_params([torch.randn(2), torch.randn(2, dtype=torch.float64)], torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_under_autocast_is_unchanged_by_batching(backend, monkeypatch):
    torch.manual_seed(0)
    model = CrossViT(tiny_config(), backend=backend).to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = run()
    monkeypatch.setattr(CrossViT, "_bind_casts", lambda self, ops, x: ops)  # per-use casts
    out_ref, grads_ref = run()
    assert torch.equal(out, out_ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


def test_triton_one_launch_each_way():
    """The docstring's claim: all the casts in one launch forward and one backward."""
    from crossvit_fast.cost import Ledger

    cast_params = resolve("triton", DEVICE).cast_params
    params = [torch.randn(4, 3, device=DEVICE, requires_grad=True) for _ in range(5)]
    fwd, bwd = Ledger(), Ledger()
    with fwd:
        out = cast_params(params, torch.bfloat16)
    grads = [torch.ones_like(o) for o in out]
    with bwd:
        torch.autograd.backward(out, grads)
    assert [e.name for e in fwd.entries] == ["aten::cat"]
    assert [e.name for e in bwd.entries] == ["aten::cat"]
    assert all(p.grad.dtype == torch.float32 for p in params)
