"""A whole ViT block as one op: `mlp(self_attention(x))`, both halves with their residual.

Forward is the two halves' forwards one after the other (`attention_forward`, `mlp_forward`:
the same kernels, nothing saved twice). What one op buys is the backward: the MLP half's
LayerNorm backward is not a launch of its own. Its result, the attention half's output gradient
dy_mid = dy + LN2-backward(dxhat2), is what the attention's proj dgrad reads first, so the proj
dgrad (the resident GEMM, `fused_linear(dnorm=...)`) computes it in its prologue: dy_mid is
written once (it is also the residual gradient of LN1's backward) and never read back by a
separate LayerNorm launch. Per crossvit_18 block at B = 256 that is one launch and one read of
an (M, C) fp32 tensor fewer (90 MB of the large branch). Where the resident plan does not run
(fp32 compute, K > 512, too few rows) the LayerNorm backward runs first, as in `mlp`.

Ladder: kernels (`gemm.py`, `layer_norm.py`, SDPA) -> the halves' steps (`attention_forward` /
`attention_grads`, `mlp_forward` / `mlp_grads`) -> ops `crossvit_fast::block[_backward]` ->
functional `block`. Drop-path, dropout and hooks are not this op's: the model runs the two half
ops then (blocks.Block).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...backends import BlockParams, as_params
from .layer_norm import as_rows, split_norm_grads
from .mlp import mlp_args, mlp_forward, mlp_grads
from .self_attention import attention_args, attention_forward, attention_grads
from .utils import empty, finish_block_sums, input_grads, register_op, saves

__all__ = ["OPS", "block", "block_args", "grads_of"]

_PARAMS = (
    "norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
    "norm2_weight", "norm2_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
)  # fmt: skip


@register_op("crossvit_fast::block")
def _block_op(
    x: Tensor,
    norm1_weight: Tensor | None,
    norm1_bias: Tensor | None,
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    norm2_weight: Tensor | None,
    norm2_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    num_heads: int,
    eps: float,
    save: bool,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, list[Tensor],
]:  # fmt: skip
    """(out, x_mid, mean1, rstd1, xhat1, qkv, o, mean2, rstd2, xhat2, act, hidden, sdpa_saved):
    x_mid the attention half's output (the MLP half's input), then what each half's op saves
    (`self_attention`, `mlp`; empty without `save`). Arguments: the two halves' in order."""
    x_mid, mean1, rstd1, xhat1, qkv, o, sdpa_saved = attention_forward(
        x, norm1_weight, norm1_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads,
        eps, True, save,
    )  # fmt: skip
    out, mean2, rstd2, xhat2, act, hidden = mlp_forward(
        x_mid, norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, True,
        save,
    )  # fmt: skip
    return out, x_mid, mean1, rstd1, xhat1, qkv, o, mean2, rstd2, xhat2, act, hidden, sdpa_saved


