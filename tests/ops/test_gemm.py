"""The shared GEMM launcher (crossvit_fast/ops/triton/gemm.py): its two plans against each other
and against float64, and the resident plan inside the block ops.

The resident kernel runs where there is at least one 128-row block per SM, so these cases use
128 blocks per SM plus 8 rows (a partial last block): 520 rows on the interpreter's 4 pretend
SMs, 16,904 on an H100. K = 96 and 224 pad to 128 / 256 (masked K columns), N = 200 ends in a
partial 32-wide slab.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from crossvit_fast.backends import flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import gemm, mlp, self_attention, utils

from ..conftest import DEVICE
from ..numerics import assert_2x_rule, check_against_reference

M = 128 * utils.sm_count(torch.device(DEVICE)) + 8


@contextlib.contextmanager
def _forced_plan(resident: bool):
    """Inside: fused_linear takes the resident (True) or the tiled plan; yields the list of what
    the real plan rule said for each call (a case must be one the resident plan takes)."""
    chosen: list[bool] = []
    real = gemm.resident_plan
    gemm.resident_plan = lambda *a: chosen.append(real(*a)) or (resident and chosen[-1])
    try:
        yield chosen
    finally:
        gemm.resident_plan = real


def _run(resident: bool, *args, **kw):
    """fused_linear under the resident or the tiled plan; asserts the case is a resident one."""
    with _forced_plan(resident) as chosen:
        gemm.fused_linear(*args, **kw)
    assert chosen == [True], "the case must be one the resident plan takes"


def _r(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)


@pytest.mark.parametrize("K", [96, 224])
def test_forward_gelu_bias(K):
    # fc1: bf16 A and W, bias, GELU with the pre-activation stored (aux)
    N, dt = 200, torch.bfloat16
    a, w, b = _r(M, K, dtype=dt), _r(N, K, dtype=dt) * K**-0.5, _r(N, dtype=dt) * 0.1
    outs = {}
    for resident in (True, False):
        h, pre = (
            torch.empty(M, N, dtype=dt, device=DEVICE),
            torch.empty(M, N, dtype=dt, device=DEVICE),
        )
        _run(resident, a, w, h, transpose_w=True, bias=b, aux=pre, gelu=gemm.GELU_FWD)
        outs[resident] = (h, pre)
    pre64 = a.double() @ w.double().t() + b.double()
    pre_dt = torch.addmm(b.float(), a.float(), w.float().t()).to(dt)  # fp32 accumulation
    for resident, (h, pre) in outs.items():
        assert_2x_rule(pre, pre_dt, pre64, f"pre-activation (resident={resident})")
        h_dt = torch.nn.functional.gelu(pre.float()).to(dt)
        # GELU of its own pre-activation, to one bf16 ulp (the erf implementations differ)
        torch.testing.assert_close(h, h_dt, rtol=8e-3, atol=1e-4)
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("a_out", [True, False])
def test_dgrad_fp32_a_with_sums(a_out):
    # fc2's dgrad: fp32 dy as A (rounded through a 16-bit copy), W (K, N), GELU gradient
    # epilogue, A's and the output's column sums; without a_out the launcher's scratch copy.
    K, N, dt = 224, 200, torch.bfloat16
    dy, w, pre = _r(M, K, dtype=torch.float32), _r(K, N, dtype=dt) * K**-0.5, _r(M, N, dtype=dt)
    res = {}
    for resident in (True, False):
        da = torch.empty(M, N, dtype=dt, device=DEVICE)
        asum = torch.empty(gemm.sum_rows(M), K, device=DEVICE)
        csum = torch.empty(gemm.sum_rows(M), N, device=DEVICE)
        dy16 = torch.empty(M, K, dtype=dt, device=DEVICE) if a_out else None
        _run(
            resident, dy, w, da, transpose_w=False, aux=pre, gelu=gemm.GELU_BWD,
            a_sum=asum, c_sum=csum, a_out=dy16,
        )  # fmt: skip
        res[resident] = (da, asum.sum(0), csum.sum(0), dy16)
    dy_r = dy.to(dt)
    grad = torch.ops.aten.gelu_backward(
        torch.ones((), device=DEVICE, dtype=torch.float64), pre.double()
    )  # GELU'(pre)
    da64 = (dy_r.double() @ w.double()).to(dt).double() * grad
    da_dt = ((dy_r.float() @ w.float()).to(dt).float() * grad.float()).to(dt)
    for resident, (da, s_a, s_c, dy16) in res.items():
        assert_2x_rule(da, da_dt, da64, f"da (resident={resident})")
        torch.testing.assert_close(s_a, dy_r.float().sum(0), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(s_c, da.float().sum(0), rtol=1e-5, atol=1e-4)
        if a_out:
            assert torch.equal(dy16, dy_r)  # round to nearest even, as torch's cast


def test_forward_residual_fp32_out():
    # proj: bf16 A, bias, fp32 residual added in, fp32 output (the residual stream)
    K, N, dt = 96, 96, torch.bfloat16
    a, w, b, x = _r(M, K, dtype=dt), _r(N, K, dtype=dt) * K**-0.5, _r(N, dtype=dt), _r(M, N).float()
    outs = []
    for resident in (True, False):
        out = torch.empty(M, N, device=DEVICE)
        _run(resident, a, w, out, transpose_w=True, bias=b, res=x)
        outs.append(out)
    want64 = x.double() + a.double() @ w.double().t() + b.double()
    want_dt = x + torch.addmm(b.float(), a.float(), w.float().t()).to(dt).float()  # as eager
    for out in outs:
        assert_2x_rule(out, want_dt, want64, "proj output")


@pytest.mark.parametrize(
    "K, affine, x_dtype", [(224, True, torch.float32), (96, False, torch.bfloat16)]
)
def test_norm_linear_normalises_in_the_resident_kernel(K, affine, x_dtype):
    # fc1 with its LayerNorm: the resident kernel's own statistics (chunked, one pass) against
    # `layer_norm_fwd` + the tiled GEMM, and both against float64. x has a large mean (the
    # residual stream's) so that a careless one-pass variance would lose digits.
    from crossvit_fast.ops.triton.layer_norm import layer_norm_fwd

    N, dt, eps = 200, torch.bfloat16, 1e-6
    x = (_r(M, K) * 3 + 40).to(x_dtype)
    nw, nb = (_r(K) * 0.3 + 1, _r(K) * 0.1) if affine else (None, None)
    w, b = _r(N, K, dtype=dt) * K**-0.5, _r(N, dtype=dt) * 0.1
    got = {}
    for resident in (True, False):
        pre = torch.empty(M, N, dtype=dt, device=DEVICE)
        h = torch.empty(M, N, dtype=dt, device=DEVICE)
        nwf = nw.float() if affine else None
        nbf = nb.float() if affine else None
        with _forced_plan(resident) as chosen:
            xhat, mean, rstd = gemm.norm_linear(
                x, nwf, nbf, eps, w, h, bias=b, aux=pre, gelu=gemm.GELU_FWD
            )
        assert chosen[0], "the case must be one the resident plan takes"
        got[resident] = (xhat, mean, rstd, pre)
    x64 = x.double()
    mean64, var64 = x64.mean(1), x64.var(1, unbiased=False)
    y64 = (x64 - mean64[:, None]) / (var64[:, None] + eps).sqrt()
    if affine:
        y64 = y64 * nw + nb
    ref_y, ref_mean, ref_rstd = layer_norm_fwd(x, nw.float() if affine else None,
                                               nb.float() if affine else None, eps, dt)  # fmt: skip
    for resident, (xhat, mean, rstd, pre) in got.items():
        torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(rstd, ref_rstd, rtol=1e-5, atol=0)
        assert_2x_rule(xhat, ref_y, y64, f"LN(x) (resident={resident})")
        pre64 = xhat.double() @ w.double().t() + b.double()
        pre_dt = torch.addmm(b.float(), xhat.float(), w.float().t()).to(dt)
        assert_2x_rule(pre, pre_dt, pre64, f"pre-activation (resident={resident})")


@pytest.mark.parametrize(
    "K, affine, dx_dtype",
    [(224, True, torch.float32), (96, False, torch.float32), (96, True, torch.bfloat16)],
)
def test_dnorm_prologue_finishes_the_layer_norm_backward(K, affine, dx_dtype):
    # A dgrad whose A is dres + LayerNorm-backward(dn), made in its own prologue (the block op's
    # proj dgrad finishing the MLP's LayerNorm backward): dx, the rounded A, its column sums and
    # the dgamma / dbeta partial rows against torch's LayerNorm backward (fp32) and float64.
    from crossvit_fast.ops.triton.layer_norm import layer_norm_fwd

    N, dt, eps = 96, torch.bfloat16, 1e-6
    x = (_r(M, K) * 3 + 40).to(dx_dtype)
    nw, nb = (_r(K) * 0.3 + 1, _r(K) * 0.1) if affine else (None, None)
    dn, dres, w = _r(M, K, dtype=dt), _r(M, K).to(dx_dtype), _r(K, N, dtype=dt) * K**-0.5
    f32 = lambda t: t.float() if t is not None else None
    _, mean, rstd = layer_norm_fwd(x, f32(nw), f32(nb), eps, None)
    n = 2 if affine else 0
    dx = torch.empty(M, K, dtype=dx_dtype, device=DEVICE)
    a_out = torch.empty(M, K, dtype=dt, device=DEVICE) if dx_dtype != dt else None
    parts = torch.empty(gemm.sum_rows(M), max(n, 1) * K, device=DEVICE)
    a_sum = torch.empty(gemm.sum_rows(M), K, device=DEVICE)
    out = torch.empty(M, N, dtype=dt, device=DEVICE)
    dnorm = (x, f32(nw), f32(nb), mean, rstd, dres, dx, parts)
    with _forced_plan(True):
        gemm.fused_linear(dn, w, out, transpose_w=False, a_sum=a_sum, a_out=a_out, dnorm=dnorm)

    def ln_grads(dtype):
        leaf = lambda t: t.to(dtype, copy=True).requires_grad_()
        xs = leaf(x)
        ws, bs = (leaf(t) if affine else None for t in (nw, nb))
        y = torch.nn.functional.layer_norm(xs, (K,), ws, bs, eps)
        y.backward(dn.to(dtype))
        dxs = (xs.grad + dres.to(dtype)).to(dx_dtype if dtype != torch.float64 else dtype)
        return dxs, (ws.grad, bs.grad) if affine else ()

    (dx64, norm64), (dx32, norm32) = ln_grads(torch.float64), ln_grads(torch.float32)
    assert_2x_rule(dx, dx32, dx64, "dx")
    a = dx if a_out is None else a_out
    assert torch.equal(a, dx.to(dt))  # A: dx rounded to nearest even, as torch's cast
    torch.testing.assert_close(a_sum.sum(0), a.float().sum(0), rtol=1e-5, atol=1e-3)
    for got, want32, want64, name in zip(parts.sum(0).view(-1, K), norm32, norm64, "wb"):
        assert_2x_rule(got, want32, want64, f"dnorm {name}")
    out64 = a.double() @ w.double()
    assert_2x_rule(out, (a.float() @ w.float()).to(dt), out64, "dgrad")


def test_plan_choice():
    w16 = torch.empty(8, 96, dtype=torch.bfloat16, device=DEVICE)
    w32, a = torch.empty(8, 96, device=DEVICE), torch.empty(1, 1, device=DEVICE)
    assert gemm.resident_plan(M, 96, 1, w16, a)
    assert not gemm.resident_plan(M, 96, 1, w32, a)  # fp32 compute: the tiled kernel
    assert not gemm.resident_plan(M, 96, 3, w16, a)  # q / k / v segments
    assert not gemm.resident_plan(M, 1024, 1, w16, a)  # K over 512: A's rows do not fit
    assert not gemm.resident_plan(M - 136, 96, 1, w16, a)  # a row block short: tiled


@pytest.mark.parametrize("dtype, amp", [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
def test_block_ops_through_the_resident_plan(monkeypatch, dtype, amp):
    # mlp and self_attention at >= M rows (B x 260 tokens): fc1, fc2's dgrad, proj and its dgrad
    # take the resident plan; the 2x rule for the output and every gradient, bf16 and AMP.
    ran = []
    real = gemm.resident_plan
    monkeypatch.setattr(gemm, "resident_plan", lambda *a: ran.append(real(*a)) or ran[-1])
    C = 96
    r = lambda *s, scale=1.0: torch.randn(*s, dtype=torch.float64, device=DEVICE) * scale
    norm = [r(C, scale=0.3) + 1, r(C, scale=0.1)]
    lin = lambda o, i: [r(o, i, scale=i**-0.5), r(o, scale=0.1)]
    x = r(-(-M // 260), 260, C, scale=2) + 0.5
    cases = [
        ("mlp", mlp.mlp, [x, *norm, *lin(2 * C, C), *lin(C, 2 * C)], ()),
        ("self_attention", self_attention.self_attention, [x, *norm, *lin(3 * C, C), *lin(C, C)],
         (3,)),
    ]  # fmt: skip
    for op, ours, inputs, rest in cases:
        ran.clear()
        f = lambda impl, op=op, rest=rest: lambda *a: flat_args(op, impl)(*a, *rest, 1e-6)
        with torch.autocast(DEVICE, dtype=amp or torch.bfloat16, enabled=amp is not None):
            check_against_reference(f(ours), f(getattr(reference, op)), inputs, dtype, name=op)
        assert sum(ran) >= 2, f"{op}: the resident plan ran {sum(ran)} times"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,N", [(1, 1), (65, 33), (130, 96), (0, 5)])
def test_finish_sums(dtype, R, N):
    # The bias gradients' partial rows summed and cast in one launch: the 2x rule against
    # torch's sum(0).to(dtype) (fp64 sum as the reference); odd sizes, a partial row block.
    # Two buffers in the one launch (an op's bias sums and its LayerNorm's, other sizes and
    # dtypes), and one alone.
    part64 = torch.randn(R, N, dtype=torch.float64, device=DEVICE) * 3
    other64 = torch.randn(R + 3, 2 * N + 1, dtype=torch.float64, device=DEVICE)
    part, other = part64.float(), other64.float()
    ours, ours_other = utils.finish_sums((part, dtype), (other, torch.float32))
    alone, none = utils.finish_sums((part, dtype), (None, None))
    assert none is None and torch.equal(alone, ours)
    assert ours.dtype == dtype and ours.shape == (N,) and ours_other.dtype == torch.float32
    assert_2x_rule(ours, part.sum(0).to(dtype), part64.sum(0), "sums")
    assert_2x_rule(ours_other, other.sum(0), other64.sum(0), "other sums")
    if R == 0:
        assert torch.equal(ours, torch.zeros_like(ours))
