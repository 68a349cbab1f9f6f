"""Triton `cls_proj` and the whole fusion step `cross_fusion` (crossvit_fast.ops.triton.cls_proj,
.cross_fusion) against the reference ops, forward and every gradient, plus the launch count of one step.

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
from crossvit_fast.ops.triton.cls_proj import cls_proj as _triton_cls_proj
from crossvit_fast.ops.triton.cross_fusion import cross_fusion as _triton_cross_fusion

from ..conftest import DEVICE
from ..numerics import assert_2x_rule
from . import KERNEL_BACKENDS, gpu_tier, served

EPS = 1e-6
PROJ = ("x", "norm_weight", "norm_bias", "weight", "bias")
# cls, tokens, then FusionParams' 18 leaves: proj_*, the attention's (its norm and proj as
# attn_*; wq, bq, ... as they are), revert_*
FUSION = (
    "cls",
    "tokens",
    *(f"proj_{k}" for k in ClsProjParams._fields),
    *(f"attn_{k}" if k.startswith(("norm_", "proj_")) else k for k in CrossAttentionParams._fields),
    *(f"revert_{k}" for k in ClsProjParams._fields),
)


triton_cls_proj = flat_args("cls_proj", _triton_cls_proj)
ref_cls_proj = flat_args("cls_proj", reference.cls_proj)
triton_cross_fusion = flat_args("cross_fusion", _triton_cross_fusion)
ref_cross_fusion = flat_args("cross_fusion", reference.cross_fusion)


def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def proj_inputs(shape, c_out, *, bias=True, affine=True, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c_in = shape[-1]
    return {
        "x": _rand(g, *shape) * (0.5 + _rand(g, c_in).abs()) + _rand(g, c_in),
        "norm_weight": 1 + 0.3 * _rand(g, c_in) if affine else None,
        "norm_bias": 0.3 * _rand(g, c_in) if affine else None,
        "weight": _rand(g, c_out, c_in, scale=c_in**-0.5),
        "bias": 0.3 * _rand(g, c_out) if bias else None,
    }


def fusion_inputs(B, N, c_i, c_j, *, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t = {
        "cls": _rand(g, B, c_i) + _rand(g, c_i),
        "tokens": _rand(g, B, N + 1, c_j) * (0.5 + _rand(g, c_j).abs()) + _rand(g, c_j),
    }
    for pre, c_in, c_out in (("proj", c_i, c_j), ("revert", c_j, c_i)):
        t[f"{pre}_norm_weight"] = 1 + 0.3 * _rand(g, c_in)
        t[f"{pre}_norm_bias"] = 0.3 * _rand(g, c_in)
        t[f"{pre}_weight"] = _rand(g, c_out, c_in, scale=c_in**-0.5)
        t[f"{pre}_bias"] = 0.3 * _rand(g, c_out)
    t["attn_norm_weight"] = 1 + 0.3 * _rand(g, c_j)
    t["attn_norm_bias"] = 0.3 * _rand(g, c_j)
    for w, b, s in (
        ("wq", "bq", 2.0),
        ("wk", "bk", 2.0),
        ("wv", "bv", 1.0),
        ("attn_proj_weight", "attn_proj_bias", 1.0),
    ):
        t[w] = _rand(g, c_j, c_j, scale=s * c_j**-0.5)
        t[b] = 0.3 * _rand(g, c_j)
    return t


def run(fn, names, inputs, dtype, grad_out, *extra, autocast=False):
    """fn(*inputs in dtype, *extra) -> (output, {name: grad})."""
    leaves = {
        k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()
    }
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=autocast):
        out = fn(*(leaves[k] for k in names), *extra)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def check(fn_ours, fn_ref, names, inputs, dtype, out_shape, *extra):
    """2x-of-PyTorch rule for the output and every gradient; the floor is relative to the
    largest gradient of the op (small gradients inherit the rounding of large terms)."""
    grad_out = torch.randn(*out_shape, dtype=torch.float64, device=DEVICE)
    out64, g64 = run(fn_ref, names, inputs, torch.float64, grad_out, *extra)
    out_t, g_t = run(fn_ref, names, inputs, dtype, grad_out, *extra)
    out, grads = run(fn_ours, names, inputs, dtype, grad_out, *extra)
    assert out.dtype == dtype and out.shape == out64.shape
    assert_2x_rule(out, out_t, out64, "out")
    assert grads.keys() == g64.keys()
    top = max([g.abs().max().item() for g in g64.values() if g.numel()], default=0.0)
    for k, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[k].shape, k
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", scale=top)
    return grads


# -- cls_proj -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "shape,c_out",
    [
        ((3, 96), 192),  # crossvit_tiny's projs[0] widths (a multiple of 32, not 64)
        ((1, 16), 24),  # batch 1, narrowing to a width that is not a power of 2
        ((2, 5, 32), 48),  # (..., C_in): leading dims are flattened
        ((33, 64), 32),  # more rows than one program's tile: several partial rows
        ((0, 32), 64),  # batch 0: empty output, zero weight gradients
    ],
)
def test_cls_proj_fp32(backend, shape, c_out):
    impl = flat_args("cls_proj", served(backend, "cls_proj"))
    grads = check(
        impl,
        ref_cls_proj,
        PROJ,
        proj_inputs(shape, c_out),
        torch.float32,
        (*shape[:-1], c_out),
        EPS,
    )
    if shape[0] == 0:
        assert (grads["weight"] == 0).all() and (grads["norm_weight"] == 0).all()


@pytest.mark.parametrize("bias,affine", [(False, True), (True, False), (False, False)])
def test_cls_proj_optional_parts(bias, affine):
    inputs = proj_inputs((4, 32), 64, bias=bias, affine=affine)
    grads = check(triton_cls_proj, ref_cls_proj, PROJ, inputs, torch.float32, (4, 64), EPS)
    assert ("bias" in grads) == bias and ("norm_weight" in grads) == affine


def test_cls_proj_strided_rows():
    # the model passes y_i[:, 0]: rows with stride (1 + N) * C, read in place
    inputs = proj_inputs((3, 7, 32), 48)
    seq = inputs["x"].float().requires_grad_()
    args = [inputs[k].float() for k in PROJ[1:]]
    out = triton_cls_proj(seq[:, 0], *args, EPS)
    out.backward(torch.ones_like(out))
    seq_r = inputs["x"].float().requires_grad_()
    ref = ref_cls_proj(seq_r[:, 0], *args, EPS)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq.grad, seq_r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cls_proj_half_precision(backend, dtype):
    impl = flat_args("cls_proj", served(backend, "cls_proj"))
    check(impl, ref_cls_proj, PROJ, proj_inputs((6, 64), 96, seed=1), dtype, (6, 96), EPS)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cls_proj_autocast(backend):
    # timm under autocast: LayerNorm/GELU in fp32, the Linear in bf16 -> bf16 output
    impl = flat_args("cls_proj", served(backend, "cls_proj"))
    inputs = proj_inputs((4, 32), 64, seed=2)
    grad_out = torch.randn(4, 64, dtype=torch.float64, device=DEVICE)
    out64, g64 = run(ref_cls_proj, PROJ, inputs, torch.float64, grad_out, EPS)
    out_t, g_t = run(ref_cls_proj, PROJ, inputs, torch.float32, grad_out, EPS, autocast=True)
    out, grads = run(impl, PROJ, inputs, torch.float32, grad_out, EPS, autocast=True)
    assert out.dtype == out_t.dtype == torch.bfloat16
    assert_2x_rule(out.float(), out_t.float(), out64, "out", floor=8e-3)
    for k, g in grads.items():
        assert g.dtype == torch.float32
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", floor=8e-3)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"x": torch.randn(4, 32, dtype=torch.float64)}, "dtype"),
        ({"weight": torch.randn(64, 16)}, "weight: expected shape"),
        ({"weight": torch.randn(64)}, "weight: expected 2 dims"),
        ({"norm_weight": torch.randn(64)}, "norm_weight: expected shape"),
        ({"bias": torch.randn(32)}, "bias: expected shape"),
        ({"x": torch.tensor(1.0)}, "x: expected"),
        ({"bias": torch.randn(64, dtype=torch.bfloat16)}, "bias: expected dtype"),
    ],
)
def test_cls_proj_errors(changes, match):
    inputs = {k: v.float() for k, v in proj_inputs((4, 32), 64).items()}
    inputs.update({k: v.to(DEVICE) for k, v in changes.items()})
    with pytest.raises(ValueError, match=match):
        triton_cls_proj(*(inputs[k] for k in PROJ), EPS)


def test_cls_proj_opcheck():
    inputs = proj_inputs((3, 16), 24)
    args = [inputs[k].float().requires_grad_() for k in PROJ]
    torch.library.opcheck(torch.ops.crossvit_fast.cls_proj.default, (*args, EPS))
    d = [a.detach() for a in args]
    _, gelu = torch.ops.crossvit_fast.cls_proj(*d, EPS)
    torch.library.opcheck(
        torch.ops.crossvit_fast.cls_proj_backward.default,
        (torch.randn(3, 24, device=DEVICE), d[0], gelu, d[1], d[2], d[3], EPS, True),
    )


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
