"""Triton `patch_embed` (implicit-GEMM patch conv + bias + CLS + position embedding) against the
reference.

Patch sizes 8 / 12 / 16 (fusion2 / CrossViT small / large branch), widths that are multiples of
32 but not 64, batch 0 and 1, non-contiguous images. The 2x-of-PyTorch rule (tests/numerics.py)
for the output and every gradient, the image's included.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import patch_embed as tpe

from ..conftest import DEVICE
from ..numerics import assert_2x_rule, check_against_reference
from . import KERNEL_BACKENDS, assert_compiles_like_eager, gpu_tier, opcheck_backward, served


def pe_inputs(B, C_in, H, W, D, p, *, bias=True, device=DEVICE):
    """float64 (x, weight, bias, cls_token, pos_embed)."""
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float64)
    n = (H // p) * (W // p)
    return [
        r(B, C_in, H, W),
        r(D, C_in, p, p) * (C_in * p * p) ** -0.5,
        r(D) * 0.1 if bias else None,
        r(1, 1, D) * 0.02,
        r(1, 1 + n, D) * 0.02,
    ]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "B, C_in, H, W, D, p, bias",
    [
        (2, 3, 16, 32, 32, 8, True),  # patch 8, non-square image
        (1, 3, 24, 24, 96, 12, False),  # patch 12, width 96 (32k, not 64k), no bias
        (2, 3, 32, 16, 64, 16, True),  # patch 16
        (1, 2, 16, 16, 32, 16, True),  # a single patch (one token + CLS)
    ],
)
def test_patch_embed_fp32(backend, B, C_in, H, W, D, p, bias):
    impl = served(backend, "patch_embed")
    inputs = pe_inputs(B, C_in, H, W, D, p, bias=bias)
    check_against_reference(impl, reference.patch_embed, inputs, torch.float32, name="patch_embed")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patch_embed_16bit(backend, dtype):
    impl = served(backend, "patch_embed")
    inputs = pe_inputs(2, 3, 24, 36, 96, 12)
    check_against_reference(impl, reference.patch_embed, inputs, dtype, name="patch_embed")


def test_patch_embed_noncontiguous_image_no_image_grad():
    """A channels_last image and a strided view; the image does not require grad (the usual
    case: the image gradient kernel must not run, parameters still get theirs)."""
    x, w, b, cls, pos = [t.float() for t in pe_inputs(2, 3, 16, 16, 32, 8)]
    x = x.contiguous(memory_format=torch.channels_last)
    params = [t.requires_grad_() for t in (w, b, cls, pos)]
    out = tpe.patch_embed(x, *params)
    ref = reference.patch_embed(x, *params)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), params)
    refs = torch.autograd.grad(ref.sum(), params)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    big = torch.randn(2, 3, 20, 34, device=DEVICE)[
        :, :, 2:18, 1:33:2
    ]  # (2, 3, 16, 16) strided view
    torch.testing.assert_close(
        tpe.patch_embed(big, w, b, cls, pos),
        reference.patch_embed(big, w, b, cls, pos),
        rtol=1e-5,
        atol=1e-5,
    )


def test_patch_embed_batch0():
    x, w, b, cls, pos = [t.float().requires_grad_() for t in pe_inputs(0, 3, 16, 16, 32, 8)]
    out = tpe.patch_embed(x, w, b, cls, pos)
    assert out.shape == (0, 5, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(pos.grad) == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_autocast_dtype(backend, x_dtype):
    impl = served(backend, "patch_embed")
    x, w, b, cls, pos = [t.float() for t in pe_inputs(2, 3, 16, 16, 32, 8)]
    x = x.to(x_dtype)
    params = [t.requires_grad_() for t in (w, b, cls, pos)]
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        ours = impl(x, *params)
        ref = reference.patch_embed(x, *params)
    assert ours.dtype == ref.dtype
    ref64 = reference.patch_embed(x.double(), *[t.double() for t in params])
    assert_2x_rule(ours, ref, ref64, "autocast patch_embed")
    grads = torch.autograd.grad(ours.float().sum(), params)
    assert [g.dtype for g in grads] == [torch.float32] * 4


def test_patch_embed_errors():
    x, w, b, cls, pos = [t.float() for t in pe_inputs(1, 3, 16, 16, 32, 8)]
    with pytest.raises(
        ValueError, match=r"image size \(16, 20\) is not divisible by the patch size 8"
    ):
        tpe.patch_embed(torch.randn(1, 3, 16, 20, device=DEVICE), w, b, cls, pos)
    with pytest.raises(ValueError, match="expected 3 channels"):
        tpe.patch_embed(torch.randn(1, 4, 16, 16, device=DEVICE), w, b, cls, pos)
    with pytest.raises(ValueError, match="pos_embed: expected shape"):
        tpe.patch_embed(x, w, b, cls, pos[:, :4])
    with pytest.raises(ValueError, match="weight: expected dtype"):
        tpe.patch_embed(x, w.half(), b, cls, pos)
    with pytest.raises(ValueError, match="square patch kernel"):
        tpe.patch_embed(x, w[..., :4], b, cls, pos)
    with pytest.raises(ValueError, match="cls_token: expected a tensor on"):
        tpe.patch_embed(x, w, b, cls.to("meta"), pos)
    with pytest.raises(ValueError, match="x: expected 4 dims"):
        tpe.patch_embed(x[0], w, b, cls, pos)


def test_patch_embed_opcheck():
    x, w, b, cls, pos = [t.float().requires_grad_() for t in pe_inputs(2, 3, 16, 16, 32, 8)]
    torch.library.opcheck(
        torch.ops.crossvit_fast.patch_embed.default, (x, w, b, cls, pos, torch.float32)
    )
    args = (torch.randn(2, 5, 32, device=DEVICE), x.detach(), w.detach(), [True, True])
    opcheck_backward("patch_embed", args)


def test_patch_embed_torch_compile():
    inputs = [t.float().requires_grad_() for t in pe_inputs(1, 3, 16, 16, 32, 8)]
    assert_compiles_like_eager(tpe.patch_embed, inputs, inputs)


# -- GPU tier ------------------------------------------------------------------------------------


@gpu_tier()
@pytest.mark.parametrize(
    "img, D, p", [(240, 224, 12), (224, 448, 16), (240, 96, 12), (224, 768, 16)]
)
def test_patch_embed_gpu_real_shapes(backend, dtype, img, D, p):
    impl = served(backend, "patch_embed")
    inputs = pe_inputs(4, 3, img, img, D, p, device="cuda")
    check_against_reference(impl, reference.patch_embed, inputs, dtype, name="patch_embed")


@pytest.mark.gpu
def test_patch_embed_gpu_inductor_autocast():
    inputs = [t.float().requires_grad_() for t in pe_inputs(4, 3, 240, 240, 224, 12, device="cuda")]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = torch.compile(tpe.patch_embed, fullgraph=True)(*inputs)
        ref = reference.patch_embed(*inputs)
    assert out.dtype == ref.dtype
    assert_2x_rule(out, ref, reference.patch_embed(*[t.double() for t in inputs]), "patch_embed")


@pytest.mark.gpu
def test_patch_embed_gpu_opcheck():
    """On a GPU the ops decompose into their kernels under torch.compile (wrap_triton)."""
    x, w, b, cls, pos = [
        t.to(torch.bfloat16).requires_grad_()
        for t in pe_inputs(2, 3, 48, 48, 96, 12, device="cuda")
    ]
    torch.library.opcheck(
        torch.ops.crossvit_fast.patch_embed.default, (x, w, b, cls, pos, torch.bfloat16)
    )
    feat = torch.randn(2, 96, 4, 4, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    feat.requires_grad_()
    torch.library.opcheck(
        torch.ops.crossvit_fast.token_assemble.default, (feat, cls, pos[:, :17], torch.bfloat16)
    )
