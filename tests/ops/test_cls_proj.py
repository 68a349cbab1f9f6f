"""`cls_proj` (LayerNorm -> erf-GELU -> Linear on CLS rows: the fusion's projs / revert_projs)
on every kernel backend against the reference op, forward and every gradient; also the 2x-rule
helpers `run` / `check` that tests/ops/test_cross_fusion.py reuses.

CPU: Triton's interpreter (and the CUDA emulator build) at tiny widths.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton.cls_proj import cls_proj as _triton_cls_proj

from ..conftest import DEVICE
from ..numerics import assert_2x_rule
from . import KERNEL_BACKENDS, served

EPS = 1e-6
PROJ = ("x", "norm_weight", "norm_bias", "weight", "bias")

triton_cls_proj = flat_args("cls_proj", _triton_cls_proj)
ref_cls_proj = flat_args("cls_proj", reference.cls_proj)


def rand64(g, *shape, scale=1.0):
    """A float64 standard-normal tensor (times scale) from generator g, on the test device."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def proj_inputs(shape, c_out, *, bias=True, affine=True, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c_in = shape[-1]
    return {
        "x": rand64(g, *shape) * (0.5 + rand64(g, c_in).abs()) + rand64(g, c_in),
        "norm_weight": 1 + 0.3 * rand64(g, c_in) if affine else None,
        "norm_bias": 0.3 * rand64(g, c_in) if affine else None,
        "weight": rand64(g, c_out, c_in, scale=c_in**-0.5),
        "bias": 0.3 * rand64(g, c_out) if bias else None,
    }


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
        (
            torch.randn(3, 24, device=DEVICE),
            d[0],
            gelu,
            d[1],
            d[2],
            d[3],
            EPS,
            True,
            torch.bfloat16,
        ),
    )
