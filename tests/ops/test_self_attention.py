"""Triton `self_attention` op (LayerNorm fused into the qkv GEMM, torch SDPA, proj GEMM with the
residual in its epilogue) and its two registered GEMM ops, against the reference.

Interpreter-sized shapes on CPU; the 2x-of-PyTorch rule (tests/numerics.py) for the output and
every gradient. Head dims 8..128 and 3 / 7 heads on purpose (CrossViT-18 has 7 heads).
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import self_attention as tsa

from ..conftest import DEVICE
from ..numerics import assert_2x_rule, check_against_reference
from . import KERNEL_BACKENDS, assert_compiles_like_eager, gpu_tier, opcheck_backward, served

triton_self_attention = flat_args("self_attention", tsa.self_attention)
ref_self_attention = flat_args("self_attention", reference.self_attention)

EPS = 1e-6


def attn_inputs(B, N, C, *, affine=True, bias=True, device=DEVICE):
    """float64 (x, norm_w, norm_b, qkv_w, qkv_b, proj_w, proj_b)."""
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float64)
    return [
        r(B, N, C) * 2 + 0.5,
        r(C) * 0.3 + 1 if affine else None,
        r(C) * 0.1 if affine else None,
        r(3 * C, C) * C**-0.5,
        r(3 * C) * 0.1 if bias else None,
        r(C, C) * C**-0.5,
        r(C) * 0.1 if bias else None,
    ]


def _fn(op, heads, residual=True):
    return lambda *a: op(*a, heads, EPS, residual)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B, N, C, heads, residual, affine, bias",
    [
        (2, 5, 32, 4, True, True, True),  # head dim 8
        (1, 7, 96, 3, True, True, False),  # width 96 (32k, not 64k), 3 heads of 32, no qkv bias
        (1, 2, 56, 7, False, True, True),  # 7 heads of 8, two tokens
        (1, 1, 128, 1, True, False, True),  # one token, head dim 128, no LayerNorm affine
        (1, 197, 64, 1, True, True, True),  # 197 tokens, head dim 64
    ],
)
def test_self_attention_fp32(backend, B, N, C, heads, residual, affine, bias):
    impl = flat_args("self_attention", served(backend, "self_attention"))
    inputs = attn_inputs(B, N, C, affine=affine, bias=bias)
    check_against_reference(
        _fn(impl, heads, residual),
        _fn(ref_self_attention, heads, residual),
        inputs,
        torch.float32,
        name="self_attention",
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_self_attention_16bit(backend, dtype):
    impl = flat_args("self_attention", served(backend, "self_attention"))
    inputs = attn_inputs(2, 5, 96, bias=True)
    check_against_reference(
        _fn(impl, 3),
        _fn(ref_self_attention, 3),
        inputs,
        dtype,
        name="self_attention",
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_self_attention_autocast_dtype(backend, x_dtype, residual):
    impl = flat_args("self_attention", served(backend, "self_attention"))
    inputs = attn_inputs(2, 3, 32)
    x = inputs[0].to(x_dtype)
    params = [p.float().requires_grad_() for p in inputs[1:]]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        ours = impl(x, *params, 4, EPS, residual)
        ref = ref_self_attention(x, *params, 4, EPS, residual)
    assert ours.dtype == ref.dtype
    ref64 = ref_self_attention(x.double(), *[p.double() for p in params], 4, EPS, residual)
    assert_2x_rule(ours, ref, ref64, "autocast self_attention")
    (g,) = torch.autograd.grad(ours.float().sum(), params[2])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_self_attention_batch0_and_noncontiguous():
    params = [p.float() for p in attn_inputs(1, 1, 32)[1:]]
    x0 = torch.randn(0, 5, 32, device=DEVICE, requires_grad=True)
    out = triton_self_attention(x0, *params, 4, EPS)
    assert out.shape == (0, 5, 32)
    out.sum().backward()
    assert x0.grad.shape == x0.shape
    x = torch.randn(5, 2, 32, device=DEVICE).transpose(0, 1)  # (2, 5, 32), non-contiguous
    torch.testing.assert_close(
        triton_self_attention(x, *params, 4, EPS),
        ref_self_attention(x, *params, 4, EPS),
        rtol=1e-5,
        atol=1e-5,
    )


def test_self_attention_errors():
    x, nw, nb, wqkv, bqkv, wp, bp = [t.float() for t in attn_inputs(1, 3, 32)]
    with pytest.raises(ValueError, match="num_heads"):
        triton_self_attention(x, nw, nb, wqkv, bqkv, wp, bp, 5, EPS)
    with pytest.raises(ValueError, match="qkv_weight: expected shape"):
        triton_self_attention(x, nw, nb, wqkv[:32], bqkv, wp, bp, 4, EPS)
    with pytest.raises(ValueError, match="x: expected 3 dims"):
        triton_self_attention(x[0], nw, nb, wqkv, bqkv, wp, bp, 4, EPS)
    with pytest.raises(ValueError, match="proj_weight: expected dtype"):
        triton_self_attention(x, nw, nb, wqkv, bqkv, wp.half(), bp, 4, EPS)
    with pytest.raises(ValueError, match="proj_bias: expected a tensor on"):
        triton_self_attention(x, nw, nb, wqkv, bqkv, wp, bp.to("meta"), 4, EPS)


def test_self_attention_op_and_backward_opcheck():
    x, nw, nb, wqkv, bqkv, wp, bp = [t.float() for t in attn_inputs(2, 3, 32)]
    x.requires_grad_()
    wqkv.requires_grad_()
    args = (x, nw, nb, wqkv, bqkv, wp, bp, 4, EPS, True, True)
    torch.library.opcheck(torch.ops.crossvit_fast.self_attention.default, args)
    _, mean, rstd, xhat, qkv, o, saved = torch.ops.crossvit_fast.self_attention(*args)
    dout = torch.randn(2, 3, 32, device=DEVICE)
    bargs = (
        dout,
        x.detach(),
        nw,
        nb,
        wqkv.detach(),
        wp,
        mean,
        rstd,
        xhat,
        qkv,
        o,
        saved,
        4,
        True,
        [True] * 6,
    )
    opcheck_backward("self_attention", bargs)


def test_self_attention_backward_adds_no_autograd_traffic():
    """The module docstring's claims: autograd stacks / clones no q, k, v gradient and adds no
    residual gradient (the op's backward reads them in place and adds inside LayerNorm's)."""
    from crossvit_fast.cost import Ledger

    inputs = [t.float().requires_grad_() if t is not None else None for t in attn_inputs(2, 5, 32)]
    out = triton_self_attention(*inputs, 4, EPS)
    rec = Ledger()
    rec.phase = "backward"
    with rec:
        out.backward(torch.randn_like(out))
    names = {e.name for e in rec.entries}
    assert not names & {"aten::stack", "aten::clone", "aten::add", "aten::cat"}, names


def test_self_attention_no_save_and_segmented_dgrad():
    """Inference keeps nothing for backward; the q / k / v K-segments GEMM equals the GEMM of
    their concatenation."""
    x, nw, nb, wqkv, bqkv, wp, bp = [t.float() for t in attn_inputs(1, 3, 32)]
    out, _, _, xhat, qkv, o, saved = torch.ops.crossvit_fast.self_attention(
        x, nw, nb, wqkv, bqkv, wp, bp, 4, EPS, True, False
    )
    assert out.shape == x.shape and xhat.numel() == qkv.numel() == o.numel() == 0
    assert all(t.numel() == 0 for t in saved)
    from crossvit_fast.ops.triton.gemm import fused_linear, sum_rows

    segs = [torch.randn(5, 16, device=DEVICE).t().contiguous().t() for _ in range(3)]
    w = torch.randn(48, 8, device=DEVICE)
    got, want = torch.empty(5, 8, device=DEVICE), torch.cat(segs, 1) @ w
    asum = torch.zeros(sum_rows(5), 48, device=DEVICE)
    fused_linear(tuple(segs), w, got, transpose_w=False, a_sum=asum)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(asum.sum(0), torch.cat(segs, 1).sum(0))
    with pytest.raises(ValueError, match="segments"):
        fused_linear((segs[0], segs[1][:4]), w[:32], got, transpose_w=False)


def test_self_attention_torch_compile():
    inputs = [t.float().requires_grad_() for t in attn_inputs(1, 3, 32)]
    assert_compiles_like_eager(lambda *a: triton_self_attention(*a, 4, EPS), inputs, inputs[3])


# -- GPU tier ------------------------------------------------------------------------------------


@gpu_tier()
@pytest.mark.parametrize(
    "C, heads, N", [(224, 7, 401), (448, 7, 197), (192, 3, 401), (768, 12, 197)]
)
def test_self_attention_gpu_real_shapes(backend, dtype, C, heads, N):
    impl = flat_args("self_attention", served(backend, "self_attention"))
    inputs = attn_inputs(4, N, C, device="cuda")
    check_against_reference(
        _fn(impl, heads),
        _fn(ref_self_attention, heads),
        inputs,
        dtype,
        name="attn",
    )


@pytest.mark.gpu
def test_self_attention_gpu_inductor():
    inputs = [t.float().requires_grad_() for t in attn_inputs(4, 197, 448, device="cuda")]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(lambda *a: triton_self_attention(*a, 7, EPS), fullgraph=True)(*inputs)
        ref = ref_self_attention(*inputs, 7, EPS)
    assert out.dtype == ref.dtype
    ref64 = ref_self_attention(*[t.double() for t in inputs], 7, EPS)
    assert_2x_rule(out, ref, ref64, "compiled autocast self_attention")
    out.sum().backward()
    assert torch.isfinite(inputs[3].grad).all()


@pytest.mark.gpu
def test_self_attention_gpu_opcheck():
    """On a GPU the ops decompose into their kernels under torch.compile (wrap_triton)."""
    x, nw, nb, wqkv, bqkv, wp, bp = [
        t.to(torch.bfloat16) for t in attn_inputs(2, 197, 96, device="cuda")
    ]
    x.requires_grad_()
    torch.library.opcheck(
        torch.ops.crossvit_fast.self_attention.default,
        (x, nw, nb, wqkv, bqkv, wp, bp, 3, EPS, True, True),
    )
