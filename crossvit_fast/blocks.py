"""timm's CrossViT layers (`timm.models.crossvit` / `vision_transformer`): the same modules, names
and parameters, with timm's forwards, each run through the backend table (`crossvit_fast.backends`).

Every module here holds the model's `OpSets` by reference (`CrossViT` hands its own to each), so a
submodule called on its own (`model.blocks[0].blocks[0][0](x)`) runs the model's backend.

* `Block` runs as one table op (`block`: both halves, each LayerNorm + sub-layer + residual), or
  with drop-path or dropout active as its two halves (`self_attention`, `mlp`);
  `CrossAttentionBlock` as `cross_attention`.
* The sub-layers `Attention`, `Mlp` and `CrossAttention` have timm's forward too (input already
  normalised, no residual): the table's `attention_layer`, `mlp_layer`, `cross_attention_layer`.
* Forward hooks: hooks on a block fire as in timm. Hooks (forward or backward) on a block's norms or
  sub-layers make that block run them one by one, as timm does, so the hooks see timm's tensors;
  the `nn.Linear` layers inside a sub-layer only hold parameters (their own hooks do not fire).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from . import backends

__all__ = ["Attention", "Block", "CrossAttention", "CrossAttentionBlock", "Mlp", "PatchEmbed"]


class TableModule(nn.Module):
    """A module that runs table ops: `_ops` is the model's `OpSets` (a stand-alone module gets
    its own "auto" one until a `CrossViT` replaces it)."""

    def __init__(self):
        super().__init__()
        self._ops = backends.OpSets()

    def opset(self, x: Tensor, ops=None) -> backends.OpSet:
        """`ops` when the caller passes them (the model: with its casts bound), else the model's
        resolved ops for x's device."""
        return ops if ops is not None else self._ops.get(x.device.type)


def _p(module: nn.Module, name: str) -> Tensor | None:
    """A parameter of `module` or None (Identity LayerNorm affine / bias=False)."""
    return getattr(module, name, None)


def ln_params(norm: nn.LayerNorm) -> tuple:
    return (_p(norm, "weight"), _p(norm, "bias"))


def linear_params(param, *layers: nn.Linear) -> tuple:
    """(weight, bias) of each layer in turn, each through `param` (an OpSet's)."""
    return tuple(param(t) for lin in layers for t in (lin.weight, lin.bias))


def hooked(*modules: nn.Module) -> bool:
    """Whether any of `modules` has forward or backward hooks of its own."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in modules
    )


def table_op(ops, op: str, training: bool, **rates: float):
    """The table's `op`, or the implementation that takes its dropout arguments (with `rates`
    bound) when a rate is active in training: a backend's declared capability (DROPOUT_OPS)."""
    if training and any(r > 0 for r in rates.values()):
        return functools.partial(ops.with_dropout(op), **rates)
    return getattr(ops, op)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Per-sample stochastic depth (timm's DropPath, scale_by_keep=True)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def _residual_op(op, x: Tensor, args: tuple, rate: float, training: bool) -> Tensor:
    """Run a residual op fused (`x + f(x)` in one op) unless drop-path is active, in which case
    the op returns f(x) and the per-sample mask is applied before the add."""
    if rate > 0.0 and training:
        return x + drop_path(op(x, *args, residual=False), rate, training)
    return op(x, *args, residual=True)


class PatchEmbed(TableModule):
    """Conv stem of one branch: a patch conv (kernel = stride = p) or the dagger 3-conv stem."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int, multi_conv: bool):
        super().__init__()
        self.img_size = tuple(img_size)
        self.patch_size = patch_size
        self.multi_conv = multi_conv
        if not multi_conv:
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            return
        d4, d2 = embed_dim // 4, embed_dim // 2
        # Strides 4/3/1 (p=12) and 4/2/2 (p=16): total stride = patch size.
        s2, p2, s3 = (3, 0, 1) if patch_size == 12 else (2, 1, 2)
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, d4, kernel_size=7, stride=4, padding=3),
            nn.ReLU(inplace=True),
            nn.Conv2d(d4, d2, kernel_size=3, stride=s2, padding=p2),
            nn.ReLU(inplace=True),
            nn.Conv2d(d2, embed_dim, kernel_size=3, stride=s3, padding=1),
        )

    def forward(self, x: Tensor, cls_token: Tensor | None = None, pos_embed=None, ops=None):
        """x: (B, C_in, H, W) at this branch's img_size. Alone (timm's PatchEmbed.forward): the
        patch tokens (B, N, D), the stem in PyTorch. With cls_token (1, 1, D) and pos_embed
        (1, 1 + N, D), as the model calls it: the token tensor (B, 1 + N, D) with CLS and
        position embedding, by the table's `patch_embed` (or, dagger, `token_assemble`)."""
        if cls_token is None:
            return self.proj(x).flatten(2).transpose(1, 2)
        ops = self.opset(x, ops)
        if not self.multi_conv:
            w, b = ops.param(self.proj.weight), ops.param(self.proj.bias)
            return ops.patch_embed(x, w, b, cls_token, pos_embed)
        # Dagger: the convolutions stay cuDNN; the flatten + CLS + pos step is the table's op.
        return ops.token_assemble(self.proj(x), cls_token, pos_embed)


