"""ViT-block attention half with LayerNorm fused into the qkv GEMM: `x + proj(MHSA(LN(x)))`.

The attention itself stays torch's SDPA (flash / cuDNN / memory-efficient kernels): it is already
a fused, IO-aware kernel, and rewriting it buys nothing here. What the Triton backend fuses is the
GEMM work around it:

* `crossvit_fast::self_attention_qkv` — LayerNorm applied to the A tiles of the qkv GEMM as they
  are loaded (row statistics from one small pass), + bias in the epilogue: LN(x) is never
  written. Backward:
  the dgrad GEMM (Triton) also reduces the bias gradient from its input tiles; the LayerNorm
  backward kernel re-emits LN(x) for the weight-gradient GEMM (cuBLAS, a plain long-K GEMM).
* `crossvit_fast::self_attention_proj` — proj GEMM with bias + residual add in the epilogue, so
  the block output is written once. Backward: dgrad (Triton, bias gradient fused) and wgrad
  (cuBLAS); the residual gradient is dy itself.

Both sub-ops (`crossvit_fast::self_attention_<part>` / `..._<part>_backward`) run the
`fused_linear` GEMM of `mlp.py`. Ladder per sub-op: kernels (`_fused_linear_kernel`,
`_layer_norm_*_kernel`) -> launcher -> registered op + backward op -> functional.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import cast, check_tensor, compute_dtype
from .layer_norm import as_rows, layer_norm_bwd, layer_norm_fwd
from .mlp import fused_linear, sum_rows
from .utils import empty, register_op

__all__ = ["OPS", "self_attention", "self_attention_proj", "self_attention_qkv"]


# -- self_attention_qkv: LN(x) @ W^T + b -----------------------------------------------------------


@register_op("crossvit_fast::self_attention_qkv")
def _self_attention_qkv_op(
    x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, weight: Tensor,
    bias: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, mean, rstd). x: (..., C) any float dtype / strides; weight (N, C), bias (N,) in the
    compute dtype; out: (..., N) in the compute dtype; mean / rstd: fp32 (M,)."""
    x2 = as_rows(x)
    N = weight.shape[0]
    _, mean, rstd = layer_norm_fwd(x2, None, None, eps, None)
    out = x.new_empty((*x.shape[:-1], N), dtype=weight.dtype)
    fused_linear(x2, weight, out.view(-1, N), transpose_w=True, bias=bias,
                 ln=(mean, rstd, norm_weight, norm_bias))  # fmt: skip
    return out, mean, rstd


@register_op("crossvit_fast::self_attention_qkv_backward")
def _self_attention_qkv_backward_op(
    dout: Tensor, x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
    weight: Tensor, mean: Tensor, rstd: Tensor, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dnorm_weight, dnorm_bias, dweight, dbias); `needs` flags the last four."""
    need_nw, need_nb, need_w, need_b = needs
    x2, dy = as_rows(x), as_rows(dout)
    M, C = x2.shape
    dxhat = x.new_empty((M, C), dtype=weight.dtype)
    b_sum = x.new_zeros((sum_rows(M), weight.shape[0]), dtype=torch.float32) if need_b else None
    fused_linear(dy, weight, dxhat, transpose_w=False, a_sum=b_sum)
    dx, dnw, dnb, ln_out = layer_norm_bwd(
        x2, norm_weight, norm_bias, mean, rstd, dxhat, None, need_nw, need_nb,
        y_dtype=weight.dtype if need_w else None,
    )  # fmt: skip
    return (
        dx.view(x.shape),
        dnw if dnw is not None else empty(x),
        dnb if dnb is not None else empty(x),
        torch.mm(dy.to(weight.dtype).t(), ln_out) if need_w else empty(x),
        b_sum.sum(0).to(weight.dtype) if need_b else empty(x),
    )


def _self_attention_qkv_setup(ctx, inputs, output):
    x, norm_weight, norm_bias, weight, bias, _eps = inputs
    _out, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of mean / rstd (never read)
    ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd)
    ctx.has = [norm_weight is not None, norm_bias is not None, True, bias is not None]


def _self_attention_qkv_backward(ctx, dout, _dmean, _drstd):
    if dout is None:
        return (None,) * 6
    needs = [h and n for h, n in zip(ctx.has, ctx.needs_input_grad[1:5])]
    dx, *grads = torch.ops.crossvit_fast.self_attention_qkv_backward(
        dout, *ctx.saved_tensors, needs
    )
    return (dx, *(g if n else None for g, n in zip(grads, needs)), None)


_self_attention_qkv_op.register_autograd(
    _self_attention_qkv_backward, setup_context=_self_attention_qkv_setup
)


def self_attention_qkv(
    x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, weight: Tensor,
    bias: Tensor | None, eps: float,
) -> Tensor:  # fmt: skip
    """`F.linear(LN(x), weight, bias)` with LN fused into the GEMM's prologue. Operands as
    `_self_attention_qkv_op`; weight / bias already in the compute dtype."""
    return torch.ops.crossvit_fast.self_attention_qkv(
        x, norm_weight, norm_bias, weight, bias, float(eps)
    )[0]


# -- self_attention_proj: a @ W^T + b (+ res) ------------------------------------------------------


@register_op("crossvit_fast::self_attention_proj")
def _self_attention_proj_op(
    a: Tensor, weight: Tensor, bias: Tensor | None, res: Tensor | None, out_dtype: torch.dtype
) -> Tensor:
    """a: (..., K) any float dtype / strides; weight (N, K), bias (N,) in the compute dtype;
    res: (..., N) or None. Returns (..., N) in out_dtype."""
    a2 = as_rows(a)
    N = weight.shape[0]
    out = a.new_empty((*a.shape[:-1], N), dtype=out_dtype)
    fused_linear(a2, weight, out.view(-1, N), transpose_w=True, bias=bias,
                 res=as_rows(res) if res is not None else None)  # fmt: skip
    return out


@register_op("crossvit_fast::self_attention_proj_backward")
def _self_attention_proj_backward_op(
    dout: Tensor, a: Tensor, weight: Tensor, needs: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """(da, dweight, dbias); `needs` flags the last two. The residual's gradient is dout."""
    need_w, need_b = needs
    a2, dy = as_rows(a), as_rows(dout)
    M, K = a2.shape
    da = a.new_empty(a.shape, dtype=weight.dtype)
    b_sum = a.new_zeros((sum_rows(M), weight.shape[0]), dtype=torch.float32) if need_b else None
    fused_linear(dy, weight, da.view(M, K), transpose_w=False, a_sum=b_sum)
    dw = torch.mm(dy.to(weight.dtype).t(), a2.to(weight.dtype)) if need_w else empty(a)
    db = b_sum.sum(0).to(weight.dtype) if need_b else empty(a)
    return da.to(a.dtype), dw, db


