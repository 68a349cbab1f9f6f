"""The `blocks` op in Triton: a branch's run of ViT blocks in one stage under one autograd node,
so that every LayerNorm backward between two blocks is finished inside a GEMM.

Spec: `crossvit_fast.ops.reference.blocks` (the blocks one after the other). No kernel of its
own: forward runs the registered `crossvit_fast::block` op per block; backward runs
`crossvit_fast::block_backward` per block, last to first, chained. Block i + 1's backward leaves
its LN1 backward undone (`defer`) and hands it to block i, whose fc2 dgrad (the resident GEMM)
finishes it in its prologue (`after`): the gradient between the two blocks is written once
(it is fc2's A, and the MLP's LayerNorm backward reads it as its residual gradient) and never
read back by a LayerNorm launch of its own. Within each block the MLP's LayerNorm backward is
finished by the proj dgrad in the same way (`block`). Only the first block's LN1 backward is a
launch of its own. Per crossvit_18 stage at B = 256 (large branch, 6 blocks) that is 5
LayerNorm launches and 5 reads of an (M, C) fp32 gradient fewer than six `block` ops, and one
partial-sums launch more (the first block finishes three LayerNorms' sums, `block_backward`).

Ladder: `_Blocks` (autograd Function over the `block` / `block_backward` ops) -> functional
`blocks` (the reference signature). Drop-path, dropout, hooks and gradient checkpointing are not
this op's: the model runs its blocks one by one then (model.MultiScaleBlock).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import BlockParams, as_params
from .block import block_args, grads_of
from .layer_norm import split_norm_grads
from .utils import saves

__all__ = ["OPS", "blocks"]

_N = 12  # parameters per block (BlockParams, flat)
_SAVED = 10  # tensors `block` saves per block besides x, x_mid and SDPA's


class _Blocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, num_heads, eps, save, x, *flat):
        n = len(flat) // _N
        saved, counts = [], []
        for i in range(n):
            out, x_mid, *kept, sdpa = torch.ops.crossvit_fast.block(
                x, *flat[i * _N : (i + 1) * _N], num_heads, eps, save
            )
            if save:
                saved += [x, x_mid, *kept, *sdpa]
                counts.append(len(sdpa))
            x = out
        ctx.save_for_backward(*saved, *flat)
        ctx.counts, ctx.heads, ctx.n = counts, num_heads, n
        ctx.has = [t is not None for t in flat]
        return x

    @staticmethod
    def backward(ctx, dout):
        everything = ctx.saved_tensors
        flat = everything[len(everything) - ctx.n * _N :]
        blocks, k = [], 0
        for count in ctx.counts:
            size = 2 + _SAVED + count
            blocks.append(everything[k : k + size])
            k += size
        grads: list = [None] * len(flat)
        after: list = []  # block i + 1's deferred LN1 backward, for block i's fc2 dgrad
        for i in reversed(range(ctx.n)):
            x, x_mid, *kept = blocks[i]
            p, has = flat[i * _N : (i + 1) * _N], ctx.has[i * _N : (i + 1) * _N]
            needs = [h and r for h, r in zip(has, ctx.needs_input_grad[4 + i * _N :])]
            n1w, n1b, wqkv, _, wp, _, n2w, n2b, w1, _, w2, _ = p
            defer = i > 0
            dx, dnorm1, *rest = torch.ops.crossvit_fast.block_backward(
                dout, x, x_mid, n1w, n1b, wqkv, wp, n2w, n2b, w1, w2, *kept[:_SAVED],
                list(kept[_SAVED:]), ctx.heads, needs, after, defer,
            )  # fmt: skip
            n1_rows = (False, False) if defer else needs[:2]  # (deferred: none here)
            own = grads_of(needs, has, x.shape[-1], dnorm1, n1_rows, *rest[:7])
            if after:  # block i + 1's LN1 gradients (the affine present), from this fc2 dgrad
                j = (i + 1) * _N
                for off, g in enumerate(split_norm_grads(rest[7], ctx.has[j], ctx.has[j + 1])):
                    grads[j + off] = g if ctx.needs_input_grad[4 + j + off] else None
            grads[i * _N + 2 * defer : (i + 1) * _N] = own[2 * defer :]
            # (a deferred LN1's affine gradients come with block i - 1's backward)
            after = [x, n1w, n1b, kept[0], kept[1], rest[8]] if defer else []
            dout = dx
        return (None, None, None, dout, *grads)


def blocks(x: Tensor, params: list[BlockParams], num_heads: int, eps: float) -> Tensor:
    """A branch's ViT blocks of one stage, in order, without drop-path or dropout: each
    `mlp(self_attention(x))` with the residuals.

    x: (B, N, C), fp32 / fp16 / bf16, any strides; params: one `BlockParams` per block (the same
    width and head count: one branch), with `block`'s shapes, dtype rules and limits.
    """
    if not isinstance(params, (list, tuple)) or not params:
        raise ValueError(f"params: expected a non-empty list of BlockParams, got {params!r}")
    flat = [t for p in params for t in block_args(x, as_params(BlockParams, p), num_heads)]
    return _Blocks.apply(num_heads, float(eps), saves(x, *flat), x, *flat)


OPS = {"blocks": blocks}
