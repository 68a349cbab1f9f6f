"""The `block` op (a whole ViT block, ops/triton/block.py) against the reference's composition.

Interpreter shapes as in test_mlp.py / test_self_attention.py. 520 rows (2 x 260 tokens) is one
128-row block per pretend SM plus a partial one: the resident plan runs, so the MLP's LayerNorm
backward is finished in the proj dgrad's prologue (asserted); fewer rows take the fallback
(`layer_norm_bwd` first). Both are held to the 2x rule for the output and every gradient.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import block_params, flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import block as tblock
from crossvit_fast.ops.triton import gemm

from ..conftest import DEVICE
from ..numerics import check_against_reference
from . import KERNEL_BACKENDS, assert_compiles_like_eager, gpu_tier, opcheck_backward, served

EPS = 1e-6
triton_block = flat_args("block", tblock.block)
ref_block = flat_args("block", reference.block)


def block_inputs(B, N, C, *, ratio=2, affine=True, bias=True, device=DEVICE):
    """float64 (x, the attention half's 6 parameters, the MLP half's 6) at timm-like scales."""
    r = lambda *s, scale=1.0: torch.randn(*s, dtype=torch.float64, device=device) * scale
    norm = lambda: [r(C, scale=0.3) + 1, r(C, scale=0.1)] if affine else [None, None]
    lin = lambda o, i: [r(o, i, scale=i**-0.5), r(o, scale=0.1) if bias else None]
    x = r(B, N, C, scale=2) + 0.5  # a residual stream with a non-zero mean
    return [x, *norm(), *lin(3 * C, C), *lin(C, C), *norm(), *lin(ratio * C, C), *lin(C, ratio * C)]


def _fn(impl, heads):
    return lambda *a: impl(*a, heads, EPS)


@pytest.fixture
def prologue_calls(monkeypatch):
    """The fused_linear calls that finished a LayerNorm backward in their prologue."""
    calls = []
    real = gemm.fused_linear
    monkeypatch.setattr(
        "crossvit_fast.ops.triton.gemm.fused_linear",
        lambda *a, **kw: calls.append(kw.get("dnorm") is not None) or real(*a, **kw),
    )
    return calls


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B, N, C, heads, affine, bias",
    [
        (2, 5, 32, 4, True, True),  # few rows: the LayerNorm backward runs first
        (1, 7, 96, 3, False, False),  # no LayerNorm affine, no biases
    ],
)
def test_block_fp32(backend, B, N, C, heads, affine, bias):
    impl = flat_args("block", served(backend, "block"))
    inputs = block_inputs(B, N, C, affine=affine, bias=bias)
    check_against_reference(
        _fn(impl, heads), _fn(ref_block, heads), inputs, torch.float32, name="block"
    )


@pytest.mark.parametrize(
    "dtype, amp, affine",
    [
        (torch.bfloat16, None, True),
        (torch.float32, torch.bfloat16, True),  # AMP: fp32 residual stream, bf16 GEMMs
        (torch.float32, torch.bfloat16, False),
        (torch.float16, None, True),
    ],
)
def test_block_resident_prologue(prologue_calls, dtype, amp, affine):
    inputs = block_inputs(2, 260, 32, affine=affine)
    with torch.autocast(DEVICE, dtype=amp or torch.bfloat16, enabled=amp is not None):
        check_against_reference(
            _fn(triton_block, 2), _fn(ref_block, 2), inputs, dtype, name="block"
        )
    assert any(prologue_calls), "the proj dgrad did not finish the MLP's LayerNorm backward"


def test_block_fallback_runs_no_prologue(prologue_calls):
    inputs = [t.to(torch.bfloat16) for t in block_inputs(2, 5, 32)]
    triton_block(*inputs, 4, EPS).float().sum()
    inputs = [t.requires_grad_() for t in inputs]
    triton_block(*inputs, 4, EPS).float().sum().backward()
    assert prologue_calls and not any(prologue_calls)
    assert all(t.grad is not None for t in inputs)


def test_block_frozen_parameters():
    # Only some gradients requested (frozen norms and biases): the rest come back None.
    inputs = [t.float() for t in block_inputs(2, 5, 32)]
    want = {0, 3, 5, 9, 11}  # x and the four weights
    for i in want:
        inputs[i].requires_grad_()
    triton_block(*inputs, 4, EPS).sum().backward()
    assert {i for i, t in enumerate(inputs) if t.grad is not None} == want


def test_block_errors():
    inputs = [t.float() for t in block_inputs(1, 3, 32)]
    with pytest.raises(ValueError, match="num_heads"):
        triton_block(*inputs, 5, EPS)
    bad = list(inputs)
    bad[9] = bad[9][:, :16]  # fc1 weight (Hd, C / 2)
    with pytest.raises(ValueError, match="fc1_weight"):
        triton_block(*bad, 4, EPS)
    with pytest.raises(ValueError, match="expected BlockParams"):
        tblock.block(inputs[0], tuple(inputs[1:7]), 4, EPS)
    with pytest.raises(ValueError, match="12 block parameters"):
        block_params(inputs[1:12])


def test_block_op_and_backward_opcheck():
    x, *params = [t.float() for t in block_inputs(2, 3, 32)]
    x.requires_grad_()
    params[2].requires_grad_()
    args = (x, *params, 4, EPS, True)
    torch.library.opcheck(torch.ops.crossvit_fast.block.default, args)
    _, x_mid, *saved, sdpa_saved = torch.ops.crossvit_fast.block(*args)
    n1w, n1b, wqkv, _, wp, _, n2w, n2b, w1, _, w2, _ = params
    dout = torch.randn(2, 3, 32, device=DEVICE)
    bargs = (
        dout, x.detach(), x_mid, n1w, n1b, wqkv.detach(), wp, n2w, n2b, w1, w2, *saved,
        sdpa_saved, 4, [True] * 12, [], False,
    )  # fmt: skip
    opcheck_backward("block", bargs)


def test_block_torch_compile():
    inputs = [t.float().requires_grad_() for t in block_inputs(1, 3, 32)]
    assert_compiles_like_eager(_fn(triton_block, 4), inputs, (inputs[0], inputs[3], inputs[9]))


# -- GPU tier ------------------------------------------------------------------------------------


@gpu_tier()
@pytest.mark.parametrize("C, heads, N", [(224, 7, 401), (448, 7, 197)])
def test_block_gpu_real_shapes(backend, dtype, C, heads, N):
    impl = flat_args("block", served(backend, "block"))
    inputs = block_inputs(64, N, C, ratio=3, device="cuda")
    check_against_reference(_fn(impl, heads), _fn(ref_block, heads), inputs, dtype, name="block")
