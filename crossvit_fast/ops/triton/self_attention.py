"""ViT-block attention half as one op: `x + proj(MHSA(LN(x)))`, forward and backward.

The attention core stays torch's SDPA kernels (flash on the GPU for 16-bit, memory-efficient for
fp32, the CPU flash kernel under the interpreter): they are fused, IO-aware kernels already.
What this op owns is everything around them, so that autograd adds no traffic of its own:

Forward (M = B * N rows, C = width):
  1. LayerNorm (one read of x), LN(x) written once in the compute dtype and saved (dW_qkv's
     operand), then the qkv GEMM with its bias on cuBLAS (a plain GEMM: nothing to fuse).
  2. SDPA forward on q / k / v viewed in place from qkv (no copies): o, logsumexp.
  3. proj GEMM (Triton), bias + residual x in the epilogue: the block output is written once.
Backward (one op, `crossvit_fast::self_attention_backward`):
  1. proj dgrad (Triton; the proj-bias gradient from its dy tiles, which it also writes in the
     compute dtype for dW_proj: no cast pass), dW_proj (cuBLAS).
  2. SDPA backward -> dq, dk, dv, three tensors as the kernel writes them.
  3. qkv dgrad reads them in place as the K-segments of one GEMM (`fused_linear` with A
     segments, qkv-bias gradient from the same tiles): no stack / clone of (M, 3C) that
     autograd's unbind / permute backward would make.
  4. LayerNorm backward with the residual gradient dy added in, so dx is written once (no
     autograd add of the two paths into x); dW_qkv: three cuBLAS GEMMs with the saved LN(x).
Ladder: kernels (`_fused_linear_kernel`, `_layer_norm_*_kernel`, torch SDPA, cuBLAS) -> launchers
(`fused_linear`, `layer_norm_fwd/bwd`, `sdpa_forward/backward`) -> ops
`crossvit_fast::self_attention[_backward]` -> functional `self_attention`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import SelfAttentionParams, as_params
from ..common import cast, check_params, check_tensor, compute_dtype
from .gemm import fused_linear, residual_dgrad, sum_rows
from .layer_norm import as_rows, layer_norm_bwd, layer_norm_fwd, split_norm_grads
from .utils import empty, finish_block_sums, register_op, saves

__all__ = ["OPS", "self_attention"]

_aten = torch.ops.aten


# -- SDPA without autograd: the kernel a device / dtype gets, forward and backward --------------


def sdpa_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, list[Tensor]]:
    """o = softmax(q k^T / sqrt(d)) v, no mask / dropout. q, k, v: (B, H, N, d), unit last
    stride. Returns (o (B, H, N, d), what `sdpa_backward` needs). CUDA: flash for 16-bit
    (head dim a multiple of 8, <= 256: every CrossViT), memory-efficient otherwise; CPU: the
    CPU flash kernel (the interpreter path)."""
    if q.device.type != "cuda":
        o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return o, [lse]
    if _flash(q):
        o, lse, _, _, _, _, seed, offset, _ = _aten._scaled_dot_product_flash_attention(q, k, v)
        return o, [lse, seed, offset]
    o, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    return o, [lse, seed, offset]


def sdpa_backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, saved: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `sdpa_forward`, from the same kernel family."""
    if q.device.type != "cuda":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, saved[0], 0.0, False
        )
    lse, seed, offset = saved
    if _flash(q):
        return _aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, None, None, q.shape[2], k.shape[2], 0.0, False, seed, offset
        )
    dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
        do, q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False]
    )
    return dq, dk, dv


def _flash(q: Tensor) -> bool:
    """Whether CUDA q takes the flash kernels (16-bit, head dim a multiple of 8 up to 256)."""
    d = q.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256


def _heads(t: Tensor, B: int, N: int, H: int) -> Tensor:
    """(B, N, H * d) rows -> the (B, H, N, d) view SDPA takes (no copy)."""
    return t.view(B, N, H, t.shape[-1] // H).transpose(1, 2)


def _rows(t: Tensor) -> Tensor:
    """(B, H, N, d) -> (B * N, H * d): a view for the (B, N, H, d) memory order SDPA's kernels
    write, a copy otherwise."""
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B * N, H * d)


# -- registered ops -------------------------------------------------------------------------------


