"""The Triton `mlp` op against the reference (crossvit_fast.ops.reference).

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1):
shapes stay tiny (each program instance costs milliseconds there) but keep the ones that break
kernels. fp32 and 16-bit results follow flash-attention's rule (tests/numerics.py): error
against a float64 reference <= 2x PyTorch's error in the same dtype + a small dtype floor, for
the output and every gradient. The `gpu` tier repeats this at CrossViT's real widths.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import mlp as tmlp

from ..conftest import DEVICE, HAS_GPU
from ..numerics import assert_2x_rule, check_against_reference
from . import KERNEL_BACKENDS, assert_compiles_like_eager, gpu_tier, opcheck_backward, served

triton_mlp = flat_args("mlp", tmlp.mlp)
ref_mlp = flat_args("mlp", reference.mlp)

EPS = 1e-6


def mlp_inputs(B, N, C, hidden, *, affine=True, bias=True, device=DEVICE):
    """float64 (x, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b) at timm-like scales."""
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float64)
    return [
        r(B, N, C) * 2 + 0.5,  # a residual stream with a non-zero mean
        r(C) * 0.3 + 1 if affine else None,
        r(C) * 0.1 if affine else None,
        r(hidden, C) * C**-0.5,
        r(hidden) * 0.1 if bias else None,
        r(C, hidden) * hidden**-0.5,
        r(C) * 0.1 if bias else None,
    ]


def _mlp_fn(op, residual):
    return lambda *a: op(*a, EPS, residual)


# -- mlp -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B, N, C, ratio, residual, affine, bias",
    [
        (2, 5, 32, 4, True, True, True),
        (1, 7, 96, 3, True, True, True),  # width 96: a multiple of 32, not of 64; ratio 3
        (2, 3, 224, 1, False, True, True),  # width 224 (crossvit_18 small branch), ratio 1
        (1, 1, 32, 4, True, False, False),  # one token; no LayerNorm affine, no biases
        (1, 197, 32, 1, True, True, True),  # 197 tokens: M not a multiple of any tile
        (1, 401, 32, 1, False, True, False),  # 401 tokens
    ],
)
def test_mlp_fp32(backend, B, N, C, ratio, residual, affine, bias):
    impl = flat_args("mlp", served(backend, "mlp"))
    inputs = mlp_inputs(B, N, C, C * ratio, affine=affine, bias=bias)
    check_against_reference(
        _mlp_fn(impl, residual),
        _mlp_fn(ref_mlp, residual),
        inputs,
        torch.float32,
        name="mlp",
    )


def test_mlp_1157_tokens_forward():
    # 1157 tokens (crossvit_*_408 small branch): many M tiles, forward only to stay fast.
    inputs = mlp_inputs(1, 1157, 32, 32)
    check_against_reference(
        _mlp_fn(triton_mlp, True), _mlp_fn(ref_mlp, True), inputs, torch.float32, grads=False
    )


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, N, C, ratio", [(2, 5, 32, 4), (1, 3, 96, 3)])
def test_mlp_16bit(backend, dtype, B, N, C, ratio):
    impl = flat_args("mlp", served(backend, "mlp"))
    inputs = mlp_inputs(B, N, C, C * ratio)
    check_against_reference(_mlp_fn(impl, True), _mlp_fn(ref_mlp, True), inputs, dtype, name="mlp")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_mlp_autocast_dtype(backend, x_dtype, residual):
    """Under autocast the output dtype (and its gradients' dtypes) equal the reference's; values
    by the 2x rule against the reference run under the same autocast."""
    impl = flat_args("mlp", served(backend, "mlp"))
    inputs = mlp_inputs(2, 3, 32, 64)
    x = inputs[0].to(x_dtype)
    params = [p.float().requires_grad_() if p is not None else None for p in inputs[1:]]
    dev = torch.device(DEVICE).type
    with torch.autocast(dev, dtype=torch.bfloat16):
        ours = impl(x, *params, EPS, residual)
        ref = ref_mlp(x, *params, EPS, residual)
    assert ours.dtype == ref.dtype
    ref64 = ref_mlp(x.double(), *[p.double() for p in params], EPS, residual)
    assert_2x_rule(ours.to(ref.dtype), ref, ref64, "autocast mlp")
    (g_ours,) = torch.autograd.grad(ours.float().sum(), params[3])
    (g_ref,) = torch.autograd.grad(ref.float().sum(), params[3])
    assert g_ours.dtype == g_ref.dtype == torch.float32
    torch.testing.assert_close(g_ours, g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())


def test_mlp_batch0():
    inputs = [
        t.float().requires_grad_() if t is not None else None for t in mlp_inputs(0, 5, 32, 64)
    ]
    out = triton_mlp(*inputs, EPS)
    assert out.shape == (0, 5, 32)
    out.sum().backward()
    assert inputs[0].grad.shape == (0, 5, 32)
    assert torch.count_nonzero(inputs[3].grad) == 0  # no rows: zero weight gradient, not garbage


def test_mlp_noncontiguous():
    """x as a transposed view (rows not mergeable into one stride) and a strided grad_out."""
    inputs = mlp_inputs(5, 3, 32, 64)
    base = inputs[0].transpose(0, 1).contiguous()  # (N, B, C)
    inputs[0] = base.transpose(0, 1)  # (B, N, C), non-contiguous
    assert not inputs[0].is_contiguous()
    check_against_reference(
        _mlp_fn(triton_mlp, True), _mlp_fn(ref_mlp, True), inputs, torch.float32
    )


def test_mlp_no_grad_skips_saving():
    inputs = [t.float() if t is not None else None for t in mlp_inputs(1, 3, 32, 64)]
    with torch.no_grad():
        out = torch.ops.crossvit_fast.mlp(*inputs, EPS, True, False)
    assert out[4].numel() == 0  # pre-activation not written in inference


def test_mlp_errors():
    x, nw, nb, w1, b1, w2, b2 = [
        t.float() if t is not None else None for t in mlp_inputs(1, 3, 32, 64)
    ]
    with pytest.raises(ValueError, match="fc2_weight: expected shape"):
        triton_mlp(x, nw, nb, w1, b1, w2.t(), b2, EPS)
    with pytest.raises(ValueError, match="norm_weight: expected shape"):
        triton_mlp(x, nw[:16], nb, w1, b1, w2, b2, EPS)
    with pytest.raises(ValueError, match=r"fc1_weight: expected dtype torch\.float32"):
        triton_mlp(x, nw, nb, w1.half(), b1, w2, b2, EPS)  # mixed dtypes without autocast
    with pytest.raises(ValueError, match="x: expected dtype"):
        triton_mlp(x.long(), nw, nb, w1, b1, w2, b2, EPS)
    with pytest.raises(ValueError, match="fc1_bias: expected a tensor on"):
        triton_mlp(x, nw, nb, w1, b1.to("meta"), w2, b2, EPS)


def test_mlp_opcheck():
    inputs = [t.float() if t is not None else None for t in mlp_inputs(2, 3, 32, 32)]
    inputs[0].requires_grad_()
    inputs[3].requires_grad_()
    torch.library.opcheck(torch.ops.crossvit_fast.mlp.default, (*inputs, EPS, True, True))
    out = torch.ops.crossvit_fast.mlp(*inputs, EPS, True, True)
    saved = [t.detach() for t in out[1:]]
    args = (
        torch.randn_like(inputs[0]),
        inputs[0].detach(),
        inputs[1],
        inputs[2],
        inputs[3].detach(),
        inputs[5],
        *saved,
        True,
        [True] * 7,
    )
    opcheck_backward("mlp", args)


def test_mlp_torch_compile():
    """fullgraph=True: the op traces without a graph break; results equal eager."""
    inputs = [
        t.float().requires_grad_() if t is not None else None for t in mlp_inputs(1, 3, 32, 64)
    ]
    assert_compiles_like_eager(lambda *a: triton_mlp(*a, EPS) * 2, inputs, inputs[3])


# -- GPU tier: CrossViT's real widths, compiled with Inductor --------------------------------------


@gpu_tier()
@pytest.mark.parametrize("C, ratio, N", [(224, 3, 401), (448, 3, 197), (384, 4, 197), (96, 4, 401)])
def test_mlp_gpu_real_shapes(backend, dtype, C, ratio, N):
    impl = flat_args("mlp", served(backend, "mlp"))
    inputs = mlp_inputs(4, N, C, C * ratio, device="cuda")
    check_against_reference(_mlp_fn(impl, True), _mlp_fn(ref_mlp, True), inputs, dtype, name="mlp")


@pytest.mark.gpu
def test_mlp_gpu_autocast_and_inductor():
    inputs = [
        t.float().requires_grad_() if t is not None else None
        for t in mlp_inputs(4, 197, 448, 1344, device="cuda")
    ]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(lambda *a: triton_mlp(*a, EPS), fullgraph=True)
        out = compiled(*inputs)
        ref = ref_mlp(*inputs, EPS)
    assert out.dtype == ref.dtype == torch.float32
    ref64 = ref_mlp(*[t.double() if t is not None else None for t in inputs], EPS)
    assert_2x_rule(out, ref, ref64, "compiled autocast mlp")
    out.sum().backward()
    assert inputs[3].grad is not None and torch.isfinite(inputs[3].grad).all()


@pytest.mark.gpu
def test_mlp_gpu_opcheck():
    inputs = [
        t.to(torch.bfloat16) if t is not None else None
        for t in mlp_inputs(2, 197, 96, 384, device="cuda")
    ]
    inputs[0].requires_grad_()
    torch.library.opcheck(torch.ops.crossvit_fast.mlp.default, (*inputs, EPS, True, True))


@pytest.mark.skipif(not HAS_GPU or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_mlp_second_gpu():
    """Kernels launch on the tensors' device, not the current one."""
    inputs = [
        t.float() if t is not None else None for t in mlp_inputs(2, 5, 96, 384, device="cuda:1")
    ]
    with torch.cuda.device(0):
        out = triton_mlp(*inputs, EPS)
    torch.testing.assert_close(out, ref_mlp(*inputs, EPS), rtol=1e-4, atol=1e-4)


# Compiling every kernel for sm_90 (every config, zero spills): tests/test_toolchain_triton.py.
