"""The whole fusion step `cross_fusion` (crossvit_fast.ops.triton.cross_fusion: cls_proj ->
cross_attention -> cls_proj) against the reference op, forward and every gradient, plus the
launch count of one step (`cls_proj` alone: test_cls_proj.py).

CPU: Triton's interpreter at tiny widths; GPU tier: crossvit_18's fusion shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from crossvit_fast import backends
from crossvit_fast.backends import ClsProjParams, CrossAttentionParams, flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import utils
from crossvit_fast.ops.triton.cross_fusion import cross_fusion as _triton_cross_fusion

from ..conftest import DEVICE
from ..numerics import assert_2x_rule
from . import KERNEL_BACKENDS, gpu_tier, served
from .test_cls_proj import EPS, check, rand64, run

# cls, tokens, then FusionParams' 18 leaves: proj_*, the attention's (its norm and proj as
# attn_*; wq, bq, ... as they are), revert_*
FUSION = (
    "cls",
    "tokens",
    *(f"proj_{k}" for k in ClsProjParams._fields),
    *(f"attn_{k}" if k.startswith(("norm_", "proj_")) else k for k in CrossAttentionParams._fields),
    *(f"revert_{k}" for k in ClsProjParams._fields),
)


triton_cross_fusion = flat_args("cross_fusion", _triton_cross_fusion)
ref_cross_fusion = flat_args("cross_fusion", reference.cross_fusion)


def fusion_inputs(B, N, c_i, c_j, *, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "cls": rand64(g, B, c_i) + rand64(g, c_i),
        "tokens": rand64(g, B, N + 1, c_j) * (0.5 + rand64(g, c_j).abs()) + rand64(g, c_j),
    }
    for pre, c_in, c_out in (("proj", c_i, c_j), ("revert", c_j, c_i)):
        t[f"{pre}_norm_weight"] = 1 + 0.3 * rand64(g, c_in)
        t[f"{pre}_norm_bias"] = 0.3 * rand64(g, c_in)
        t[f"{pre}_weight"] = rand64(g, c_out, c_in, scale=c_in**-0.5)
        t[f"{pre}_bias"] = 0.3 * rand64(g, c_out)
    t["attn_norm_weight"] = 1 + 0.3 * rand64(g, c_j)
    t["attn_norm_bias"] = 0.3 * rand64(g, c_j)
    for w, b, s in (
        ("wq", "bq", 2.0),
        ("wk", "bk", 2.0),
        ("wv", "bv", 1.0),
        ("attn_proj_weight", "attn_proj_bias", 1.0),
    ):
        t[w] = rand64(g, c_j, c_j, scale=s * c_j**-0.5)
        t[b] = 0.3 * rand64(g, c_j)
    return t


# -- cross_fusion -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B,N,c_i,c_j,H",
    [
        (3, 20, 32, 64, 4),  # widening (branch 0 -> 1), one program per sample
        (1, 197, 48, 24, 3),  # narrowing, batch 1: the token pass splits and merges
        (2, 0, 16, 32, 2),  # no patch tokens: the CLS attends to itself
    ],
)
def test_cross_fusion_fp32(backend, B, N, c_i, c_j, H):
    impl = flat_args("cross_fusion", served(backend, "cross_fusion"))
    check(
        impl,
        ref_cross_fusion,
        FUSION,
        fusion_inputs(B, N, c_i, c_j),
        torch.float32,
        (B, c_i),
        H,
        EPS,
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_fusion_half_precision(backend, dtype):
    impl = flat_args("cross_fusion", served(backend, "cross_fusion"))
    check(
        impl, ref_cross_fusion, FUSION, fusion_inputs(4, 30, 32, 64, seed=1), dtype, (4, 32), 4, EPS
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cross_fusion_autocast(backend):
    impl = flat_args("cross_fusion", served(backend, "cross_fusion"))
    inputs = fusion_inputs(3, 12, 32, 64, seed=2)
    grad_out = torch.randn(3, 32, dtype=torch.float64, device=DEVICE)
    out64, g64 = run(ref_cross_fusion, FUSION, inputs, torch.float64, grad_out, 4, EPS)
    out_t, g_t = run(
        ref_cross_fusion, FUSION, inputs, torch.float32, grad_out, 4, EPS, autocast=True
    )
    out, grads = run(impl, FUSION, inputs, torch.float32, grad_out, 4, EPS, autocast=True)
    assert out.dtype == out_t.dtype == torch.bfloat16
    assert_2x_rule(out.float(), out_t.float(), out64, "out", floor=8e-3)
    top = max(g.abs().max().item() for g in g64.values())
    for k, g in grads.items():
        assert g.dtype == torch.float32, k
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", floor=8e-3, scale=top)


def test_cross_fusion_compile_fullgraph():
    inputs = fusion_inputs(4, 9, 32, 64)
    grad_out = torch.randn(4, 32, dtype=torch.float64, device=DEVICE)
    compiled = torch.compile(triton_cross_fusion, fullgraph=True, backend="aot_eager")
    out_c, g_c = run(compiled, FUSION, inputs, torch.float32, grad_out, 4, EPS)
    out_e, g_e = run(triton_cross_fusion, FUSION, inputs, torch.float32, grad_out, 4, EPS)
    torch.testing.assert_close(out_c, out_e)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k])


def test_backend_table_serves_fusion_ops():
    ops = backends.resolve("triton", torch.device(DEVICE).type)
    for op in ("cls_proj", "cross_attention", "cross_fusion"):
        assert ops.sources[op] == "triton", op


# Ops that launch no kernel on the GPU (views, allocation, metadata, dispatch wrappers).
_NO_LAUNCH = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::view",
    "aten::t",
    "aten::transpose",
    "aten::as_strided",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::expand",
    "aten::permute",
    "aten::select",
    "aten::slice",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::detach",
    "aten::alias",
    "aten::_unsafe_view",
    "aten::unbind",
    "aten::split",
    "aten::to",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::resize_",
    # composites whose inner ops are counted instead
    "aten::matmul",
    "aten::linear",
    "aten::layer_norm",
    "aten::softmax",
    "aten::contiguous",
    "aten::clone",
    "aten::_to_copy",
    "aten::dropout",
}


class _Recorder:
    """Stands in for `wrap_triton(kernel)`: `[grid](*args)` records the launch, runs nothing."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append(self.kernel)


