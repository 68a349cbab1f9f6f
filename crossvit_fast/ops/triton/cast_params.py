"""The GEMM parameters' autocast casts, batched: one launch per forward and one per backward.

Under autocast every Linear / Conv weight and bias is cast to the autocast dtype where it is used:
two launches per layer forward (weight, bias) and two more backward (their gradients back to
fp32), ~560 launches of a few MB each in a CrossViT-18 step, where the launch cost, not the bytes,
is the price. Here one `torch.cat` writes all of them, converted, into one flat buffer (each
element read once in fp32 and written once in 16 bits: the same bytes as the per-tensor casts)
handed out as views; backward, one `torch.cat` converts all their gradients back the same way.
Same values as the per-tensor casts (a cast is elementwise).

No kernel of its own: torch's cat kernel converts dtypes as it copies, at DRAM speed. Ladder:
autograd Function `_CastParams` -> functional `cast_params` (no registered op: `cat` is an aten
op that torch.compile and export trace as it is).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OPS", "cast_params"]


class _CastParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: Tensor) -> tuple[Tensor, ...]:
        ctx.shapes = [p.shape for p in params]
        ctx.src_dtype = params[0].dtype
        flat = params[0].new_empty(sum(p.numel() for p in params), dtype=dtype)
        torch.cat([p.reshape(-1) for p in params], out=flat)
        return tuple(_split(flat, ctx.shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        like = next(g for g in grads if g is not None)
        flat = like.new_empty(sum(s.numel() for s in ctx.shapes), dtype=ctx.src_dtype)
        parts = [
            (g if g is not None else like.new_zeros(s)).reshape(-1)
            for g, s in zip(grads, ctx.shapes)
        ]
        torch.cat(parts, out=flat)
        return (None, *_split(flat, ctx.shapes))


def _split(flat: Tensor, shapes: list) -> list[Tensor]:
    return [t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes)]


def cast_params(params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each tensor of `params` (any shapes, one device and dtype) in `dtype`, as views of one
    flat cast copy; differentiable (each gradient comes back in its parameter's dtype, as views
    of one flat buffer)."""
    if not params:
        return []
    if len({(p.device, p.dtype) for p in params}) != 1:
        raise ValueError("cast_params: expected tensors of one device and dtype")
    return list(_CastParams.apply(dtype, *params))


OPS = {"cast_params": cast_params}
