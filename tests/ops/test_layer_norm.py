"""The Triton `layer_norm` op against the reference (crossvit_fast.ops.reference).

Without a GPU the kernels run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1). The
2x-of-PyTorch rule (tests/numerics.py) for the output and every gradient; the `gpu` tier repeats
it at CrossViT's real widths.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import layer_norm as tln

from ..conftest import DEVICE
from ..numerics import check_against_reference
from . import KERNEL_BACKENDS, gpu_tier, opcheck_backward, served

EPS = 1e-6


def _ln(op):
    return lambda x, w, b: op(x, w, b, EPS)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "shape, affine",
    [((2, 5, 32), True), ((1, 197, 96), True), ((3, 224), False), ((1, 1, 448), True)],
)
def test_layer_norm_fp32(backend, shape, affine):
    impl = served(backend, "layer_norm")
    C = shape[-1]
    r = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.float64)
    inputs = [r(*shape) * 3 + 1, r(C) if affine else None, r(C) if affine else None]
    check_against_reference(_ln(impl), _ln(reference.layer_norm), inputs, torch.float32, name="ln")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_16bit(backend, dtype):
    impl = served(backend, "layer_norm")
    r = lambda *s: torch.randn(*s, device=DEVICE, dtype=torch.float64)
    inputs = [r(2, 7, 96) * 3 + 1, r(96), r(96)]
    check_against_reference(_ln(impl), _ln(reference.layer_norm), inputs, dtype, name="ln")


def test_layer_norm_noncontiguous_and_batch0():
    x = torch.randn(32, 6, device=DEVICE).t()  # (6, 32) with column stride 6
    w, b = torch.randn(32, device=DEVICE), torch.randn(32, device=DEVICE)
    torch.testing.assert_close(tln.layer_norm(x, w, b, EPS), reference.layer_norm(x, w, b, EPS))
    empty = torch.randn(0, 4, 32, device=DEVICE, requires_grad=True)
    out = tln.layer_norm(empty, w, b, EPS)
    assert out.shape == (0, 4, 32)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_autocast_dtype(backend, x_dtype):
    impl = served(backend, "layer_norm")
    x = torch.randn(2, 3, 32, device=DEVICE, dtype=x_dtype)
    w = torch.randn(32, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        assert impl(x, w, w, EPS).dtype == reference.layer_norm(x, w, w, EPS).dtype


def test_layer_norm_errors():
    x = torch.randn(2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="weight: expected shape"):
        tln.layer_norm(x, torch.randn(16, device=DEVICE), None, EPS)
    with pytest.raises(ValueError, match=r"bias: expected dtype torch\.float32"):
        tln.layer_norm(x, None, torch.randn(32, device=DEVICE, dtype=torch.float16), EPS)
    with pytest.raises(ValueError, match="supports C <="):
        tln.layer_norm(torch.empty(1, tln.MAX_WIDTH + 1, device=DEVICE), None, None, EPS)


def test_layer_norm_opcheck():
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.crossvit_fast.layer_norm.default, (x, w, None, EPS, torch.float32)
    )
    _, mean, rstd = torch.ops.crossvit_fast.layer_norm(x, w, None, EPS, torch.float32)
    args = (
        torch.randn_like(x),
        x.detach(),
        w.detach(),
        None,
        mean.detach(),
        rstd.detach(),
        True,
        False,
    )
    opcheck_backward("layer_norm", args)


# -- GPU tier: CrossViT's real widths ------------------------------------------------------------


@gpu_tier([torch.float32, torch.bfloat16])
def test_layer_norm_gpu(backend, dtype):
    impl = served(backend, "layer_norm")
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64)
    inputs = [r(8, 401, 448) * 3 + 1, r(448), r(448)]
    check_against_reference(_ln(impl), _ln(reference.layer_norm), inputs, dtype, name="ln")