@register_op("crossvit_fast::block_backward")
def _block_backward_op(
    dout: Tensor,
    x: Tensor,
    x_mid: Tensor,
    norm1_weight: Tensor | None,
    norm1_bias: Tensor | None,
    qkv_weight: Tensor,
    proj_weight: Tensor,
    norm2_weight: Tensor | None,
    norm2_bias: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    mean1: Tensor,
    rstd1: Tensor,
    xhat1: Tensor,
    qkv: Tensor,
    o: Tensor,
    mean2: Tensor,
    rstd2: Tensor,
    xhat2: Tensor,
    act: Tensor,
    hidden: Tensor,
    sdpa_saved: list[Tensor],
    num_heads: int,
    needs: list[bool],
    after: list[Tensor | None],
    defer: bool,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:  # fmt: skip
    """(dx, dnorm1, dqkv_weight, dproj_weight, dbiases1, dnorm2, dfc1_weight, dfc2_weight,
    dbiases2, dnorm_after, dxhat1): dnorm* the [dweight; dbias] rows of each LayerNorm affine
    present, dbiases1 = [dproj_bias | dqkv_bias], dbiases2 = [dfc2_bias | dfc1_bias], the
    requested ones; `needs`: one flag per parameter, in `_PARAMS` order. An unneeded or absent
    gradient comes back empty.

    The `blocks` op's chaining (empty / False for one block): `after` = [x_out, weight, bias,
    mean, rstd, dxhat] of the next block's LN1, whose backward this block's fc2 dgrad finishes
    (dout is then that block's residual gradient; dnorm_after its LN1's rows). `defer`: this
    block's own LN1 backward is left to the block before it: dx is then its residual gradient
    (the attention half's output gradient) and dxhat1 the gradient of LN1's output, dnorm1
    empty."""
    cdt, C = qkv_weight.dtype, x.shape[-1]
    has_n2 = [norm2_weight is not None, norm2_bias is not None]
    after = tuple(after) if after else None
    # The MLP half to the gradient of LN2's output (fc2's dgrad finishing `after`); its own
    # LayerNorm backward is left to the proj dgrad's prologue (`attention_grads(after=...)`).
    dxhat2, dw1, dw2, bias2_parts, dy, after_parts = mlp_grads(
        as_rows(dout), fc1_weight, fc2_weight, xhat2, act, hidden, [True, *has_n2, *needs[8:]],
        after,
    )  # fmt: skip
    mid = (as_rows(x_mid), norm2_weight, norm2_bias, mean2, rstd2, dxhat2)
    dx, norm1_parts, dwqkv, dwp, bias1_parts, norm2_parts = attention_grads(
        dy.view(x.shape), x, norm1_weight, norm1_bias, qkv_weight, proj_weight, mean1, rstd1,
        xhat1, qkv, o, sdpa_saved, num_heads, True, needs[:6], after=mid, defer=defer,
    )  # fmt: skip
    # Three LayerNorms' partial rows and two bias buffers, finished two at a time (one launch
    # each): a deferred LN1's place goes to `after`'s.
    dxhat1, dnorm1, dnorm_after = (norm1_parts, None, None) if defer else (None, None, None)
    next_norm = after[1:3] if after is not None else (None, None)
    if defer:
        dnorm_after, db1 = finish_block_sums(after_parts, *next_norm, bias1_parts, cdt, C)
    else:
        dnorm1, db1 = finish_block_sums(norm1_parts, norm1_weight, norm1_bias, bias1_parts, cdt, C)
        if after_parts is not None:
            dnorm_after, _ = finish_block_sums(after_parts, *next_norm, None, cdt, C)
    dnorm2, db2 = finish_block_sums(norm2_parts, norm2_weight, norm2_bias, bias2_parts, cdt, C)
    grads = (
        dx.view(x.shape), dnorm1, dwqkv, dwp, db1, dnorm2, dw1, dw2, db2, dnorm_after, dxhat1
    )  # fmt: skip
    return tuple(t if t is not None else empty(x) for t in grads)


def grads_of(
    needs: list[bool], has: list[bool], C: int, dnorm1: Tensor, n1_rows: tuple, dwqkv: Tensor,
    dwp: Tensor, db1: Tensor, dnorm2: Tensor, dw1: Tensor, dw2: Tensor, db2: Tensor,
) -> list:  # fmt: skip
    """A block's 12 parameter gradients in `_PARAMS` order (None where not needed) from
    `block_backward`'s outputs; `has`: which parameters exist; dnorm1 holds the rows of LN1's
    (weight, bias) that `n1_rows` flags (its own backward: the needed ones; finished by the
    block before it as `dnorm_after`: the ones present)."""
    dn1w, dn1b = split_norm_grads(dnorm1, *n1_rows)
    dn2w, dn2b = split_norm_grads(dnorm2, has[6], has[7])  # (the ones present)
    cp, c2 = C * needs[5], C * needs[11]  # where the qkv / fc1 bias gradients start
    grads = (
        dn1w, dn1b, dwqkv, db1[cp:], dwp, db1[:cp], dn2w, dn2b, dw1, db2[c2:], dw2, db2[:c2]
    )  # fmt: skip
    return [g if need else None for g, need in zip(grads, needs)]


def _block_setup(ctx, inputs, output):
    x, *params = inputs[:13]
    heads = inputs[13]
    _out, x_mid, *saved, sdpa_saved = output
    ctx.mark_non_differentiable(x_mid, *saved, *sdpa_saved)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of the saved outputs
    n1w, n1b, wqkv, _, wp, _, n2w, n2b, w1, _, w2, _ = params
    ctx.save_for_backward(
        x, x_mid, n1w, n1b, wqkv, wp, n2w, n2b, w1, w2, *saved, *sdpa_saved
    )  # fmt: skip
    ctx.heads = heads
    ctx.has = [t is not None for t in params]  # which parameters can have a gradient


def _block_backward(ctx, dout, *_):
    if dout is None:
        return (None,) * 16
    x, x_mid, n1w, n1b, wqkv, wp, n2w, n2b, w1, w2, *saved = ctx.saved_tensors
    if saved[3].numel() == 0 and x.numel() > 0:
        raise RuntimeError("crossvit_fast::block: backward through a call with save=False")
    needs = [h and n for h, n in zip(ctx.has, ctx.needs_input_grad[1:13])]
    dx, dnorm1, *rest = torch.ops.crossvit_fast.block_backward(
        dout, x, x_mid, n1w, n1b, wqkv, wp, n2w, n2b, w1, w2, *saved[:10], saved[10:],
        ctx.heads, needs, [], False,
    )  # fmt: skip
    grads = grads_of(needs, ctx.has, x.shape[-1], dnorm1, needs[:2], *rest[:7])
    return input_grads("crossvit_fast::block", x=dx, **dict(zip(_PARAMS, grads)))


_block_op.register_autograd(_block_backward, setup_context=_block_setup)


# -- functional ------------------------------------------------------------------------------------


def block(x: Tensor, params: BlockParams, num_heads: int, eps: float) -> Tensor:
    """A ViT block without drop-path or dropout: `mlp(self_attention(x))`, each with the residual.

    x: (B, N, C), fp32 / fp16 / bf16, any strides, C % num_heads == 0; params: `BlockParams`
    (`self_attention`'s group, then `mlp`'s), with their shapes, dtype rules and limits.
    """
    args = block_args(x, as_params(BlockParams, params), num_heads)
    return torch.ops.crossvit_fast.block(x, *args, num_heads, float(eps), saves(x, *args))[0]


def block_args(x: Tensor, params: BlockParams, num_heads: int) -> tuple:
    """The two halves' checks and parameter arguments (`attention_args`, `mlp_args`), flat."""
    return (*attention_args(x, params.attn, num_heads), *mlp_args(x, params.mlp))


OPS = {"block": block}