def _count_launches(fn, inputs, num_heads, monkeypatch):
    """(forward, backward) kernel launches of one call: Triton launches (counted at the one
    launcher's `wrap_triton`, not run) + outermost aten ops that launch a kernel on the GPU."""
    triton_launches = []
    monkeypatch.setattr(utils, "wrap_triton", lambda kernel: _Recorder(kernel, triton_launches))

    def aten_ops(prof):
        def nested(e):
            p = e.cpu_parent
            while p is not None:
                if p.name.startswith("aten::") and p.name not in _NO_LAUNCH:
                    return True
                p = p.cpu_parent
            return False

        return [
            e.name
            for e in prof.events()
            if e.name.startswith("aten::") and e.name not in _NO_LAUNCH and not nested(e)
        ]

    leaves = [v.float().requires_grad_() for v in (inputs[k] for k in FUSION)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn(*leaves, num_heads, EPS)
    fwd = len(triton_launches) + len(aten_ops(prof))
    triton_launches.clear()
    grad = torch.ones_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    return fwd, len(triton_launches) + len(aten_ops(prof))


def test_launch_count(monkeypatch):
    # One fusion step at a batch that needs no token split (B >= #SMs; 4 in the interpreter):
    # forward 4 Triton + 7 cuBLAS/elementwise launches (one of them the (B, C) copy that merges
    # the heads of o), backward 4 Triton + 17 (8 GEMMs, 4 batched GEMMs, 3 partial sums, 1 memset,
    # the (B, C) head merge of dq). The reference is counted the same way; all its launches
    # but a few touch the whole (B, N, C) token tensor, ours only 2 (Triton) of each pass.
    inputs = fusion_inputs(8, 20, 32, 64)
    ours = _count_launches(triton_cross_fusion, inputs, 4, monkeypatch)
    ref = _count_launches(ref_cross_fusion, inputs, 4, monkeypatch)
    print(f"\nlaunches of one fusion step (fwd, bwd): triton {ours}, reference {ref}")
    assert ours == (11, 21)
    assert ref[0] >= 18 and ref[1] >= 35  # (20, 38) with torch 2.13


# -- GPU tier ---------------------------------------------------------------------------------------


@gpu_tier([torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "B,N,c_i,c_j,H",
    [
        (64, 196, 224, 448, 7),
        (64, 400, 448, 224, 7),
        (1, 576, 384, 768, 12),
        (256, 196, 192, 384, 6),
    ],
)
def test_gpu_cross_fusion_real_shapes(backend, B, N, c_i, c_j, H, dtype):
    # crossvit_18 (both directions), crossvit_base-like at 577 tokens (batch 1), crossvit_15
    impl = flat_args("cross_fusion", served(backend, "cross_fusion"))
    check(impl, ref_cross_fusion, FUSION, fusion_inputs(B, N, c_i, c_j), dtype, (B, c_i), H, EPS)


@pytest.mark.gpu
def test_gpu_cross_fusion_inductor():
    inputs = fusion_inputs(16, 196, 224, 448)
    grad_out = torch.randn(16, 224, dtype=torch.float64, device=DEVICE)
    compiled = torch.compile(triton_cross_fusion, fullgraph=True)
    out_c, g_c = run(compiled, FUSION, inputs, torch.bfloat16, grad_out, 7, EPS)
    out_e, g_e = run(triton_cross_fusion, FUSION, inputs, torch.bfloat16, grad_out, 7, EPS)
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=5e-2, atol=5e-2)
