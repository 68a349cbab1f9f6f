"""The backend-table ops of the `cuda` backend (signatures: crossvit_fast.ops.reference).

Each op composes the custom ops of `kernels` (LayerNorm / GELU epilogues, token assembly, the
K/V-free cross-attention core) with cuBLAS GEMMs and PyTorch's SDPA. Autograd flows through
both: the custom ops carry their own backward kernels, the GEMMs are ordinary torch ops.

Autocast: a custom op is opaque to autocast, so under `torch.autocast` every op runs with
autocast switched off inside and applies timm's dtype rules itself: LayerNorm in fp32 (the
kernels normalise in fp32 and store the LN output directly in the GEMM dtype), every Linear /
matmul in the autocast dtype, residual adds by type promotion. The output dtype equals the
reference op's under the same autocast.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ...backends import (
    ClsProjParams,
    CrossAttentionParams,
    FusionParams,
    MlpParams,
    SelfAttentionParams,
    as_params,
)
from .. import reference
from ..common import autocast_dtype, check_params, check_tensor, layer_norm_out_dtype
from . import kernels

# The table ops this backend implements (OPS below); the others fall back to the reference.
__all__ = [
    "OPS",
    "cls_proj",
    "cross_attention",
    "cross_fusion",
    "fusion_stage",
    "layer_norm",
    "mlp",
    "patch_embed",
    "self_attention",
    "token_assemble",
]


def _plan(x: Tensor) -> tuple[torch.dtype, contextlib.AbstractContextManager]:
    """(GEMM dtype, context): the autocast dtype with autocast off inside, or x's dtype."""
    ac = autocast_dtype(x.device.type)
    if ac is None:
        return x.dtype, contextlib.nullcontext()
    return ac, torch.autocast(x.device.type, enabled=False)


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _ln(x, residual, weight, bias, eps, gelu, out_dtype) -> Tensor:
    return kernels.layer_norm(x, residual, weight, bias, float(eps), gelu, out_dtype)[0]


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim. x: (..., C) fp32 / fp16 / bf16, C <= 8192. Under autocast
    the output dtype is F.layer_norm's (`layer_norm_out_dtype`: fp32 on CUDA)."""
    check_tensor("layer_norm x", x)
    C = x.shape[-1]
    check_tensor("layer_norm weight", weight, shape=(C,), like=x, optional=True)
    check_tensor("layer_norm bias", bias, shape=(C,), like=x, optional=True)
    return _ln(x, None, weight, bias, eps, False, layer_norm_out_dtype(x))


def mlp(x: Tensor, params: MlpParams, eps: float, residual: bool = True) -> Tensor:
    """`x + fc2(GELU(fc1(LN(x))))`: LN kernel (output in the GEMM dtype) -> cuBLAS fc1 without bias
    -> bias + GELU kernel -> cuBLAS fc2 with its bias epilogue. x: (..., C)."""
    params = as_params(MlpParams, params)
    norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
    check_tensor("mlp x", x)
    check_tensor("mlp fc1_weight", fc1_weight, ndim=2, like=x)
    C, Hd = x.shape[-1], fc1_weight.shape[0]
    check_params(params, x, (C,), (C,), (Hd, C), (Hd,), (C, Hd), (C,), prefix="mlp ")
    ct, ctx = _plan(x)
    with ctx:
        h = F.linear(_ln(x, None, norm_weight, norm_bias, eps, False, ct), fc1_weight.to(ct))
        y = F.linear(kernels.bias_gelu(h, fc1_bias), fc2_weight.to(ct), _to(fc2_bias, ct))
    return x + y if residual else y


def self_attention(
    x: Tensor, params: SelfAttentionParams, num_heads: int, eps: float, residual: bool = True
) -> Tensor:
    """`x + proj(MHSA(LN(x)))`: LN kernel -> cuBLAS qkv -> PyTorch SDPA (flash) -> cuBLAS proj.
    x: (B, N, C), C % num_heads == 0."""
    params = as_params(SelfAttentionParams, params)
    norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias = params
    check_tensor("self_attention x", x, ndim=3)
    B, N, C = x.shape
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"self_attention: C = {C} must be divisible by num_heads = {num_heads}")
    shapes = ((C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,))
    check_params(params, x, *shapes, prefix="self_attention ")
    ct, ctx = _plan(x)
    with ctx:
        n = _ln(x, None, norm_weight, norm_bias, eps, False, ct)
        qkv = F.linear(n, qkv_weight.to(ct), _to(qkv_bias, ct))
        q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        y = F.linear(o.transpose(1, 2).reshape(B, N, C), proj_weight.to(ct), _to(proj_bias, ct))
    return x + y if residual else y


