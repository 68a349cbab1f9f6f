"""CrossViT (Chen, Fan, Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification", ICCV 2021), as timm implements it — a drop-in whose parameters, names, init and
numerics match `timm.models.crossvit.CrossVit` (how timm builds it: docs/architecture.md).

The modules only hold parameters (same names as timm, so state_dicts load unchanged) and route
every computation through an `OpSet` resolved from the backend table (`crossvit_fast.backends`);
they contain no math of their own beyond drop-path, dropout routing and resizing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import backends
from .config import CrossViTConfig

__all__ = ["CrossViT"]


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _p(module: nn.Module, name: str) -> Tensor | None:
    """A parameter of `module` or None (Identity LayerNorm affine / bias=False)."""
    return getattr(module, name, None)


def _ln(norm: nn.LayerNorm) -> tuple:
    return (_p(norm, "weight"), _p(norm, "bias"))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Per-sample stochastic depth (timm's DropPath, scale_by_keep=True)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


def _residual_op(op, x: Tensor, args: tuple, rate: float, training: bool, **kw) -> Tensor:
    """Run a residual op fused (`x + f(x)` in one op) unless drop-path is active, in which case
    the op returns f(x) and the per-sample mask is applied before the add."""
    if rate > 0.0 and training:
        return x + drop_path(op(x, *args, residual=False, **kw), rate, training)
    return op(x, *args, residual=True, **kw)


def scale_image(x: Tensor, size: tuple[int, int], crop_scale: bool) -> Tensor:
    """timm's per-branch resize: centre-crop (crop_scale, target not larger) or bicubic
    (align_corners=False, no antialias) when (H, W) differs from `size`."""
    H, W = x.shape[-2:]
    if tuple(size) == (H, W):
        return x
    if crop_scale and size[0] <= H and size[1] <= W:
        top, left = round((H - size[0]) / 2.0), round((W - size[1]) / 2.0)  # half-to-even, as timm
        return x[:, :, top : top + size[0], left : left + size[1]]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


class PatchEmbed(nn.Module):
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

    def forward(self, x: Tensor, cls_token: Tensor, pos_embed: Tensor, ops) -> Tensor:
        """x: (B, C_in, H, W) at this branch's img_size -> tokens (B, 1 + N, D) incl. CLS + pos."""
        if not self.multi_conv:
            w, b = ops.param(self.proj.weight), ops.param(self.proj.bias)
            return ops.patch_embed(x, w, b, cls_token, pos_embed)
        # Dagger: the convolutions stay cuDNN; the flatten + CLS + pos step is the table's op.
        return ops.token_assemble(self.proj(x), cls_token, pos_embed)


class Attention(nn.Module):
    """Parameter holder with timm's names: qkv (3C x C) and proj (C x C)."""

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop


