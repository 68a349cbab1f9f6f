"""Fused ViT-block MLP in Triton: `x + fc2(GELU_erf(fc1(LN(x))))`, forward and backward.

Ladder: the GEMM kernels and their launcher `fused_linear` (ops/triton/gemm.py: bias / GELU /
GELU-gradient / residual / bias-gradient epilogues), `layer_norm_fwd/bwd` -> ops
`crossvit_fast::mlp` / `crossvit_fast::mlp_backward` (autograd registered on the first) ->
functional `mlp` (reference signature, minus dropout).

Forward (M = tokens x batch rows, C = width, Hd = hidden):
  1-2. LayerNorm + fc1 (`norm_linear`): LN(x) written once in the compute dtype (saved: it is
     also dW1's operand) with the row statistics; fc1's epilogue + bias, the pre-activation
     saved for backward (training only), exact-erf GELU, the hidden activation written once in
     the compute dtype. At C <= 512 this is one launch: the resident GEMM (gemm.py) normalises
     its own 128 rows of x (fp32 in CrossViT's residual stream: one DRAM read) and keeps them
     for every column slab of W1; otherwise `layer_norm_fwd`, then the tiled GEMM.
  3. fc2: epilogue + bias + residual (x), written once in the output dtype.
  Eager PyTorch writes and re-reads the pre-activation, GELU's output and fc2's output
  separately; here the only (M, Hd) traffic is writing the hidden activation (plus the
  pre-activation when training) and reading it once.

Backward:
  1. Triton dgrad of fc2 (the resident GEMM at C <= 512: the fp32 dy read once):
     da = (dy @ W2) * GELU'(a) in the epilogue; d(fc2 bias) from the
     column sums of the dy tiles and d(fc1 bias) from the column sums of da, reduced per
     64-row block into fp32 partial rows (deterministic, no atomics); the dy tiles, rounded
     to the compute dtype as the GEMM uses them, are also written out for dW2 (no cast pass).
  2. cuBLAS: dW2 = dy^T @ h, dxhat = da @ W1, dW1 = da^T @ LN(x). These are plain GEMMs
     without a prologue or epilogue to fuse, and cuBLAS's split-K / stream-K kernels handle the
     long-K weight-gradient shapes (K = M = 50k-100k rows, output only C x Hd) better than a
     Triton GEMM would.
  3. Triton LayerNorm backward (`layer_norm_bwd`) with the residual gradient dy added in, so
     dx is written once; its dgamma / dbeta partials finish with the bias sums in one launch.

Numerics follow the reference's rounding points: the LayerNorm output and the pre-activation
are rounded to the compute dtype before the GEMM / GELU, accumulation is fp32; fp32 GEMMs use
IEEE fp32 products unless torch's float32 matmul precision allows TF32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import MlpParams, as_params
from ..common import cast, check_params, check_tensor, compute_dtype
from .gemm import GELU_BWD, GELU_FWD, fused_linear, norm_linear, residual_dgrad, sum_rows
from .layer_norm import as_rows, layer_norm_bwd, split_norm_grads
from .utils import finish_block_sums, register_op, saves

__all__ = ["OPS", "mlp"]

# -- registered ops ------------------------------------------------------------------------------


def _out_dtype(x: Tensor, cdt: torch.dtype, residual: bool) -> torch.dtype:
    # The reference adds x to fc2's output (compute dtype): type promotion decides.
    return torch.promote_types(x.dtype, cdt) if residual else cdt


def mlp_forward(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    eps: float,
    residual: bool,
    save_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, xhat, act, hidden). x: (..., C) any float dtype; fc weights / biases
    in the compute dtype. xhat: (M, C) LN(x) in the compute dtype (fc1's A and dW1's operand);
    act: (M, Hd) pre-activation when save_act (for backward), else empty; hidden: (M, Hd)
    GELU output; mean / rstd: fp32 (M,) LayerNorm statistics."""
    C = x.shape[-1]
    Hd = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    x2 = as_rows(x)
    M = x2.shape[0]
    hidden = x.new_empty((M, Hd), dtype=cdt)
    act = x.new_empty((M, Hd) if save_act else (0,), dtype=cdt)
    xhat, mean, rstd = norm_linear(
        x2, norm_weight, norm_bias, eps, fc1_weight, hidden,
        bias=fc1_bias, gelu=GELU_FWD, aux=act if save_act else None,
    )  # fmt: skip
    out = x.new_empty(x.shape, dtype=_out_dtype(x, cdt, residual))
    fused_linear(
        hidden,
        fc2_weight,
        out.view(M, C),
        transpose_w=True,
        bias=fc2_bias,
        res=x2 if residual else None,
    )
    return out, mean, rstd, xhat, act, hidden