def _self_attention_proj_setup(ctx, inputs, output):
    a, weight, bias, res, _out_dtype = inputs
    ctx.save_for_backward(a, weight)
    ctx.has_bias = bias is not None
    ctx.res_dtype = res.dtype if res is not None else None


def _self_attention_proj_backward(ctx, dout):
    a, weight = ctx.saved_tensors
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    da, dw, db = torch.ops.crossvit_fast.self_attention_proj_backward(
        dout, a, weight, [ctx.needs_input_grad[1], need_b]
    )
    dres = dout.to(ctx.res_dtype) if ctx.res_dtype is not None and ctx.needs_input_grad[3] else None
    return da, dw if ctx.needs_input_grad[1] else None, db if need_b else None, dres, None


_self_attention_proj_op.register_autograd(
    _self_attention_proj_backward, setup_context=_self_attention_proj_setup
)


def self_attention_proj(
    a: Tensor, weight: Tensor, bias: Tensor | None, res: Tensor | None
) -> Tensor:
    """`res + F.linear(a, weight, bias)` (or without `res`) with the add in the GEMM epilogue.
    Output dtype: promote(res, weight) with a residual, else weight's (the compute dtype)."""
    out_dtype = torch.promote_types(res.dtype, weight.dtype) if res is not None else weight.dtype
    return torch.ops.crossvit_fast.self_attention_proj(a, weight, bias, res, out_dtype)


# -- functional ------------------------------------------------------------------------------------


def self_attention(
    x: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None, qkv_weight: Tensor,
    qkv_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None, num_heads: int,
    eps: float, residual: bool = True,
) -> Tensor:  # fmt: skip
    """ViT block attention half: `x + proj(MHSA(LN(x)))` (`residual=False`: without `x +`).

    x: (B, N, C), fp32 / fp16 / bf16, any strides, C % num_heads == 0; qkv_weight (3C, C)
    laid out [q | k | v], head-major; proj_weight (C, C); norm / biases may be None. Dtype
    rules as `mlp` (autocast: GEMMs and SDPA in the autocast dtype, LayerNorm in fp32).
    """
    check_tensor("x", x, ndim=3)
    B, N, C = x.shape
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing C = {C}, got {num_heads!r}")
    check_tensor("norm_weight", norm_weight, shape=(C,), like=x, optional=True)
    check_tensor("norm_bias", norm_bias, shape=(C,), like=x, optional=True)
    check_tensor("qkv_weight", qkv_weight, shape=(3 * C, C), like=x)
    check_tensor("qkv_bias", qkv_bias, shape=(3 * C,), like=x, optional=True)
    check_tensor("proj_weight", proj_weight, shape=(C, C), like=x)
    check_tensor("proj_bias", proj_bias, shape=(C,), like=x, optional=True)
    cdt = compute_dtype(
        x, norm_weight=norm_weight, norm_bias=norm_bias, qkv_weight=qkv_weight, qkv_bias=qkv_bias,
        proj_weight=proj_weight, proj_bias=proj_bias,
    )  # fmt: skip
    # what autocast does to F.linear's arguments
    qkv = self_attention_qkv(
        x, norm_weight, norm_bias, cast(qkv_weight, cdt), cast(qkv_bias, cdt), eps
    )
    q, k, v = qkv.view(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)
    # (B, H, N, d) -> (B, N, C): a view when SDPA returns the (B, N, H, d) memory layout (flash).
    o = o.transpose(1, 2).reshape(B, N, C)
    return self_attention_proj(
        o, cast(proj_weight, cdt), cast(proj_bias, cdt), x if residual else None
    )


OPS = {"self_attention": self_attention}
