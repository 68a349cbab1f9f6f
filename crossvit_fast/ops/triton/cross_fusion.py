"""The `cross_fusion` op in Triton: one whole fusion step, cls_proj -> cross_attention ->
cls_proj (revert_projs(cross_attention(projs(cls), tokens))).

Spec: `crossvit_fast.ops.reference.cross_fusion`. It composes the Triton `cls_proj` and
`cross_attention` ops; it has no kernel of its own.

One fusion step (at B >= #SMs, where the token pass needs no split; smaller batches add one
merge launch forward and one partial-sum backward) costs 11 launches forward — cls_proj 2,
cross_attention 7 (LN(cls), q, k~, token pass, o + b_v, o's head merge, out-proj), cls_proj 2 —
of which only the token pass touches the (B, N, C) tokens, and 21 backward — cls_proj 4,
cross_attention 13 (8 GEMMs / batched GEMMs, dq's head merge, the token pass, the CLS-row
LayerNorm backward, one partial sum, the memset of the exactly-zero db_k), cls_proj 4 — against
20 / 38 for the reference in eager mode, most of which read or write whole token tensors
(checked by tests/ops/test_cross_fusion.py::test_launch_count).
"""

from __future__ import annotations

from torch import Tensor

from ...backends import FusionParams, as_params
from ..common import check_tensor
from .cls_proj import cls_proj
from .cross_attention import cross_attention

__all__ = ["OPS", "cross_fusion"]


def cross_fusion(
    cls: Tensor, tokens: Tensor, params: FusionParams, num_heads: int, eps: float
) -> Tensor:
    """One fusion step for branch i: revert_projs(cross_attention(projs(cls), tokens)).

    cls: (B, C_i); tokens: (B, 1 + N, C_j), read in place (row 0 ignored). Returns (B, C_i).
    Limits as `cls_proj` and `cross_attention` (num_heads is branch j's head count).
    """
    check_tensor("cls", cls, ndim=2)
    proj, attn, revert = as_params(FusionParams, params)
    c = cls_proj(cls, proj, eps)
    f = cross_attention(c, tokens, attn, num_heads, eps)
    return cls_proj(f, revert, eps)


OPS = {"cross_fusion": cross_fusion}
