"""The `cls_proj` op in Triton: CrossViT's projs / revert_projs, Linear(GELU_erf(LayerNorm(x))).

Spec: `crossvit_fast.ops.reference.cls_proj`.

Ladder: `cls_norm_fwd` / `cls_norm_bwd` (crossvit_fast.ops.triton.layer_norm) + cuBLAS -> ops
`crossvit_fast::cls_proj` / `crossvit_fast::cls_proj_backward` -> functional `cls_proj`.

cls_proj = Linear(GELU_erf(LayerNorm(x))) on B CLS rows: one Triton launch for the row-wise
LayerNorm + GELU (`_cls_norm_fwd_kernel`, statistics in fp32), one cuBLAS GEMM with the bias in
its epilogue. Backward: two GEMMs (dg, dW) and one Triton launch that does the GELU and
LayerNorm backward and the per-program partials of dgamma, dbeta and the bias gradient, reduced
by one deterministic sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import ClsProjParams, as_params
from ..common import cast, check_params, check_tensor, compute_dtype
from .layer_norm import cls_norm_bwd, cls_norm_fwd
from .utils import input_grads, register_op

__all__ = ["OPS", "cls_proj"]


@register_op("crossvit_fast::cls_proj")
def _cls_proj_op(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """x: (M, C_in) any strides; weight (C_out, C_in) in the compute dtype. Returns
    (y (M, C_out), g = GELU(LN(x)) (M, C_in), saved for dW)."""
    g, _ = cls_norm_fwd(x, norm_weight, norm_bias, eps, weight.dtype, gelu=True)
    # (M x C_in)(C_in x C_out) with M = batch: cuBLAS (bias fused in its epilogue) is at its
    # latency floor here; a hand GEMM would not save the launch it costs.
    y = torch.addmm(bias, g, weight.t()) if bias is not None else g @ weight.t()
    return y, g


@register_op("crossvit_fast::cls_proj_backward")
def _cls_proj_backward_op(
    dy: Tensor,
    x: Tensor,
    g: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    weight: Tensor,
    eps: float,
    has_bias: bool,
    bias_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx (M, C_in), dW (C_out, C_in), dnorm (2 C_in,) fp32 = dgamma | dbeta, db
    (C_out,) in bias_dtype; (0,) without a bias)."""
    dy = dy.to(weight.dtype)
    dg = dy @ weight
    dw = dy.t() @ g
    extras = (dy,) if has_bias else ()
    dx, dnorm, db = cls_norm_bwd(
        x, dg, norm_weight, norm_bias, eps, gelu=True, extras=extras, extras_dtype=bias_dtype
    )
    return dx, dw, dnorm, db if db is not None else dnorm.new_empty(0, dtype=bias_dtype)


def _cls_proj_setup(ctx, inputs, output) -> None:
    x, nw, nb, weight, bias, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, output[1], nw, nb, weight)
    ctx.eps = eps
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (nw, nb, bias))


def _cls_proj_backward(ctx, dy, _):
    name = "crossvit_fast::cls_proj"
    if dy is None:
        return input_grads(name)
    x, g, nw, nb, weight = ctx.saved_tensors
    C = x.shape[1]
    has_bias = ctx.dtypes[2] is not None
    bias_dtype = ctx.dtypes[2] or torch.float32
    dx, dw, dnorm, db = _cls_proj_backward_op(
        dy, x, g, nw, nb, weight, ctx.eps, has_bias, bias_dtype
    )
    grads = (dnorm[:C], dnorm[C:], db)
    g_nw, g_nb, g_b = (None if t is None else s.to(t) for s, t in zip(grads, ctx.dtypes))
    return input_grads(name, x=dx, norm_weight=g_nw, norm_bias=g_nb, weight=dw, bias=g_b)


_cls_proj_op.register_autograd(_cls_proj_backward, setup_context=_cls_proj_setup)

# The op with its autograd pieces, for `fusion_stage` (which runs them under its own node).
AUTOGRAD_PARTS = (_cls_proj_op, _cls_proj_setup, _cls_proj_backward)


def cls_proj(x: Tensor, params: ClsProjParams, eps: float) -> Tensor:
    """CrossViT projs / revert_projs: Linear(GELU_erf(LayerNorm(x))).

    x: (..., C_in) fp32 / fp16 / bf16 (fp64: ValueError), any strides for 2-D x; params:
    `ClsProjParams`, weight (C_out, C_in), norm params (C_in,), bias (C_out,) or None. Under
    autocast the GEMM runs in the autocast dtype (LayerNorm + GELU in fp32), as the reference.
    Returns (..., C_out).
    """
    y = _cls_proj_op(*op_inputs(x, params, eps))[0]
    return y if x.ndim == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def op_inputs(x: Tensor, params: ClsProjParams, eps: float) -> tuple:
    """`cls_proj`'s arguments, checked and converted, as `crossvit_fast::cls_proj` takes them
    (x as (M, C_in) rows; also how `fusion_stage` calls the op)."""
    params = as_params(ClsProjParams, params)
    norm_weight, norm_bias, weight, bias = params
    check_tensor("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected (..., C_in), got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2, like=x)
    C_in, C_out = x.shape[-1], weight.shape[0]
    check_params(params, x, (C_in,), (C_in,), (C_out, C_in), (C_out,))
    dt = compute_dtype(x, **params._asdict())
    x2 = x if x.ndim == 2 else x.reshape(-1, C_in)
    return (x2, norm_weight, norm_bias, cast(weight, dt), cast(bias, dt), float(eps))


OPS = {"cls_proj": cls_proj}
