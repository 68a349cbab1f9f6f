"""The GEMM parameters' autocast casts, batched: one flat copy and one cast per forward.

Under autocast every Linear / Conv weight and bias is cast to the autocast dtype where it is used:
two launches per layer forward (weight, bias) and two more backward (their gradients back to
fp32), ~560 launches of a few MB each in a CrossViT-18 step, where the launch cost, not the bytes,
is the price. Here all of them are concatenated (one launch), cast (one launch) and handed out as
views; backward, autograd concatenates their gradients (one), casts them back (one) and gives each
parameter its slice. Same values as the per-tensor casts (a cast is elementwise).

No kernel of its own: torch's cat and copy kernels already run at DRAM speed. Ladder: functional
`cast_params` (no registered op: cat / to / split are aten ops that torch.compile and export
trace as they are).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OPS", "cast_params"]


def cast_params(params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each tensor of `params` (any shapes, one device and dtype) in `dtype`, as views of one
    flat cast copy; differentiable (each gradient comes back in its parameter's dtype)."""
    if not params:
        return []
    if len({(p.device, p.dtype) for p in params}) != 1:
        raise ValueError("cast_params: expected tensors of one device and dtype")
    flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
    return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in params]), params)]


OPS = {"cast_params": cast_params}