def attention_forward(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    num_heads: int,
    eps: float,
    residual: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """(out, mean, rstd, xhat, qkv, o, sdpa_saved). x: (B, N, C) any float dtype / strides; weights
    and biases in the compute dtype. out: (B, N, C), promote(x, compute dtype) with the
    residual, else the compute dtype. With `save` (for backward): LN(x) xhat (M, C), qkv (M, 3C), o
    (B, H, N, d) in the compute dtype, mean / rstd fp32 (M,), the SDPA kernel's saved tensors;
    without, xhat, qkv and o come back empty."""
    B, N, C = x.shape
    cdt = qkv_weight.dtype
    x2 = as_rows(x)
    M = x2.shape[0]
    xhat, mean, rstd = layer_norm_fwd(x2, norm_weight, norm_bias, eps, cdt)
    if qkv_bias is not None:
        qkv = torch.addmm(qkv_bias, xhat, qkv_weight.t())
    else:
        qkv = torch.mm(xhat, qkv_weight.t())
    q, k, v = (_heads(t, B, N, num_heads) for t in qkv.split(C, dim=1))
    o, saved = sdpa_forward(q, k, v)
    out_dtype = torch.promote_types(x.dtype, cdt) if residual else cdt
    out = x.new_empty((B, N, C), dtype=out_dtype)
    fused_linear(
        _rows(o),
        proj_weight,
        out.view(M, C),
        transpose_w=True,
        bias=proj_bias,
        res=x2 if residual else None,
    )
    if not save:
        return out, mean, rstd, empty(x), empty(x), empty(x), [empty(x) for _ in saved]
    return out, mean, rstd, xhat, qkv, o, saved


_self_attention_op = register_op("crossvit_fast::self_attention")(attention_forward)


def attention_grads(
    dout: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    xhat: Tensor,
    qkv: Tensor,
    o: Tensor,
    sdpa_saved: list[Tensor],
    num_heads: int,
    residual: bool,
    needs: list[bool],
    after: tuple | None = None,
    defer: bool = False,
) -> tuple:
    """Backward steps 1-4 (the module docstring) with the sums unfinished: (dx rows (M, C), the
    LayerNorm's partial rows, dW_qkv, dW_proj, the [proj | qkv] bias partial rows, `after`'s
    LayerNorm partial rows); None where `needs` (as `self_attention_backward`'s) does not ask.

    after: the block op's MLP LayerNorm backward, still to do: (x_mid, weight, bias, mean, rstd,
    dxhat (M, C)). dout is then the block output's gradient, and this half's output gradient
    dy = dout + LN-backward(dxhat) is made by the proj dgrad's own prologue (resident plan:
    written once, never read back by a separate launch), else by `layer_norm_bwd` first
    (`gemm.residual_dgrad`). defer: step 4 is left to the caller (the GEMM before this block
    finishes it): (dy, dxhat) come back in place of (dx, the LayerNorm's partial rows)."""
    need_nw, need_nb, need_wqkv, need_bqkv, need_wp, need_bp = needs
    B, N, C = x.shape
    cdt = qkv_weight.dtype
    x2, dy = as_rows(x), as_rows(dout)
    M = x2.shape[0]
    # 1. proj: do = dy @ W_proj (bias gradient from dy's tiles), dW_proj = dy^T o.
    do = x.new_empty((M, C), dtype=cdt)
    # Both bias gradients' partial sums side by side ([proj | qkv] columns): one reduction.
    sums = x.new_empty((sum_rows(M), C * need_bp + 3 * C * need_bqkv), dtype=torch.float32)
    bp_sum = sums[:, :C] if need_bp else None
    dy, dy16, after_parts = residual_dgrad(dy, proj_weight, do, after, need_wp, a_sum=bp_sum)
    dwp = torch.mm(dy16.t(), _rows(o)) if need_wp else None
    # 2. SDPA backward on the in-place q / k / v views.
    q, k, v = (_heads(t, B, N, num_heads) for t in qkv.split(C, dim=1))
    dq, dk, dv = (
        _rows(g) for g in sdpa_backward(_heads(do, B, N, num_heads), q, k, v, o, sdpa_saved)
    )
    # 3. dLN(x) = [dq | dk | dv] @ W_qkv, read as three K-segments; qkv-bias gradient alongside.
    dxhat = x.new_empty((M, C), dtype=cdt)
    bqkv_sum = sums[:, C * need_bp :] if need_bqkv else None
    fused_linear((dq, dk, dv), qkv_weight, dxhat, transpose_w=False, a_sum=bqkv_sum)
    dwqkv = x.new_empty((3 * C, C), dtype=cdt) if need_wqkv else None
    for i, g in enumerate((dq, dk, dv) if need_wqkv else ()):  # each into its rows: no cat
        torch.mm(g.t(), xhat, out=dwqkv[i * C : (i + 1) * C])
    bias_parts = sums if need_bp or need_bqkv else None
    if defer:
        return dy, dxhat, dwqkv, dwp, bias_parts, after_parts
    # 4. LayerNorm backward + the residual gradient.
    dx, norm_parts, _ = layer_norm_bwd(
        x2, norm_weight, norm_bias, mean, rstd, dxhat, dy if residual else None, need_nw, need_nb,
        finish=False,
    )  # fmt: skip
    return dx, norm_parts, dwqkv, dwp, bias_parts, after_parts


@register_op("crossvit_fast::self_attention_backward")
def _self_attention_backward_op(
    dout: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    xhat: Tensor,
    qkv: Tensor,
    o: Tensor,
    sdpa_saved: list[Tensor],
    num_heads: int,
    residual: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dnorm, dqkv_weight, dproj_weight, dbiases): dnorm the requested rows of
    [dnorm_weight; dnorm_bias] (`layer_norm_bwd`), dbiases =
    [dproj_bias | dqkv_bias] for the requested ones (one reduction finishes both); `needs`
    flags (norm weight, norm bias, qkv weight, qkv bias, proj weight, proj bias); an unneeded
    gradient comes back empty."""
    dx, norm_parts, dwqkv, dwp, bias_parts, _ = attention_grads(
        dout, x, norm_weight, norm_bias, qkv_weight, proj_weight, mean, rstd, xhat, qkv, o,
        sdpa_saved, num_heads, residual, needs,
    )  # fmt: skip
    cdt, C = qkv_weight.dtype, x.shape[-1]
    dnorm, db = finish_block_sums(norm_parts, norm_weight, norm_bias, bias_parts, cdt, C)
    return tuple(
        t if t is not None else empty(x) for t in (dx.view(x.shape), dnorm, dwqkv, dwp, db)
    )


def _self_attention_setup(ctx, inputs, output):
    x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, _, res, _ = (
        inputs
    )
    _out, mean, rstd, xhat, qkv, o, saved = output
    ctx.mark_non_differentiable(mean, rstd, xhat, qkv, o, *saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the saved outputs
    ctx.save_for_backward(
        x, norm_weight, norm_bias, qkv_weight, proj_weight, mean, rstd, xhat, qkv, o, *saved
    )
    ctx.heads, ctx.residual = heads, res
    params = (norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias)
    ctx.has = [t is not None for t in params]  # which parameters can have a gradient


def _self_attention_backward(ctx, dout, *_):
    if dout is None:
        return (None,) * 11
    x, nw, nb, wqkv, wp, mean, rstd, xhat, qkv, o, *saved = ctx.saved_tensors
    if qkv.numel() == 0 and x.numel() > 0:
        raise RuntimeError("crossvit_fast::self_attention: backward through a call with save=False")
    needs = [h and n for h, n in zip(ctx.has, ctx.needs_input_grad[1:7])]
    dx, dnorm, dwqkv, dwp, db = torch.ops.crossvit_fast.self_attention_backward(
        dout, x, nw, nb, wqkv, wp, mean, rstd, xhat, qkv, o, saved, ctx.heads, ctx.residual, needs
    )
    dnw, dnb = split_norm_grads(dnorm, needs[0], needs[1])
    C = x.shape[-1] if needs[5] else 0
    grads = (dnw, dnb, dwqkv, db[C:], dwp, db[:C])  # db: [proj | qkv], the requested ones
    return (dx, *(g if n else None for g, n in zip(grads, needs)), None, None, None, None)


_self_attention_op.register_autograd(_self_attention_backward, setup_context=_self_attention_setup)


# -- functional ------------------------------------------------------------------------------------


def attention_args(x: Tensor, params: SelfAttentionParams, num_heads: int) -> tuple:
    """`self_attention`'s checks (its docstring), then the op's parameter arguments: the LayerNorm
    affine as given and the GEMM weights / biases in the compute dtype (what autocast does to
    F.linear's arguments). Also the `block` op's first half."""
    params = as_params(SelfAttentionParams, params)
    check_tensor("x", x, ndim=3)
    C = x.shape[-1]
    if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads:
        raise ValueError(f"num_heads: expected a positive int dividing C = {C}, got {num_heads!r}")
    check_params(params, x, (C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,))
    cdt = compute_dtype(x, **params._asdict())
    return (*params[:2], *(cast(t, cdt) for t in params[2:]))


def self_attention(
    x: Tensor, params: SelfAttentionParams, num_heads: int, eps: float, residual: bool = True
) -> Tensor:
    """ViT block attention half: `x + proj(MHSA(LN(x)))` (`residual=False`: without `x +`).

    x: (B, N, C), fp32 / fp16 / bf16, any strides, C % num_heads == 0; params:
    `SelfAttentionParams`, qkv_weight (3C, C) laid out [q | k | v], head-major; proj_weight
    (C, C); norm / biases may be None. Dtype rules as `mlp` (autocast: GEMMs and SDPA in the
    autocast dtype, LayerNorm in fp32).
    """
    args = attention_args(x, params, num_heads)
    return torch.ops.crossvit_fast.self_attention(
        x, *args, num_heads, float(eps), bool(residual), saves(x, *args)
    )[0]


OPS = {"self_attention": self_attention}