_mlp_op = register_op("crossvit_fast::mlp")(mlp_forward)


def mlp_grads(
    dy: Tensor,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    xhat: Tensor,
    act: Tensor,
    hidden: Tensor,
    needs: list[bool],
    after: tuple | None = None,
) -> tuple:
    """Backward steps 1-2 (the module docstring), everything but the LayerNorm backward: dy (M, C)
    rows of the output gradient -> (dxhat (M, C) the gradient of LN(x) in the compute dtype,
    dW1, dW2, the [fc2 | fc1] bias partial rows, dy, `after`'s LayerNorm partial rows), None
    where `needs` (as `mlp_backward`'s) does not ask. `after`: a following block's LayerNorm
    backward still to do, finished by fc2's dgrad (`gemm.residual_dgrad`; dy is then that
    block's input gradient, returned). The block ops finish dxhat in their next GEMM's
    prologue; `mlp_backward` here."""
    _, _, _, need_w1, need_b1, need_w2, need_b2 = needs
    M, C = dy.shape
    Hd = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    # 1. da = (dy @ W2) * GELU'(a); column sums give both bias gradients.
    da = dy.new_empty((M, Hd), dtype=cdt)
    # Both bias gradients' partial sums side by side ([fc2 | fc1] columns): one reduction.
    sums = dy.new_empty((sum_rows(M), C * need_b2 + Hd * need_b1), dtype=torch.float32)
    b2_sum = sums[:, :C] if need_b2 else None
    b1_sum = sums[:, C * need_b2 :] if need_b1 else None
    dy, dy16, after_parts = residual_dgrad(
        dy, fc2_weight, da, after, need_w2, aux=act, gelu=GELU_BWD, a_sum=b2_sum, c_sum=b1_sum
    )
    # 2. cuBLAS for the plain GEMMs (see the module docstring).
    dw2 = torch.mm(dy16.t(), hidden) if need_w2 else None
    dxhat = torch.mm(da, fc1_weight)
    dw1 = torch.mm(da.t(), xhat) if need_w1 else None
    return dxhat, dw1, dw2, sums if need_b1 or need_b2 else None, dy, after_parts