def cls_proj(x: Tensor, params: ClsProjParams, eps: float) -> Tensor:
    """`Linear(GELU(LN(x)))`: one LN + GELU kernel (output in the GEMM dtype) -> cuBLAS.
    x: (..., C_in), rows may be strided (e.g. the CLS column y[:, 0])."""
    params = as_params(ClsProjParams, params)
    norm_weight, norm_bias, weight, bias = params
    check_tensor("cls_proj x", x)
    check_tensor("cls_proj weight", weight, ndim=2, like=x)
    C_out, C_in = weight.shape[0], x.shape[-1]
    check_params(params, x, (C_in,), (C_in,), (C_out, C_in), (C_out,), prefix="cls_proj ")
    ct, ctx = _plan(x)
    with ctx:
        return F.linear(
            _ln(x, None, norm_weight, norm_bias, eps, True, ct), weight.to(ct), _to(bias, ct)
        )


class _KeyBias(torch.autograd.Function):
    """Ties the key bias into the graph with its exact gradient, zero: bk shifts every score of a
    head by the same amount, which softmax removes, so the K/V-free form never uses it. timm's
    bk gets a (rounding-noise) gradient; without this it would get None."""

    @staticmethod
    def forward(ctx, kt: Tensor, bk: Tensor) -> Tensor:
        ctx.bk = (bk.shape, bk.dtype, bk.device)
        return kt.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        shape, dtype, device = ctx.bk
        return g, torch.zeros(shape, dtype=dtype, device=device)


def cross_attention(
    cls: Tensor,
    tokens: Tensor,
    params: CrossAttentionParams,
    num_heads: int,
    eps: float,
    residual: bool = True,
) -> Tensor:
    """CLS cross-attention without K and V (docs/cls_cross_attention.md).

    cls: (B, C); tokens: (B, 1 + N, C), rows 1.. attended in place (any row strides); C % heads
    == 0, C <= 4096. cuBLAS: q = Wq LN(cls) + bq, absorbed keys kt_h = Wk_h^T q_h, o_h = Wv_h u_h
    + bv_h, the output projection; the CUDA core streams the tokens once (LN statistics, scores,
    online softmax, u_h = sum_n a_hn LN(x_n)).
    """
    params = as_params(CrossAttentionParams, params)
    norm_weight, norm_bias, wq, bq, wk, bk, wv, bv, proj_weight, proj_bias = params
    check_tensor("cross_attention cls", cls, ndim=2)
    check_tensor("cross_attention tokens", tokens, ndim=3, like=cls)
    B, C = cls.shape
    if tokens.shape[0] != B or tokens.shape[2] != C or tokens.shape[1] < 1:
        raise ValueError(
            f"cross_attention tokens: expected shape ({B}, 1 + N, {C}), got {tuple(tokens.shape)}"
        )
    if num_heads < 1 or C % num_heads:
        raise ValueError(f"cross_attention: C = {C} must be divisible by num_heads = {num_heads}")
    # the norm, then wq / bq .. proj_weight / proj_bias
    check_params(params, cls, (C,), (C,), *[(C, C), (C,)] * 4, prefix="cross_attention ")
    H, d = num_heads, C // num_heads
    ct, ctx = _plan(cls)
    kd = torch.promote_types(cls.dtype, tokens.dtype)  # the reference's cat([cls, tokens]) dtype
    x0, toks = cls.to(kd), tokens.to(kd)
    with ctx:
        q = F.linear(_ln(x0, None, norm_weight, norm_bias, eps, False, ct), wq.to(ct), _to(bq, ct))
        kt = torch.einsum("bhd,hdc->bhc", q.view(B, H, d), wk.to(ct).view(H, d, C)).float()
        if bk is not None and bk.requires_grad and torch.is_grad_enabled():
            kt = _KeyBias.apply(kt, bk)
        u = kernels.cross_attention_core(
            x0, toks, norm_weight, norm_bias, kt.contiguous(), d**-0.5, float(eps)
        )[0]
        o = torch.einsum("bhc,hdc->bhd", u.to(ct), wv.to(ct).view(H, d, C)).reshape(B, C)
        if bv is not None:
            o = o + bv.to(ct)
        y = F.linear(o, proj_weight.to(ct), _to(proj_bias, ct))
    return x0 + y if residual else y  # residual on the promoted CLS, as the reference