class Attention(TableModule):
    """timm's Attention: qkv (3C x C) and proj (C x C)."""

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def rates(self) -> dict:
        return dict(attn_drop=self.attn_drop, proj_drop=self.proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """timm's Attention.forward: x (B, N, C), already normalised -> proj(MHSA(x)), (B, N, C)."""
        ops = self.opset(x)
        params = backends.AttentionLayerParams(*linear_params(ops.param, self.qkv, self.proj))
        op = table_op(ops, "attention_layer", self.training, **self.rates())
        return op(x, params, self.num_heads)


class Mlp(TableModule):
    """timm's Mlp: fc1 (hidden x C), fc2 (C x hidden)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x: Tensor) -> Tensor:
        """timm's Mlp.forward: x (..., C), already normalised -> fc2(GELU(fc1(x))), (..., C)."""
        ops = self.opset(x)
        params = backends.MlpLayerParams(*linear_params(ops.param, self.fc1, self.fc2))
        return table_op(ops, "mlp_layer", self.training, mlp_drop=self.drop)(x, params)


class Block(TableModule):
    """Pre-norm ViT block: x + DropPath(Attn(LN1(x))), then x + DropPath(MLP(LN2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = drop_path
        self.eps = eps

    def forward(self, x: Tensor, ops=None) -> Tensor:
        """x: (B, N, C) -> (B, N, C), timm's Block.forward; ops from the model's backend (the
        model passes its per-forward ops, with the GEMM parameters cast once)."""
        a, m, t, rate = self.attn, self.mlp, self.training, self.drop_path
        if hooked(self.norm1, a, self.norm2, m):  # timm's order, module by module
            x = x + drop_path(a(self.norm1(x)), rate, t)
            return x + drop_path(m(self.norm2(x)), rate, t)
        ops = self.opset(x, ops)
        attn, ffn = self.params(ops)
        if self.whole():
            # The whole block as one op: its backward finishes the MLP's LayerNorm gradient in
            # the attention's first GEMM (a Triton backend's; others compose the two halves).
            return ops.block(x, backends.BlockParams(attn, ffn), a.num_heads, self.eps)
        op = table_op(ops, "self_attention", t, **a.rates())
        x = _residual_op(op, x, (attn, a.num_heads, self.eps), rate, t)
        op = table_op(ops, "mlp", t, mlp_drop=m.drop)
        return _residual_op(op, x, (ffn, self.eps), rate, t)

    def params(self, ops) -> backends.BlockParams:
        """The block's parameters as the table ops take them (GEMM ones through `ops.param`)."""
        a, m = self.attn, self.mlp
        return backends.BlockParams(
            backends.SelfAttentionParams(
                *ln_params(self.norm1), *linear_params(ops.param, a.qkv, a.proj)
            ),
            backends.MlpParams(*ln_params(self.norm2), *linear_params(ops.param, m.fc1, m.fc2)),
        )

    def whole(self) -> bool:
        """Whether the block runs as one op (`block`, `blocks`): no hooks on its parts (checked
        by the caller of forward) and no active drop-path or dropout."""
        rates = (self.drop_path, self.mlp.drop, *self.attn.rates().values())
        return not self.training or max(rates) == 0

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class CrossAttention(TableModule):
    """timm's CrossAttention: wq, wk, wv, proj (C x C each)."""

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def rates(self) -> dict:
        return dict(attn_drop=self.attn_drop, proj_drop=self.proj_drop)

    def args(self, param=lambda t: t) -> tuple:
        """(wq, bq, wk, bk, wv, bv, proj_weight, proj_bias), each through `param` (an OpSet's)."""
        return linear_params(param, self.wq, self.wk, self.wv, self.proj)

    def forward(self, x: Tensor) -> Tensor:
        """timm's CrossAttention.forward: x (B, 1 + N, C), already normalised; row 0 (the CLS)
        attends over all rows -> (B, 1, C)."""
        ops = self.opset(x)
        params = backends.CrossAttentionLayerParams(*self.args(ops.param))
        op = table_op(ops, "cross_attention_layer", self.training, **self.rates())
        return op(x, params, self.num_heads)


class CrossAttentionBlock(TableModule):
    """CLS-query cross-attention: cls + DropPath(CrossAttn(LN1(cat(cls, other patches))))."""

    def __init__(self, dim, num_heads, qkv_bias, proj_drop, attn_drop, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = drop_path
        self.eps = eps

    def forward(self, x: Tensor, tokens: Tensor | None = None, ops=None) -> Tensor:
        """timm's CrossAttentionBlock.forward: x (B, 1 + N, C) = cat(CLS, tokens) -> the new CLS
        (B, 1, C) = x[:, :1] + DropPath(CrossAttn(LN1(x))) (the CLS query attends over all rows).

        The model passes x = the CLS (B, 1, C) and `tokens` (B, 1 + N, C), the other branch's
        tokens whose row 0 stands for the CLS: the same sequence without materialising the cat."""
        return self.attend(x[:, 0], x if tokens is None else tokens, ops).unsqueeze(1)

    def attend(self, cls: Tensor, tokens: Tensor, ops=None) -> Tensor:
        """cls: (B, C); tokens: (B, 1 + N, C) whose rows 1.. are attended (row 0 is replaced by
        cls, so the other branch's tokens are read in place, no cat). Returns (B, C)."""
        # timm's block input is cat(cls, tokens[:, 1:]): under autocast that promotes the
        # low-precision projected CLS to the tokens' fp32, and the residual (also with drop-path
        # below) is taken from the promoted copy.
        if cls.dtype != tokens.dtype:
            cls = cls.to(torch.promote_types(cls.dtype, tokens.dtype))
        a, t = self.attn, self.training
        if hooked(self.norm1, a):  # timm's order, module by module
            x = torch.cat([cls.unsqueeze(1), tokens[:, 1:]], dim=1)
            return cls + drop_path(a(self.norm1(x)).squeeze(1), self.drop_path, t)
        ops = self.opset(cls, ops)
        params = backends.CrossAttentionParams(*ln_params(self.norm1), *a.args(ops.param))
        op = table_op(ops, "cross_attention", t, **a.rates())
        return _residual_op(op, cls, (tokens, params, a.num_heads, self.eps), self.drop_path, t)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"
