"""The CUDA kernels as torch.library custom ops (`crossvit_fast::<op>_cuda`, or
`crossvit_fast::<op>_<part>` for a piece of an op).

Each op calls a launcher of the compiled extension (csrc/bindings.cpp), has a fake (meta)
kernel so `torch.compile(fullgraph=True)` traces it without running it, and an autograd formula
whose backward is itself a custom op (or plain torch ops), so compiled backward graphs trace too.
Defining the ops loads nothing: the extension is loaded by the first real call
(`build.extension()`).

Ops (shapes: B batch, N1 = 1 + N token rows, C width, H heads; kernel dtypes fp32 / fp16 / bf16):

* ``layer_norm_cuda(x, residual, weight, bias, eps, gelu, out_dtype) -> (y, s, mean, rstd)``:
  y = [GELU](LN(x [+ residual])) in `out_dtype`; s = x + residual (empty without residual);
  mean / rstd: fp32 per row. x: (..., C), C <= 8192.
* ``mlp_bias_gelu(h, bias) -> GELU(h + bias)``, h: (..., C).
* ``token_assemble_cuda(feat, bias, cls_token, pos_embed, out_dtype)``: feat (B, N, D) any strides
  -> (B, 1 + N, D): [cls + pos[0]; feat + bias + pos[1:]].
* ``cross_attention_core(cls, tokens, weight, bias, kt, scale, eps) -> (u, lse, mean, rstd)``:
  the token-side half of the K/V-free CLS cross-attention (csrc/cross_attention.cu); cls (B, C),
  tokens (B, N1, C), kt (B, H, C) fp32 absorbed keys; u (B, H, C) = sum_n softmax_n(scale * kt_h .
  LN(x_n)) LN(x_n) with x_0 = cls and x_n = tokens[:, n]. C <= 4096, H per CTA <= 16.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import build

# One namespace for every backend (the naming rule): a CUDA kernel is `<op>_cuda`, or
# `<op>_<part>` where it is one piece of an op.
NAMESPACE = "crossvit_fast"
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ext():
    return build.extension()


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _cast_grad(g: Tensor | None, like: Tensor | None) -> Tensor | None:
    if g is None or like is None:
        return None
    return g.to(like.dtype).reshape(like.shape)


# -- LayerNorm [+ residual] [+ GELU] ----------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_cuda", mutates_args=())
def layer_norm(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    gelu: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, s, mean, rstd = _ext().ln_fwd(x, residual, weight, bias, eps, gelu, DTYPE_CODE[out_dtype])
    return y, s, mean, rstd


@layer_norm.register_fake
def _(x, residual, weight, bias, eps, gelu, out_dtype):
    rows = _rows(x)
    s = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    stat = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), s, stat, stat.new_empty((rows,))


@torch.library.custom_op(f"{NAMESPACE}::layer_norm_cuda_backward", mutates_args=())
def layer_norm_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    gelu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _ext().ln_bwd(dy, x, mean, rstd, weight, bias, gelu)
    return dx, dw, db


@layer_norm_backward.register_fake
def _(dy, x, mean, rstd, weight, bias, gelu):
    C = x.shape[-1]
    return (
        x.new_empty(x.shape),
        x.new_empty((C,), dtype=torch.float32),
        x.new_empty((C,), dtype=torch.float32),
    )


def _ln_setup(ctx, inputs, output):
    x, residual, weight, bias, _eps, gelu, _out = inputs
    _y, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, mean, rstd, weight, bias)
    ctx.gelu, ctx.has_residual = gelu, residual is not None


def _ln_backward(ctx, dy, ds, _dmean, _drstd):
    src, mean, rstd, weight, bias = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(src.shape, dtype=src.dtype, device=src.device)
    dx, dw, db = layer_norm_backward(dy, src, mean, rstd, weight, bias, ctx.gelu)
    if ds is not None and ds.numel() > 0:  # the sum s was used downstream too
        dx = dx + ds
    return (
        dx,
        dx if ctx.has_residual else None,
        _cast_grad(dw, weight),
        _cast_grad(db, bias),
        None,
        None,
        None,
    )


layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


# -- bias + GELU --------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::mlp_bias_gelu", mutates_args=())
def bias_gelu(h: Tensor, bias: Tensor | None) -> Tensor:
    return _ext().bias_gelu_fwd(h, bias)


@bias_gelu.register_fake
def _(h, bias):
    return h.new_empty(h.shape)


@torch.library.custom_op(f"{NAMESPACE}::mlp_bias_gelu_backward", mutates_args=())
def bias_gelu_backward(dy: Tensor, h: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    dh, db = _ext().bias_gelu_bwd(dy, h, bias)
    return dh, db


@bias_gelu_backward.register_fake
def _(dy, h, bias):
    return h.new_empty(h.shape), h.new_empty((h.shape[-1],), dtype=torch.float32)


def _bg_setup(ctx, inputs, output):
    h, bias = inputs
    ctx.save_for_backward(h, bias)


def _bg_backward(ctx, dy):
    h, bias = ctx.saved_tensors
    dh, db = bias_gelu_backward(dy.to(h.dtype), h, bias)
    return dh, _cast_grad(db, bias)


bias_gelu.register_autograd(_bg_backward, setup_context=_bg_setup)


# -- token assembly -----------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::token_assemble_cuda", mutates_args=())
def token_assemble(
    feat: Tensor, bias: Tensor | None, cls_token: Tensor, pos_embed: Tensor, out_dtype: torch.dtype
) -> Tensor:
    return _ext().token_assemble(feat, bias, cls_token, pos_embed, DTYPE_CODE[out_dtype])


@token_assemble.register_fake
def _(feat, bias, cls_token, pos_embed, out_dtype):
    B, N, D = feat.shape
    return feat.new_empty((B, N + 1, D), dtype=out_dtype)


def _ta_setup(ctx, inputs, output):
    feat, bias, cls_token, pos_embed, _ = inputs
    ctx.meta = [
        (t.dtype, t.shape) if t is not None else None for t in (feat, bias, cls_token, pos_embed)
    ]


def _ta_backward(ctx, dout):
    # The forward is a gather plus broadcast adds: its backward is slicing and batch sums.
    fm, bm, cm, pm = ctx.meta
    dfeat = dout[:, 1:].to(fm[0])
    dbias = dout[:, 1:].sum((0, 1)).to(bm[0]) if bm is not None else None
    dpos = dout.sum(0)
    dcls = dpos[0].to(cm[0]).reshape(cm[1])
    return dfeat, dbias, dcls, dpos.to(pm[0]).reshape(pm[1]), None


token_assemble.register_autograd(_ta_backward, setup_context=_ta_setup)


# -- cross-attention core -----------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::cross_attention_core", mutates_args=())
def cross_attention_core(
    cls: Tensor,
    tokens: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    kt: Tensor,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    u, lse, mean, rstd = _ext().xattn_fwd(cls, tokens, weight, bias, kt, scale, eps)
    return u, lse, mean, rstd


@cross_attention_core.register_fake
def _(cls, tokens, weight, bias, kt, scale, eps):
    B, N1, C = tokens.shape
    H = kt.shape[1]
    f32 = torch.float32
    return (
        kt.new_empty((B, H, C), dtype=f32),
        kt.new_empty((B, H), dtype=f32),
        kt.new_empty((B, N1), dtype=f32),
        kt.new_empty((B, N1), dtype=f32),
    )


@torch.library.custom_op(f"{NAMESPACE}::cross_attention_core_backward", mutates_args=())
def cross_attention_core_backward(
    du: Tensor,
    cls: Tensor,
    tokens: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    kt: Tensor,
    u: Tensor,
    lse: Tensor,
    mean: Tensor,
    rstd: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dcls, dtok, dkt, dw, db = _ext().xattn_bwd(
        du, cls, tokens, weight, bias, kt, u, lse, mean, rstd, scale
    )
    return dcls, dtok, dkt, dw, db


@cross_attention_core_backward.register_fake
def _(du, cls, tokens, weight, bias, kt, u, lse, mean, rstd, scale):
    B, N1, C = tokens.shape
    f32 = torch.float32
    return (
        cls.new_empty((B, C)),
        tokens.new_empty((B, N1, C)),
        kt.new_empty(kt.shape, dtype=f32),
        kt.new_empty((C,), dtype=f32),
        kt.new_empty((C,), dtype=f32),
    )


def _xa_setup(ctx, inputs, output):
    cls, tokens, weight, bias, kt, scale, _eps = inputs
    u, lse, mean, rstd = output
    ctx.save_for_backward(cls, tokens, weight, bias, kt, u, lse, mean, rstd)
    ctx.scale = scale


def _xa_backward(ctx, du, _dlse, _dmean, _drstd):
    cls, tokens, weight, bias, kt, u, lse, mean, rstd = ctx.saved_tensors
    dcls, dtok, dkt, dw, db = cross_attention_core_backward(
        du.float().contiguous(), cls, tokens, weight, bias, kt, u, lse, mean, rstd, ctx.scale
    )
    return dcls, dtok, _cast_grad(dw, weight), _cast_grad(db, bias), dkt, None, None


cross_attention_core.register_autograd(_xa_backward, setup_context=_xa_setup)