def cross_fusion(
    cls: Tensor, tokens: Tensor, params: FusionParams, num_heads: int, eps: float
) -> Tensor:
    """projs -> cross-attention -> revert_projs. The attention's residual add is fused into the
    revert LayerNorm (LN(c + y) -> GELU in one kernel, the sum kept for its backward)."""
    proj, attn, revert = as_params(FusionParams, params)
    revert = as_params(ClsProjParams, revert)
    revert_norm_weight, revert_norm_bias, revert_weight, revert_bias = revert
    c = cls_proj(cls, proj, eps)
    y = cross_attention(c, tokens, attn, num_heads, eps, residual=False)
    check_tensor("cross_fusion revert weight", revert_weight, ndim=2, like=c)
    C_out, C_in = revert_weight.shape[0], c.shape[-1]
    shapes = ((C_in,), (C_in,), (C_out, C_in), (C_out,))
    check_params(revert, c, *shapes, prefix="cross_fusion revert ")
    ct, ctx = _plan(c)
    # The residual base is the CLS as the reference's cat([c, tokens]) promotes it (autocast:
    # a bf16 c becomes fp32), so the sum LN(c + y) normalises is the reference's fp32 sum.
    if c.dtype != tokens.dtype:
        c = c.to(torch.promote_types(c.dtype, tokens.dtype))
    if y.dtype != c.dtype:
        y = y.to(c.dtype)
    with ctx:
        g = _ln(y, c, revert_norm_weight, revert_norm_bias, eps, True, ct)
        return F.linear(g, revert_weight.to(ct), _to(revert_bias, ct))


def token_assemble(feat: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
    """`cat(cls_token, flatten(feat)) + pos_embed` in one kernel. feat: (B, D, h, w) (NCHW or
    channels-last, read through its strides); cls_token: (1, 1, D); pos_embed: (1, 1 + h*w, D)."""
    check_tensor("token_assemble feat", feat, ndim=4)
    _, D, h, w = feat.shape
    check_tensor("token_assemble cls_token", cls_token, shape=(1, 1, D), like=feat)
    check_tensor("token_assemble pos_embed", pos_embed, shape=(1, 1 + h * w, D), like=feat)
    out = torch.promote_types(torch.promote_types(feat.dtype, cls_token.dtype), pos_embed.dtype)
    t = feat.flatten(2).transpose(1, 2)  # (B, N, D) view for NCHW and channels-last alike
    return kernels.token_assemble(t, None, cls_token.contiguous(), pos_embed.contiguous(), out)


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, cls_token: Tensor, pos_embed: Tensor
) -> Tensor:
    """Patch conv (kernel = stride = p) as a cuBLAS GEMM on the (B * N, C_in * p * p) patches,
    then bias + CLS + position embedding written into the token tensor by one kernel.
    x: (B, C_in, H, W), H and W divisible by p; weight: (D, C_in, p, p)."""
    check_tensor("patch_embed x", x, ndim=4)
    check_tensor("patch_embed weight", weight, ndim=4, like=x)
    B, Cin, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    if weight.shape[1] != Cin or weight.shape[2] != p:
        raise ValueError(
            f"patch_embed weight: expected shape (D, {Cin}, p, p), got {tuple(weight.shape)}"
        )
    if H % p or W % p:
        raise ValueError(f"patch_embed: image size {H}x{W} must be divisible by the patch size {p}")
    h, w = H // p, W // p
    check_tensor("patch_embed bias", bias, shape=(D,), like=x, optional=True)
    check_tensor("patch_embed cls_token", cls_token, shape=(1, 1, D), like=x)
    check_tensor("patch_embed pos_embed", pos_embed, shape=(1, 1 + h * w, D), like=x)
    ct, ctx = _plan(x)
    with ctx:
        patches = (
            x.to(ct)
            .reshape(B, Cin, h, p, w, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(B * h * w, Cin * p * p)
        )
        feat = (patches @ weight.to(ct).reshape(D, Cin * p * p).t()).view(B, h * w, D)
        out = torch.promote_types(torch.promote_types(ct, cls_token.dtype), pos_embed.dtype)
        return kernels.token_assemble(
            feat, bias, cls_token.contiguous(), pos_embed.contiguous(), out
        )


def block(x, params, num_heads, eps):
    """The reference's block over this backend's `self_attention` and `mlp` (no block kernel
    here)."""
    return reference.block(x, params, num_heads, eps, attend=self_attention, feed=mlp)


def blocks(x, params, num_heads, eps):
    """The reference's `blocks` over this backend's `block`."""
    return reference.blocks(x, params, num_heads, eps, step=block)


def fusion_stage(ys, params, num_heads, eps, cls_only=False):
    """The reference's stage over this backend's `cross_fusion` (no stage kernel here: the
    token gradients are summed by autograd, as the ops compose)."""
    return reference.fusion_stage(ys, params, num_heads, eps, cls_only, fuse=cross_fusion)


OPS = {
    "patch_embed": patch_embed,
    "token_assemble": token_assemble,
    "self_attention": self_attention,
    "mlp": mlp,
    "block": block,
    "blocks": blocks,
    "cls_proj": cls_proj,
    "cross_attention": cross_attention,
    "cross_fusion": cross_fusion,
    "fusion_stage": fusion_stage,
    "layer_norm": layer_norm,
}
