"""The `blocks` op (a branch's blocks of one stage under one autograd node, ops/triton/blocks.py)
against the reference's blocks one after the other.

Shapes as tests/ops/test_block.py: 520 rows take the resident plan, so between two blocks the
LN1 backward of the later one is finished in the earlier one's fc2 dgrad (asserted), and within
each the MLP's in the proj dgrad; fewer rows take the fallbacks. The 2x rule for the output and
every parameter's gradient.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import block_params
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import blocks as tblocks

from ..conftest import DEVICE
from ..numerics import check_against_reference
from . import KERNEL_BACKENDS, assert_compiles_like_eager, served
from .test_block import EPS, block_inputs


def _inputs(n, B, N, C, **kw):
    """x and n blocks' parameters, flat (x, 12 per block)."""
    first = block_inputs(B, N, C, **kw)
    return first + [t for _ in range(n - 1) for t in block_inputs(B, N, C, **kw)[1:]]


def _fn(impl, heads):
    def run(x, *flat):
        params = [block_params(flat[i : i + 12]) for i in range(0, len(flat), 12)]
        return impl(x, params, heads, EPS)

    return run


@pytest.fixture
def prologues(monkeypatch):
    """How many fused_linear calls finished a LayerNorm backward in their prologue."""
    from crossvit_fast.ops.triton import gemm

    calls = []
    real = gemm.fused_linear
    monkeypatch.setattr(
        gemm, "fused_linear", lambda *a, **kw: calls.append("dnorm" in kw) or real(*a, **kw)
    )
    return calls


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n, affine, bias", [(2, True, True), (3, False, False)])
def test_blocks_fp32(backend, n, affine, bias):
    impl = served(backend, "blocks")
    inputs = _inputs(n, 2, 5, 32, affine=affine, bias=bias)
    check_against_reference(_fn(impl, 4), _fn(reference.blocks, 4), inputs, torch.float32)


@pytest.mark.parametrize(
    "dtype, amp, affine",
    [(torch.bfloat16, None, True), (torch.float32, torch.bfloat16, True),
     (torch.float32, torch.bfloat16, False)],
)  # fmt: skip
def test_blocks_chain_the_layer_norm_gradients(prologues, dtype, amp, affine):
    inputs = _inputs(3, 2, 260, 32, affine=affine)
    with torch.autocast(DEVICE, dtype=amp or torch.bfloat16, enabled=amp is not None):
        check_against_reference(
            _fn(tblocks.blocks, 2), _fn(reference.blocks, 2), inputs, dtype, name="blocks"
        )
    # per backward: 3 proj dgrads (each block's MLP LayerNorm) + 2 fc2 dgrads (blocks 2, 3's LN1)
    assert sum(prologues) >= 5, f"{sum(prologues)} LayerNorm backwards finished in a GEMM"


def test_blocks_frozen_parameters():
    inputs = [t.float() for t in _inputs(2, 2, 5, 32)]
    want = {0, 1, 14, 15, 20}  # x, block 1's norm1 weight, block 2's norm1 and fc1 weight
    for i in want:
        inputs[i].requires_grad_()
    _fn(tblocks.blocks, 4)(*inputs).sum().backward()
    assert {i for i, t in enumerate(inputs) if t.grad is not None} == want


def test_blocks_errors():
    x = block_inputs(1, 3, 32)[0].float()
    with pytest.raises(ValueError, match="non-empty list of BlockParams"):
        tblocks.blocks(x, [], 4, EPS)


def test_blocks_torch_compile():
    inputs = [t.float().requires_grad_() for t in _inputs(2, 1, 3, 32)]
    assert_compiles_like_eager(_fn(tblocks.blocks, 4), inputs, (inputs[0], inputs[1], inputs[15]))