class Mlp(nn.Module):
    """Parameter holder with timm's names: fc1 (hidden x C), fc2 (C x hidden)."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop


class Block(nn.Module):
    """Pre-norm ViT block: x + DropPath(Attn(LN1(x))), then x + DropPath(MLP(LN2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.drop_path = drop_path
        self.eps = eps
        self._ops = backends.OpSets()  # replaced by the model's own (shared) OpSets

    def forward(self, x: Tensor, ops=None) -> Tensor:
        """x: (B, N, C) -> (B, N, C), timm's Block.forward; ops from the model's backend (the
        model passes its per-forward ops, with the GEMM parameters cast once)."""
        ops = ops if ops is not None else self._ops.get(x.device.type)
        a, m, t = self.attn, self.mlp, self.training
        gemm = map(ops.param, (a.qkv.weight, a.qkv.bias, a.proj.weight, a.proj.bias))
        attn_args = (backends.SelfAttentionParams(*_ln(self.norm1), *gemm), a.num_heads, self.eps)
        if t and (a.attn_drop > 0 or a.proj_drop > 0):  # an op that declares dropout support
            drop = dict(attn_drop=a.attn_drop, proj_drop=a.proj_drop)
            op = ops.with_dropout("self_attention")
            x = _residual_op(op, x, attn_args, self.drop_path, t, **drop)
        else:
            x = _residual_op(ops.self_attention, x, attn_args, self.drop_path, t)
        gemm = map(ops.param, (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias))
        mlp_args = (backends.MlpParams(*_ln(self.norm2), *gemm), self.eps)
        if t and m.drop > 0:
            mlp = ops.with_dropout("mlp")
            return _residual_op(mlp, x, mlp_args, self.drop_path, t, mlp_drop=m.drop)
        return _residual_op(ops.mlp, x, mlp_args, self.drop_path, t)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class CrossAttention(nn.Module):
    """Parameter holder with timm's names: wq, wk, wv, proj (C x C each)."""

    def __init__(self, dim, num_heads, qkv_bias, attn_drop, proj_drop):
        super().__init__()
        self.num_heads = num_heads
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.wv = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def args(self, param=lambda t: t) -> tuple:
        """(wq, bq, wk, bk, wv, bv, proj_weight, proj_bias), each through `param` (an OpSet's)."""
        layers = (self.wq, self.wk, self.wv, self.proj)
        return tuple(param(t) for lin in layers for t in (lin.weight, lin.bias))


class CrossAttentionBlock(nn.Module):
    """CLS-query cross-attention: cls + DropPath(CrossAttn(LN1(cat(cls, other patches))))."""

    def __init__(self, dim, num_heads, qkv_bias, proj_drop, attn_drop, drop_path, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = drop_path
        self.eps = eps
        self._ops = backends.OpSets()  # replaced by the model's own (shared) OpSets

    def forward(self, x: Tensor, tokens: Tensor | None = None, ops=None) -> Tensor:
        """timm's CrossAttentionBlock.forward: x (B, 1 + N, C) = cat(CLS, tokens) -> the new CLS
        (B, 1, C) = x[:, :1] + DropPath(CrossAttn(LN1(x))) (the CLS query attends over all rows).

        The model passes x = the CLS (B, 1, C) and `tokens` (B, 1 + N, C), the other branch's
        tokens whose row 0 stands for the CLS: the same sequence without materialising the cat."""
        ops = ops if ops is not None else self._ops.get(x.device.type)
        return self.attend(x[:, 0], x if tokens is None else tokens, ops).unsqueeze(1)

    def attend(self, cls: Tensor, tokens: Tensor, ops) -> Tensor:
        """cls: (B, C); tokens: (B, 1 + N, C) whose rows 1.. are attended (row 0 is replaced by
        cls, so the other branch's tokens are read in place, no cat). Returns (B, C)."""
        # timm's block input is cat(cls, tokens[:, 1:]): under autocast that promotes the
        # low-precision projected CLS to the tokens' fp32, and the residual (also with drop-path
        # below) is taken from the promoted copy.
        if cls.dtype != tokens.dtype:
            cls = cls.to(torch.promote_types(cls.dtype, tokens.dtype))
        a, t = self.attn, self.training
        params = backends.CrossAttentionParams(*_ln(self.norm1), *a.args(ops.param))
        args = (tokens, params, a.num_heads, self.eps)
        if t and (a.attn_drop > 0 or a.proj_drop > 0):
            drop = dict(attn_drop=a.attn_drop, proj_drop=a.proj_drop)
            op = ops.with_dropout("cross_attention")
            return _residual_op(op, cls, args, self.drop_path, t, **drop)
        return _residual_op(ops.cross_attention, cls, args, self.drop_path, t)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


def _cls_proj_module(dim_in: int, dim_out: int, eps: float) -> nn.Sequential:
    # timm: Sequential(LayerNorm, GELU, Linear) — never Identity, even for equal widths.
    return nn.Sequential(nn.LayerNorm(dim_in, eps=eps), nn.GELU(), nn.Linear(dim_in, dim_out))


def _cls_proj_args(seq: nn.Sequential, ops) -> backends.ClsProjParams:
    return backends.ClsProjParams(*_ln(seq[0]), ops.param(seq[2].weight), ops.param(seq[2].bias))


class MultiScaleBlock(nn.Module):
    """One stage: per-branch ViT blocks, then one CLS cross-attention fusion per branch."""

    def __init__(
        self, cfg: CrossViTConfig, stage: int, block_rates: list[float], fusion_rate: float
    ):
        super().__init__()
        depth, dims, eps, nb = cfg.depth[stage], cfg.embed_dim, cfg.norm_eps, cfg.num_branches
        self.num_branches, self.fusion_depth, self.eps = nb, depth[-1], eps
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *[
                    Block(
                        dims[d],
                        cfg.num_heads[d],
                        cfg.mlp_ratio[d],
                        cfg.qkv_bias,
                        cfg.proj_drop_rate,
                        cfg.attn_drop_rate,
                        block_rates[i],
                        eps,
                    )
                    for i in range(depth[d])
                ]
            )
            for d in range(nb)
        )
        self.projs = nn.ModuleList(
            _cls_proj_module(dims[d], dims[(d + 1) % nb], eps) for d in range(nb)
        )
        self.fusion = nn.ModuleList()
        for d in range(nb):
            j = (d + 1) % nb
            make = lambda j=j: CrossAttentionBlock(
                dims[j],
                cfg.num_heads[j],
                cfg.qkv_bias,
                cfg.proj_drop_rate,
                cfg.attn_drop_rate,
                fusion_rate,
                eps,
            )
            # Fusion depth 0 is timm's bare block (keys fusion.{d}.*); k >= 1 a Sequential of k.
            self.fusion.append(
                make() if depth[-1] == 0 else nn.Sequential(*[make() for _ in range(depth[-1])])
            )
        self.revert_projs = nn.ModuleList(
            _cls_proj_module(dims[(d + 1) % nb], dims[d], eps) for d in range(nb)
        )

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing and torch.is_grad_enabled()

    def _run_blocks(self, x: Tensor, seq: nn.Sequential, ops) -> Tensor:
        for blk in seq:
            # Non-reentrant checkpoint: only the block input is kept; the block (and its
            # drop-path draws: the RNG state is restored) is replayed in backward.
            x = (
                checkpoint(blk, x, ops, use_reentrant=False)
                if self._checkpointing()
                else blk(x, ops)
            )
        return x

    def _fuse(self, i: int, y_i: Tensor, y_j: Tensor, ops) -> Tensor:
        """Branch i's new CLS (B, C_i) from its CLS and branch j's tokens."""
        proj, fusion, revert = self.projs[i], self.fusion[i], self.revert_projs[i]
        single = isinstance(fusion, CrossAttentionBlock)
        if (
            single
            and not (fusion.training and fusion.drop_path > 0)
            and not (fusion.training and (fusion.attn.attn_drop > 0 or fusion.attn.proj_drop > 0))
        ):
            # The whole step as one table op (fused by the fast backends).
            attn = backends.CrossAttentionParams(*_ln(fusion.norm1), *fusion.attn.args(ops.param))
            params = backends.FusionParams(
                _cls_proj_args(proj, ops), attn, _cls_proj_args(revert, ops)
            )
            return ops.cross_fusion(y_i[:, 0], y_j, params, fusion.attn.num_heads, self.eps)
        c = ops.cls_proj(y_i[:, 0], _cls_proj_args(proj, ops), self.eps).unsqueeze(1)
        for k, blk in enumerate([fusion] if single else fusion):
            # From the 2nd stacked block on, the sequence is the single token (as timm).
            c = blk(c, y_j if k == 0 else None, ops)
        return ops.cls_proj(c[:, 0], _cls_proj_args(revert, ops), self.eps)

    def forward(self, xs: list[Tensor], ops, cls_only: bool = False) -> list[Tensor]:
        """xs: per branch (B, 1 + N_i, C_i) -> the same after this stage (`cls_only`: each
        branch's new CLS alone, (B, 1, C_i), the token rows not re-assembled)."""
        ys = [self._run_blocks(x, seq, ops) for x, seq in zip(xs, self.blocks)]
        nb = self.num_branches
        outs = []
        for i in range(nb):
            if self._checkpointing():
                # The fusion would otherwise keep LN(cat(cls, tokens_j)) and K / V of the other
                # branch's tokens (several token tensors); recomputing it keeps only its inputs.
                cls = checkpoint(self._fuse, i, ys[i], ys[(i + 1) % nb], ops, use_reentrant=False)
            else:
                cls = self._fuse(i, ys[i], ys[(i + 1) % nb], ops)
            cls = cls.unsqueeze(1)
            outs.append(cls if cls_only else torch.cat([cls, ys[i][:, 1:]], dim=1))
        return outs


class CrossViT(nn.Module):
    """CrossViT, drop-in for timm's `CrossVit` (same state_dict keys, init and numerics).

    Args:
        config: the architecture (`CrossViTConfig`).
        backend: "auto" (fastest available for the input's device; the reference on CPU),
            "reference", "triton" or "cuda". See `crossvit_fast.available_backends()`.

    Input: (B, in_chans, H, W) floating images; each branch resizes to its own img_size.
    Output: (B, num_classes) logits (mean of the branch heads), or (B, sum(embed_dim))
    features when num_classes == 0.
    """

    def __init__(self, config: CrossViTConfig | None = None, backend: str = "auto"):
        super().__init__()
        cfg = config if config is not None else CrossViTConfig()
        if not isinstance(cfg, CrossViTConfig):
            raise TypeError(f"config: expected a CrossViTConfig, got {type(cfg).__name__}")
        self.config = cfg
        nb = cfg.num_branches
        self.num_branches, self.num_classes, self.global_pool = nb, cfg.num_classes, cfg.global_pool
        self.img_size_scaled = list(cfg.img_size)
        self.num_features = self.head_hidden_size = cfg.num_features
        # Direct parameters first, in timm's order: pos_embed_0, cls_token_0, pos_embed_1, ...
        for i, (n, d) in enumerate(zip(cfg.num_patches, cfg.embed_dim)):
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + n, d)))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, d)))
        self.patch_embed = nn.ModuleList(
            PatchEmbed(
                cfg.img_size[i], cfg.patch_size[i], cfg.in_chans, cfg.embed_dim[i], cfg.multi_conv
            )
            for i in range(nb)
        )
        self.pos_drop = cfg.pos_drop_rate
        self.blocks = nn.ModuleList(
            MultiScaleBlock(cfg, s, rates, fusion_rate)
            for s, (rates, fusion_rate) in enumerate(cfg.drop_path_rates())
        )
        self.norm = nn.ModuleList(
            nn.LayerNorm(cfg.embed_dim[i], eps=cfg.norm_eps) for i in range(nb)
        )
        self.head_drop = cfg.drop_rate
        self.head = nn.ModuleList(
            self._make_head(cfg.embed_dim[i], cfg.num_classes) for i in range(nb)
        )
        self._init_weights()
        # One OpSets for the model and every submodule that runs ops (timm-style forwards).
        self._ops = backends.OpSets()
        for m in self.modules():
            if isinstance(m, (Block, CrossAttentionBlock)):
                m._ops = self._ops
        self.set_backend(backend)

    @staticmethod
    def _make_head(dim: int, num_classes: int) -> nn.Module:
        return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self) -> None:
        # timm: trunc_normal(.02) for pos/cls and every Linear weight, zero Linear biases,
        # LayerNorm (1, 0); convolutions keep PyTorch's default init.
        for i in range(self.num_branches):
            nn.init.trunc_normal_(getattr(self, f"pos_embed_{i}"), std=0.02)
            nn.init.trunc_normal_(getattr(self, f"cls_token_{i}"), std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- backend -----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend name this model was asked to use ("auto", "reference", ...)."""
        return self._ops.backend

    def set_backend(self, name: str) -> CrossViT:
        """Select the kernels: "auto", "reference", "triton" or "cuda". Raises ValueError for an
        unknown name and RuntimeError (with the reason) for a backend unavailable on this machine."""
        backends.check_name(name)
        if name != "auto":
            ok, why = backends.available_backends()[name]
            if not ok:
                raise RuntimeError(f"backend {name!r} is not available: {why}")
        self._ops.reset(name)
        self._warm_opset()
        return self

    def opset(self, device: torch.device | str) -> backends.OpSet:
        """The resolved ops for inputs on `device` (cached per device type)."""
        dt = torch.device(device).type
        return self._ops.get(dt)

    def _warm_opset(self) -> None:
        """Resolve the ops for the parameters' device now, outside any forward.

        `torch.compile` cannot trace the resolution (it imports backend modules), so the forward
        must find the OpSet cached: inputs always share the parameters' device (checked), and this
        runs at construction, on `set_backend` and after every `.to()` / `.cuda()` (`_apply`). An
        explicit backend that cannot run on the current device (e.g. "cuda" before `.cuda()`) is
        not an error yet: the forward raises it, with the reason, if the model runs there.
        """
        with contextlib.suppress(RuntimeError):
            self.opset(self.cls_token_0.device)

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._warm_opset()
        return out

    def extra_repr(self) -> str:
        """The backend asked for and, once resolved for the parameters' device, which backend
        serves each op (and each op's dropout variant)."""
        text = f"backend={self.backend!r}"
        ops = self._ops.cache.get(self.cls_token_0.device.type)
        if ops is not None:
            text += ", ops=(" + ", ".join(f"{op}={s}" for op, s in ops.sources.items()) + ")"
            drop = ", ".join(f"{op}={s}" for op, s in ops.dropout_sources.items())
            text += f", dropout_ops=({drop})"
        return text

    # -- timm API ----------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        out = set()
        for i in range(self.num_branches):
            out.add(f"cls_token_{i}")
            if getattr(self, f"pos_embed_{i}").requires_grad:
                out.add(f"pos_embed_{i}")
        return out

    def get_classifier(self) -> nn.ModuleList:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Rebuild both heads for `num_classes` (0: features); optionally change pooling.

        As timm: the new heads are plain `nn.Linear` layers with PyTorch's default init, made
        directly on the model's device and dtype (timm does not re-apply its trunc-normal init
        here). `config` is updated, so `CrossViT(model.config)` rebuilds this model's state_dict.
        """
        changes = {"num_classes": num_classes}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = self.config.replace(**changes)  # validates (ValueError naming the field)
        self.num_classes, self.global_pool = self.config.num_classes, self.config.global_pool
        ref = self.norm[0].weight
        self.head = nn.ModuleList(
            nn.Linear(d, self.num_classes, device=ref.device, dtype=ref.dtype)
            if self.num_classes > 0
            else nn.Identity()
            for d in self.config.embed_dim
        )
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute in backward instead of storing activations: each ViT block and each
        fusion step keeps only its inputs (timm's CrossVit lacks this; same gradients)."""
        for stage in self.blocks:
            stage.grad_checkpointing = bool(enable)

    # -- forward -----------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        c = self.config.in_chans
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D image batch (B, {c}, H, W), got shape {tuple(x.shape)}"
                + (" (missing batch dimension? use x.unsqueeze(0))" if x.ndim == 3 else "")
            )
        if x.shape[1] != c:
            raise ValueError(
                f"expected {c} input channels (B, {c}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point image batch, got dtype {x.dtype}")
        if x.shape[-2] < 1 or x.shape[-1] < 1:
            raise ValueError(f"expected a non-empty image (H, W >= 1), got shape {tuple(x.shape)}")
        p = self.cls_token_0
        if x.device != p.device:
            raise ValueError(f"input is on {x.device} but the model's parameters are on {p.device}")
        if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"input dtype {x.dtype} does not match the model's parameter dtype {p.dtype} "
                "(convert one of them, or run under torch.autocast)"
            )

    def forward_features(self, x: Tensor, *, _cls_only: bool = False) -> list[Tensor]:
        """(B, C_in, H, W) -> list of normed token tensors [(B, 1 + N_i, D_i) per branch]
        (`_cls_only`, for `forward`: the normed CLS rows alone, (B, 1, D_i))."""
        self._check_input(x)
        ops = self._bind_casts(self.opset(x.device), x)
        cfg = self.config
        xs = []
        for i, pe in enumerate(self.patch_embed):
            t = pe(
                scale_image(x, cfg.img_size[i], cfg.crop_scale),
                getattr(self, f"cls_token_{i}"),
                getattr(self, f"pos_embed_{i}"),
                ops,
            )
            if self.training and self.pos_drop > 0:
                t = F.dropout(t, self.pos_drop)
            xs.append(t)
        for k, stage in enumerate(self.blocks):
            xs = stage(xs, ops, cls_only=_cls_only and k == len(self.blocks) - 1)
        return [ops.layer_norm(t, *_ln(n), n.eps) for t, n in zip(xs, self.norm)]

    def _gemm_params(self) -> list[Tensor]:
        """The Linear / Conv parameters the table's ops take (not the heads' nor the dagger stem's
        convolutions: torch modules run those, and autocast casts them there)."""
        out = []
        for m in self.modules():
            if isinstance(m, (Attention, Mlp, CrossAttention)):
                out += [p for lin in m.children() for p in (lin.weight, lin.bias)]
            elif isinstance(m, PatchEmbed) and not m.multi_conv:
                out += [m.proj.weight, m.proj.bias]
            elif isinstance(m, MultiScaleBlock):
                out += [
                    p for seq in (*m.projs, *m.revert_projs) for p in (seq[2].weight, seq[2].bias)
                ]
        return [p for p in out if p is not None]

    def _bind_casts(self, ops, x: Tensor):
        """Under autocast, the ops for this forward with every GEMM parameter cast to the
        autocast dtype by one `cast_params` call (autocast would cast each at its use: a launch
        per tensor forward and backward); otherwise `ops` itself. Not for parameters sharded as
        DTensors (FSDP2 gathers them per stage, and its mixed-precision policy casts them)."""
        device_type = x.device.type
        dt = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else None
        )
        if dt is None:  # checked first: no walk over the modules when autocast is off
            return ops
        params = self._gemm_params()
        if not params or any(p.dtype != torch.float32 or _is_dtensor(p) for p in params):
            return ops
        return ops.bind(dict(zip(params, ops.cast_params(params, dt))))

    def forward_head(self, xs: list[Tensor], pre_logits: bool = False) -> Tensor:
        """Pool (CLS or patch mean), head dropout, then the mean of the branch heads (or the
        concatenated pooled features with `pre_logits` / num_classes == 0)."""
        zs = (
            [x[:, 1:].mean(dim=1) for x in xs]
            if self.global_pool == "avg"
            else [x[:, 0] for x in xs]
        )
        if self.training and self.head_drop > 0:
            zs = [F.dropout(z, self.head_drop) for z in zs]
        if pre_logits or isinstance(self.head[0], nn.Identity):
            return torch.cat(zs, dim=1)
        return torch.mean(torch.stack([h(z) for h, z in zip(self.head, zs)], dim=0), dim=0)

    def forward(self, x: Tensor) -> Tensor:
        # Token pooling reads only the CLS rows: the last stage skips re-assembling the token rows
        # and the final LayerNorm normalises the CLS rows alone (it is per row: the same values,
        # without the (B, 1 + N, D) copies and norms forward and backward).
        return self.forward_head(self.forward_features(x, _cls_only=self.global_pool != "avg"))