@register_op("crossvit_fast::mlp_backward")
def _mlp_backward_op(
    dout: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    xhat: Tensor,
    act: Tensor,
    hidden: Tensor,
    residual: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dnorm, dfc1_weight, dfc2_weight, dbiases): dnorm the requested rows of
    [dnorm_weight; dnorm_bias] (`layer_norm_bwd`), dbiases = [dfc2_bias | dfc1_bias] for the
    requested ones (one reduction finishes both); `needs`
    flags (x, norm weight, norm bias, fc1 weight, fc1 bias, fc2 weight, fc2 bias); an unneeded
    gradient comes back empty."""
    need_nw, need_nb = needs[1:3]
    C = x.shape[-1]
    x2, dy = as_rows(x), as_rows(dout)
    empty = lambda: x.new_empty(0)  # a distinct placeholder each time: outputs must not alias
    dxhat, dw1, dw2, bias_parts, _, _ = mlp_grads(
        dy, fc1_weight, fc2_weight, xhat, act, hidden, needs
    )
    # 3. LayerNorm backward + residual gradient.
    dx, norm_parts, _ = layer_norm_bwd(
        x2, norm_weight, norm_bias, mean, rstd, dxhat, dy if residual else None, need_nw, need_nb,
        finish=False,
    )  # fmt: skip
    cdt = fc1_weight.dtype
    dnorm, db = finish_block_sums(norm_parts, norm_weight, norm_bias, bias_parts, cdt, C)
    return tuple(t if t is not None else empty() for t in (dx.view(x.shape), dnorm, dw1, dw2, db))


def _mlp_setup(ctx, inputs, output):
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _eps, residual, _ = (
        inputs
    )
    _out, mean, rstd, xhat, act, hidden = output
    ctx.mark_non_differentiable(mean, rstd, xhat, act, hidden)
    # No zero-filled gradients of the saved-for-backward outputs: two (M, hidden) memsets a block.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x, norm_weight, norm_bias, fc1_weight, fc2_weight, mean, rstd, xhat, act, hidden
    )
    ctx.residual = residual
    params = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.has = [t is not None for t in params]  # which inputs can have a gradient


def _mlp_backward(ctx, dout, *_):
    if dout is None:
        return (None,) * 10
    saved = ctx.saved_tensors
    needs = [h and n for h, n in zip(ctx.has, ctx.needs_input_grad[:7])]
    if saved[8].numel() == 0 and saved[0].numel() > 0:
        raise RuntimeError("crossvit_fast::mlp: backward through a call made with save_act=False")
    dx, dnorm, dw1, dw2, db = torch.ops.crossvit_fast.mlp_backward(
        dout, *saved, ctx.residual, needs
    )
    dnw, dnb = split_norm_grads(dnorm, needs[1], needs[2])
    C = saved[0].shape[-1] if needs[6] else 0
    db2, db1 = db[:C], db[C:]  # [fc2 | fc1], only the requested ones
    grads = (dx, dnw, dnb, dw1, db1, dw2, db2)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# -- functional ----------------------------------------------------------------------------------


def mlp_args(x: Tensor, params: MlpParams) -> tuple:
    """`mlp`'s checks (its docstring), then the op's parameter arguments: the LayerNorm affine as
    given and the GEMM weights / biases in the compute dtype (what autocast does to F.linear's
    arguments). Also the `block` op's second half."""
    params = as_params(MlpParams, params)
    check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (B, N, C), got {tuple(x.shape)}")
    C = x.shape[-1]
    check_tensor("fc1_weight", params.fc1_weight, ndim=2, like=x)
    Hd = params.fc1_weight.shape[0]
    check_params(params, x, (C,), (C,), (Hd, C), (Hd,), (C, Hd), (C,))
    cdt = compute_dtype(x, **params._asdict())
    return (*params[:2], *(cast(t, cdt) for t in params[2:]))


def mlp(x: Tensor, params: MlpParams, eps: float, residual: bool = True) -> Tensor:
    """ViT block MLP half: `x + fc2(GELU_erf(fc1(LN(x))))` (`residual=False`: without `x +`).

    x: (B, N, C) (any leading dims), fp32 / fp16 / bf16, any strides; params: `MlpParams`, norm
    (C,) or None, fc1: (Hd, C), fc2: (C, Hd), biases or None. Without autocast every parameter
    has x's dtype; under autocast the GEMMs run in the autocast dtype and LayerNorm in fp32, and
    the output dtype is the reference's (promote(x, autocast dtype) with the residual, else the
    autocast dtype). Batch 0 returns an empty result.
    """
    args = mlp_args(x, params)
    return torch.ops.crossvit_fast.mlp(x, *args, float(eps), bool(residual), saves(x, *args))[0]


OPS = {"mlp": mlp}
