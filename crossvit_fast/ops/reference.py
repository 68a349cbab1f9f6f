"""Pure-PyTorch reference ops: the numerical spec of every op in the backend table.

These follow timm's `crossvit.py` / `vision_transformer.py` op for op (see
`docs/architecture.md`), so that the whole reference model matches timm to float64
rounding. Every fast backend is tested against the functions here; tests and benchmarks import
them, never copy them.

Conventions shared by every backend (the op signatures of the table, see `crossvit_fast.backends`):

* Token tensors are `(B, N, C)`; LayerNorms take `(weight, bias, eps)`; linear weights use the
  `nn.Linear` layout `(out, in)`; any bias may be `None`. An op with several weights takes them
  as one `params` group per sub-layer (`crossvit_fast.backends`: `SelfAttentionParams`,
  `MlpParams`, `ClsProjParams`, `CrossAttentionParams`; `cross_fusion` a `FusionParams` of three),
  a plain tuple of the fields also works.
* Ops that end in a residual add take `residual: bool`. `residual=True` returns `x + f(x)` (the
  fused form used in eval / when drop-path is inactive); `residual=False` returns `f(x)` alone so
  the module can apply per-sample drop-path before adding.
* The dropout arguments (`attn_drop`, `proj_drop`, `mlp_drop`) exist only here: this backend
  declares them (`DROPOUT_OPS`), and the backend table serves a call with active dropout from a
  backend that declares it (`crossvit_fast.backends.OpSet.with_dropout`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import (
    OPS,
    AttentionLayerParams,
    BlockParams,
    ClsProjParams,
    CrossAttentionLayerParams,
    CrossAttentionParams,
    FusionParams,
    MlpLayerParams,
    MlpParams,
    SelfAttentionParams,
    as_params,
)
from .common import check_stage_args

# The table's ops (crossvit_fast.backends.OPS): this module defines each under its op name.
__all__ = [*OPS, "DROPOUT_OPS"]


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim. x: (..., C)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _add_residual(x: Tensor, y: Tensor, residual: bool) -> Tensor:
    return x + y if residual else y


def mlp_layer(x: Tensor, params: MlpLayerParams, mlp_drop: float = 0.0) -> Tensor:
    """timm's `Mlp` alone: `fc2(GELU_erf(fc1(x)))`, x (..., C) already normalised. Dropout
    `mlp_drop` after GELU and after fc2 (timm's drop1 / drop2), only when > 0."""
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = as_params(MlpLayerParams, params)
    h = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    if mlp_drop > 0:
        h = F.dropout(h, mlp_drop)
    y = F.linear(h, fc2_weight, fc2_bias)
    if mlp_drop > 0:
        y = F.dropout(y, mlp_drop)
    return y


def mlp(
    x: Tensor, params: MlpParams, eps: float, residual: bool = True, mlp_drop: float = 0.0
) -> Tensor:
    """ViT block MLP half: `x + fc2(GELU_erf(fc1(LN(x))))` (`mlp_layer` after norm2).

    x: (B, N, C); params: `MlpParams` (fc1: (Hd, C); fc2: (C, Hd)).
    """
    params = as_params(MlpParams, params)
    n = layer_norm(x, params.norm_weight, params.norm_bias, eps)
    return _add_residual(x, mlp_layer(n, MlpLayerParams._make(params[2:]), mlp_drop), residual)


def attention_layer(
    x: Tensor,
    params: AttentionLayerParams,
    num_heads: int,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> Tensor:
    """timm's `Attention` alone (its fused SDPA path): `proj(MHSA(x))`, x (B, N, C) already
    normalised, C % num_heads == 0; qkv_weight (3C, C) laid out [q | k | v], head-major."""
    qkv_weight, qkv_bias, proj_weight, proj_bias = as_params(AttentionLayerParams, params)
    B, N, C = x.shape
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
    y = F.linear(o.transpose(1, 2).reshape(B, N, C), proj_weight, proj_bias)
    return F.dropout(y, proj_drop) if proj_drop > 0 else y


def self_attention(
    x: Tensor,
    params: SelfAttentionParams,
    num_heads: int,
    eps: float,
    residual: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> Tensor:
    """ViT block attention half: `x + proj(MHSA(LN(x)))` (`attention_layer` after norm1).

    x: (B, N, C); params: `SelfAttentionParams`.
    """
    params = as_params(SelfAttentionParams, params)
    n = layer_norm(x, params.norm_weight, params.norm_bias, eps)
    layer = AttentionLayerParams._make(params[2:])
    return _add_residual(x, attention_layer(n, layer, num_heads, attn_drop, proj_drop), residual)


def block(
    x: Tensor, params: BlockParams, num_heads: int, eps: float, *, attend=None, feed=None
) -> Tensor:
    """timm's Block without drop-path or dropout: `mlp(self_attention(x))`, both with the
    residual. x: (B, N, C); params: `BlockParams`. `attend` / `feed`: the `self_attention` /
    `mlp` to compose (a backend without a block op of its own passes its own; default this
    module's)."""
    attend = self_attention if attend is None else attend
    feed = mlp if feed is None else feed
    attn, ffn = as_params(BlockParams, params)
    return feed(attend(x, attn, num_heads, eps), ffn, eps)


def blocks(
    x: Tensor, params: list[BlockParams], num_heads: int, eps: float, *, step=None
) -> Tensor:
    """A branch's blocks of one stage, one after the other: each a `block`. x: (B, N, C);
    params: one `BlockParams` per block. `step`: the `block` to compose (a backend without a
    `blocks` op of its own passes its `block`; default this module's)."""
    step = block if step is None else step
    for p in params:
        x = step(x, p, num_heads, eps)
    return x


def cls_proj(x: Tensor, params: ClsProjParams, eps: float) -> Tensor:
    """CrossViT `projs` / `revert_projs`: `Linear(GELU_erf(LN(x)))`. x: (..., C_in) -> (..., C_out)."""
    norm_weight, norm_bias, weight, bias = as_params(ClsProjParams, params)
    return F.linear(F.gelu(layer_norm(x, norm_weight, norm_bias, eps)), weight, bias)


def cross_attention_layer(
    x: Tensor,
    params: CrossAttentionLayerParams,
    num_heads: int,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> Tensor:
    """timm's `CrossAttention` alone (its manual path: scale applied *after* q @ k^T): row 0 of
    x (B, L, C), already normalised, attends over all L rows. Returns (B, 1, C)."""
    wq, bq, wk, bk, wv, bv, proj_weight, proj_bias = as_params(CrossAttentionLayerParams, params)
    B, L, C = x.shape
    H, d = num_heads, C // num_heads
    q = F.linear(x[:, 0:1], wq, bq).reshape(B, 1, H, d).permute(0, 2, 1, 3)
    k = F.linear(x, wk, bk).reshape(B, L, H, d).permute(0, 2, 1, 3)
    v = F.linear(x, wv, bv).reshape(B, L, H, d).permute(0, 2, 1, 3)
    a = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
    if attn_drop > 0:
        a = F.dropout(a, attn_drop)
    y = F.linear((a @ v).transpose(1, 2).reshape(B, 1, C), proj_weight, proj_bias)
    return F.dropout(y, proj_drop) if proj_drop > 0 else y


def cross_attention(
    cls: Tensor,
    tokens: Tensor,
    params: CrossAttentionParams,
    num_heads: int,
    eps: float,
    residual: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> Tensor:
    """CrossViT `CrossAttentionBlock` (code fusion depth 0): the CLS query attends over itself and
    the other branch's patch tokens.

    cls: (B, C) projected CLS token; tokens: (B, 1 + N, C), rows 1.. are used (row 0, the other
    branch's own CLS, is ignored); params: `CrossAttentionParams`. Returns (B, C):
    `cls + proj(attn)` (`residual=True`) or the attention output alone (`cross_attention_layer`
    after norm1).

    dtypes: timm runs the block on `cat(cls, tokens[:, 1:])`, which promotes (under autocast a
    bf16 / fp16 projected CLS meets fp32 tokens: the sequence is fp32), and adds the residual to
    row 0 of that sequence. So does this: the output is promote(cls, tokens) + y (fp32 under
    autocast), never rounded to the low-precision dtype.
    """
    params = as_params(CrossAttentionParams, params)
    s = torch.cat([cls.unsqueeze(1), tokens[:, 1:]], dim=1)  # (B, 1 + N, C)
    n = layer_norm(s, params.norm_weight, params.norm_bias, eps)
    layer = CrossAttentionLayerParams._make(params[2:])
    y = cross_attention_layer(n, layer, num_heads, attn_drop, proj_drop).squeeze(1)
    return _add_residual(s[:, 0], y, residual)


def cross_fusion(
    cls: Tensor, tokens: Tensor, params: FusionParams, num_heads: int, eps: float
) -> Tensor:
    """One whole fusion step for branch i (fusion depth 0, drop-path inactive):
    `revert_projs[i](fusion[i](projs[i](cls_i), tokens_j))`.

    cls: (B, C_i) branch i's CLS after its blocks; tokens: (B, 1 + N_j, C_j) branch j's tokens
    after its blocks. params: `FusionParams`, grouped per sub-layer (crossvit_fast.backends): proj
    (projs[i]: C_i -> C_j) and revert (revert_projs[i]: C_j -> C_i) are `ClsProjParams`, attn
    (fusion[i], width C_j) is `CrossAttentionParams`, each passed on to `cls_proj` /
    `cross_attention`. Returns branch i's new CLS (B, C_i). num_heads is branch j's head count.
    """
    proj, attn, revert = as_params(FusionParams, params)
    c = cls_proj(cls, proj, eps)
    f = cross_attention(c, tokens, attn, num_heads, eps)
    return cls_proj(f, revert, eps)


def fusion_stage(
    ys: list[Tensor],
    params: list[FusionParams],
    num_heads: list[int],
    eps: float,
    cls_only: bool = False,
    *,
    fuse=None,
) -> list[Tensor]:
    """timm's MultiScaleBlock after its blocks, every fusion step a `cross_fusion`: branch i's
    new CLS = cross_fusion(ys[i][:, 0], ys[(i + 1) % nb], params[i], num_heads[i], eps), its
    output cat(new CLS, ys[i][:, 1:]) (`cls_only`: the new CLS alone, (B, 1, C_i)).

    ys: per branch (B, 1 + N_i, C_i); params: one `FusionParams` per branch; num_heads: per
    fusion step, the attended branch j's head count. `fuse`: the `cross_fusion` to compose (a
    backend without a stage of its own passes its `cross_fusion`; default this module's).
    Returns one tensor per branch.
    """
    fuse = cross_fusion if fuse is None else fuse
    check_stage_args(ys, params, num_heads)
    nb, outs = len(ys), []
    for i in range(nb):
        cls = fuse(ys[i][:, 0], ys[(i + 1) % nb], params[i], num_heads[i], eps).unsqueeze(1)
        outs.append(cls if cls_only else torch.cat([cls, ys[i][:, 1:]], dim=1))
    return outs


def token_assemble(feat: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
    """Patch features to the token tensor: `cat(cls_token, flatten(feat)) + pos_embed`.

    feat: (B, D, h, w) (the stem's output); cls_token: (1, 1, D); pos_embed: (1, 1 + h*w, D).
    Returns (B, 1 + h*w, D), patches in row-major (h, w) order.
    """
    t = feat.flatten(2).transpose(1, 2)
    cls = cls_token.expand(t.shape[0], -1, -1)
    return torch.cat([cls, t], dim=1) + pos_embed


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, cls_token: Tensor, pos_embed: Tensor
) -> Tensor:
    """Plain patch embedding (conv with kernel = stride = p) + CLS + position embedding.

    x: (B, C_in, H, W) with H, W divisible by p; weight: (D, C_in, p, p). Returns (B, 1 + N, D).
    """
    p = weight.shape[-1]
    return token_assemble(F.conv2d(x, weight, bias, stride=p), cls_token, pos_embed)


# -- backend-table interface (see crossvit_fast.backends) -----------------------------------------


def cast_params(params: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each tensor in `dtype`, one cast each: what autocast does to a Linear / Conv parameter at
    its use."""
    return [p.to(dtype) for p in params]


# Ops whose implementation here takes the dropout arguments (see the module docstring).
DROPOUT_OPS = frozenset(
    {
        "self_attention",
        "mlp",
        "cross_attention",
        "attention_layer",
        "mlp_layer",
        "cross_attention_layer",
    }
)


def availability(device_type: str) -> tuple[bool, str]:
    return True, "pure PyTorch, runs on every device"


def ops() -> dict:
    return {name: globals()[name] for name in OPS}
