"""The `fusion_stage` op in Triton: every fusion step of one stage and the stage's token
re-assembly under one autograd node, so each branch's tokens get their gradient written once.

Spec: `crossvit_fast.ops.reference.fusion_stage`. No kernel of its own: it runs the registered
`cls_proj` and `cross_attention` ops (forward) and their own backward functions (through a
stand-in ctx, `_Ctx`), in the order of `cross_fusion`, under one `torch.autograd.Function`.

Why one node. Branch j's tokens y_j after its blocks feed three things: its own fusion's CLS
(y_j[:, 0]), the other fusion's cross-attention (y_j as the attended tokens) and the stage output
cat(new CLS_j, y_j[:, 1:]). As separate autograd nodes that is three gradients of y_j's full size
(a select_backward memset, the cross-attention d tokens, a slice_backward) and two adds: about
eight (B, N, C) passes per branch. Here the cross-attention backward kernel adds the stage
output's gradient into d tokens as it writes them (`dres`), and the CLS row's gradient is copied
into row 0: one pass, plus the kernel's read of that gradient.

Ladder: `_FusionStage` (autograd Function; its pieces are each op's `AUTOGRAD_PARTS`) ->
functional `fusion_stage` (the reference signature). Gradients equal the composed ops' (the same
kernels, in the same order; in fp32 the sums are the same additions, so bitwise).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import FusionParams, as_params, fusion_params
from ..common import check_stage_args
from . import cls_proj as _cls_proj
from . import cross_attention as _cross_attention

__all__ = ["OPS", "fusion_stage"]

_N_PARAMS = 18  # per fusion step: projs 4, fusion block 10, revert_projs 4 (FusionParams)


class _Ctx:
    """Stands in for autograd's ctx so a registered op's own setup_context / backward run under
    `_FusionStage`'s node. Its saved tensors go through the outer ctx's save_for_backward and
    its other attributes through `state()`; backward builds a fresh one from both (torch.compile
    does not let backward mutate an object the forward made)."""

    def __init__(self, saved: tuple = (), state: dict | None = None):
        self.saved_tensors = saved
        for k, v in (state or {}).items():
            setattr(self, k, v)

    def state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "saved_tensors"}

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors) -> None:
        pass  # the outer node's outputs are what autograd sees

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _run(parts, args: tuple) -> tuple[_Ctx, tuple]:
    op, setup, _ = parts
    out = op(*args)
    ctx = _Ctx()
    setup(ctx, args, out)
    return ctx, out


def _like(grads, dtypes) -> list:
    """The op's parameter gradients in the dtypes of the parameters as passed (autocast's cast of
    an fp32 parameter inside the forward has no graph node here to convert them back)."""
    return [None if g is None or d is None else g.to(d) for g, d in zip(grads, dtypes)]


class _FusionStage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, num_heads, eps, cls_only, *flat):
        nb = len(num_heads)
        ys, params = flat[:nb], flat[nb:]
        steps, outs, dtypes = [], [], []
        for i in range(nb):
            proj, attn, revert = fusion_params(params[i * _N_PARAMS : (i + 1) * _N_PARAMS])
            c1, (c, _) = _run(_cls_proj.AUTOGRAD_PARTS, _cls_proj.op_inputs(ys[i][:, 0], proj, eps))
            a2 = _cross_attention.op_inputs(c, ys[(i + 1) % nb], attn, num_heads[i], eps)
            c2, out2 = _run(_cross_attention.AUTOGRAD_PARTS, a2)
            c3, (new, _) = _run(_cls_proj.AUTOGRAD_PARTS, _cls_proj.op_inputs(out2[0], revert, eps))
            steps.append((c1, c2, c3))
            dtypes.append((c.dtype, new.dtype))
            new = new.unsqueeze(1)
            outs.append(new if cls_only else torch.cat([new, ys[i][:, 1:]], dim=1))
        saved = [s.saved_tensors for step in steps for s in step]
        ctx.counts = [len(t) for t in saved]
        ctx.save_for_backward(*(t for ts in saved for t in ts))
        ctx.states = [s.state() for step in steps for s in step]
        ctx.dtypes, ctx.cls_only = dtypes, cls_only
        ctx.param_dtypes = [None if p is None else p.dtype for p in params]  # (see `_like`)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        saved, k, ctxs = ctx.saved_tensors, 0, []
        for state, n in zip(ctx.states, ctx.counts):
            ctxs.append(_Ctx(saved[k : k + n], state))
            k += n
        nb = len(ctxs) // 3
        dys, dcls, dparams = [None] * nb, [None] * nb, []
        for i in range(nb):
            c1, c2, c3 = ctxs[3 * i : 3 * i + 3]
            j = (i + 1) % nb
            c_dtype, new_dtype = ctx.dtypes[i]
            g3 = _cls_proj.AUTOGRAD_PARTS[2](c3, douts[i][:, 0].to(new_dtype), None)
            # branch j's stage-output gradient, rows 1.., summed into d tokens by the kernel
            c2.dres = None if ctx.cls_only else douts[j]
            g2 = _cross_attention.AUTOGRAD_PARTS[2](c2, g3[0])
            dys[j] = g2[1]  # written whole by the kernel (row 0: zero, set below)
            g1 = _cls_proj.AUTOGRAD_PARTS[2](c1, g2[0].to(c_dtype), None)
            dcls[i] = g1[0]
            dtypes = ctx.param_dtypes[i * _N_PARAMS : (i + 1) * _N_PARAMS]
            dparams += _like(g1[1:5] + g2[2:12] + g3[1:5], dtypes)
        for i in range(nb):
            dys[i][:, 0] = dcls[i]  # row 0 of y_i: only its own fusion's CLS reads it
        return (None, None, None, *dys, *dparams)


def fusion_stage(
    ys: list[Tensor],
    params: list[FusionParams],
    num_heads: list[int],
    eps: float,
    cls_only: bool = False,
) -> list[Tensor]:
    """All fusion steps of one stage: branch i's new CLS = cross_fusion(ys[i][:, 0],
    ys[(i + 1) % nb]), then cat(new CLS, ys[i][:, 1:]) (`cls_only`: the new CLS alone, (B, 1, C_i)).

    ys: per branch (B, 1 + N_i, C_i), one batch size; params: one `FusionParams` per branch;
    num_heads: per fusion step, the attended branch's head count. Limits and dtypes as
    `cross_fusion`. Returns the per-branch outputs, as the reference.
    """
    check_stage_args(ys, params, num_heads)
    flat = [t for p in params for group in as_params(FusionParams, p) for t in group]
    outs = _FusionStage.apply(tuple(num_heads), float(eps), bool(cls_only), *ys, *flat)
    return list(outs)


OPS = {"fusion_stage": fusion_stage}
