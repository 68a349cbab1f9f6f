"""The Triton `token_assemble` op (dagger stems: flatten + CLS + position embedding) against the
reference: NCHW and channels_last stem outputs, h or w == 1, batch 0, mixed dtypes; the
2x-of-PyTorch rule (tests/numerics.py) for the output and every gradient.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import token_assemble as tta

from ..conftest import DEVICE
from ..numerics import check_against_reference
from . import KERNEL_BACKENDS, gpu_tier, opcheck_backward, served


def ta_inputs(B, D, h, w, device=DEVICE):
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.float64)
    return [r(B, D, h, w), r(1, 1, D), r(1, 1 + h * w, D)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "B, D, h, w, channels_last",
    [
        (2, 32, 3, 4, False),
        (2, 96, 5, 4, True),  # channels_last stem output (the dagger stem's cuDNN layout)
        (1, 32, 1, 7, False),  # h == 1
        (3, 16, 2, 1, True),  # w == 1
    ],
)
def test_token_assemble(backend, dtype, B, D, h, w, channels_last):
    impl = served(backend, "token_assemble")
    inputs = ta_inputs(B, D, h, w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def ours(feat, cls, pos):
        return impl(feat.contiguous(memory_format=fmt), cls, pos)

    check_against_reference(ours, reference.token_assemble, inputs, dtype, name="token_assemble")


def test_token_assemble_grad_layout_and_batch0():
    feat = torch.randn(2, 32, 3, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    feat.requires_grad_()
    cls, pos = [t.float() for t in ta_inputs(1, 32, 3, 4)[1:]]
    (g,) = torch.autograd.grad(tta.token_assemble(feat, cls, pos).sum(), feat)
    assert g.is_contiguous(memory_format=torch.channels_last)  # handed to cuDNN without a copy
    f0 = torch.randn(0, 32, 3, 4, device=DEVICE, requires_grad=True)
    pos0 = pos.clone().requires_grad_()
    out = tta.token_assemble(f0, cls, pos0)
    assert out.shape == (0, 13, 32)
    out.sum().backward()
    assert f0.grad.shape == f0.shape and torch.count_nonzero(pos0.grad) == 0


def test_token_assemble_dtypes_errors_opcheck():
    feat, cls, pos = [t.float() for t in ta_inputs(2, 32, 3, 4)]
    # Mixed dtypes promote as torch.cat / + do (no autocast rule applies to them).
    out = tta.token_assemble(feat.bfloat16(), cls, pos)
    assert out.dtype == reference.token_assemble(feat.bfloat16(), cls, pos).dtype == torch.float32
    with pytest.raises(ValueError, match="pos_embed: expected shape"):
        tta.token_assemble(feat, cls, pos[:, 1:])
    with pytest.raises(ValueError, match="cls_token: expected shape"):
        tta.token_assemble(feat, cls[0], pos)
    feat.requires_grad_()
    torch.library.opcheck(
        torch.ops.crossvit_fast.token_assemble.default, (feat, cls, pos, torch.float32)
    )
    args = (torch.randn(2, 13, 32, device=DEVICE), [2, 32, 3, 4], torch.float32, False, True)
    opcheck_backward("token_assemble", args)


# -- GPU tier ------------------------------------------------------------------------------------


@gpu_tier([torch.float32, torch.bfloat16])
def test_token_assemble_gpu(backend, dtype):
    impl = served(backend, "token_assemble")
    inputs = ta_inputs(8, 448, 14, 14, device="cuda")

    def ours(feat, cls, pos):
        return impl(feat.contiguous(memory_format=torch.channels_last), cls, pos)

    check_against_reference(ours, reference.token_assemble, inputs, dtype, name="token_assemble")
