"""CrossViT (Chen, Fan, Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification", ICCV 2021), as timm implements it — a drop-in whose parameters, names, init and
numerics match `timm.models.crossvit.CrossVit` (how timm builds it: docs/architecture.md).

The modules have timm's names (so state_dicts load unchanged) and forwards (the layers:
`crossvit_fast.blocks`), and route every computation through an `OpSet` resolved from the backend
table (`crossvit_fast.backends`); they contain no math of their own beyond drop-path, dropout
routing, resizing and the heads.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import backends
from .blocks import (
    Attention,
    Block,
    CrossAttention,
    CrossAttentionBlock,
    Mlp,
    PatchEmbed,
    TableModule,
    hooked,
    ln_params,
)
from .config import CrossViTConfig

__all__ = ["CrossViT"]


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


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


def _cls_proj_module(dim_in: int, dim_out: int, eps: float) -> nn.Sequential:
    # timm: Sequential(LayerNorm, GELU, Linear) — never Identity, even for equal widths.
    return nn.Sequential(nn.LayerNorm(dim_in, eps=eps), nn.GELU(), nn.Linear(dim_in, dim_out))


def _cls_proj_args(seq: nn.Sequential, ops) -> backends.ClsProjParams:
    return backends.ClsProjParams(
        *ln_params(seq[0]), ops.param(seq[2].weight), ops.param(seq[2].bias)
    )


class MultiScaleBlock(TableModule):
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
        if (
            len(seq) > 1
            and not self._checkpointing()
            and all(
                blk.whole() and not hooked(blk, blk.norm1, blk.attn, blk.norm2, blk.mlp)
                for blk in seq
            )
        ):
            # A branch's blocks as one op: every LayerNorm gradient between two blocks is
            # finished inside the GEMM that reads it (a Triton backend's `blocks`).
            heads = seq[0].attn.num_heads
            return ops.blocks(x, [blk.params(ops) for blk in seq], heads, seq[0].eps)
        for blk in seq:
            # Non-reentrant checkpoint: only the block input is kept; the block (and its
            # drop-path draws: the RNG state is restored) is replayed in backward.
            x = (
                checkpoint(blk, x, ops, use_reentrant=False)
                if self._checkpointing()
                else blk(x, ops)
            )
        return x

    def _fusion_params(self, i: int, ops) -> backends.FusionParams | None:
        """Fusion i's parameters for the table's whole-step ops (cross_fusion, fusion_stage),
        or None where their contract does not hold: one block, no active drop-path or dropout,
        no hooks to show the modules' own tensors."""
        proj, fusion, revert = self.projs[i], self.fusion[i], self.revert_projs[i]
        if not isinstance(fusion, CrossAttentionBlock) or (
            (fusion.training and max(fusion.drop_path, *fusion.attn.rates().values()) > 0)
            or hooked(proj, *proj, fusion, fusion.norm1, fusion.attn, revert, *revert)
        ):
            return None
        attn = backends.CrossAttentionParams(*ln_params(fusion.norm1), *fusion.attn.args(ops.param))
        return backends.FusionParams(_cls_proj_args(proj, ops), attn, _cls_proj_args(revert, ops))

    def _fuse(self, i: int, y_i: Tensor, y_j: Tensor, ops) -> Tensor:
        """Branch i's new CLS (B, C_i) from its CLS and branch j's tokens."""
        proj, fusion, revert = self.projs[i], self.fusion[i], self.revert_projs[i]
        params = self._fusion_params(i, ops)
        if params is not None:  # the whole step as one table op (fused by the fast backends)
            return ops.cross_fusion(y_i[:, 0], y_j, params, fusion.attn.num_heads, self.eps)
        blocks = [fusion] if isinstance(fusion, CrossAttentionBlock) else list(fusion)
        c = self._cls_proj(proj, y_i[:, 0], ops).unsqueeze(1)
        for k, blk in enumerate(blocks):
            # From the 2nd stacked block on, the sequence is the single token (as timm).
            c = blk(c, y_j if k == 0 else None, ops)
        return self._cls_proj(revert, c[:, 0], ops)

    def _cls_proj(self, seq: nn.Sequential, x: Tensor, ops) -> Tensor:
        """projs / revert_projs on x (B, C_in) -> (B, C_out): the table's cls_proj, or timm's
        modules one by one (on the (B, 1, C_in) CLS column, as timm) when hooks are on them."""
        if hooked(seq, *seq):
            return seq(x.unsqueeze(1)).squeeze(1)
        return ops.cls_proj(x, _cls_proj_args(seq, ops), self.eps)

    def forward(self, xs: list[Tensor], ops=None, cls_only: bool = False) -> list[Tensor]:
        """timm's MultiScaleBlock.forward: xs per branch (B, 1 + N_i, C_i) -> the same after this
        stage (`cls_only`: each branch's new CLS alone, (B, 1, C_i), the token rows not
        re-assembled). ops: as Block's."""
        ops = self.opset(xs[0], ops)
        ys = [self._run_blocks(x, seq, ops) for x, seq in zip(xs, self.blocks)]
        nb = self.num_branches
        params = [self._fusion_params(i, ops) for i in range(nb)]
        if all(p is not None for p in params):
            # Every fusion step and the re-assembly as one table op: each branch's tokens get
            # their gradient in one tensor (Triton sums its three parts as it writes them).
            heads = [f.attn.num_heads for f in self.fusion]
            args = (ys, params, heads, self.eps, cls_only)
            if self._checkpointing():  # keeps only its inputs, recomputed in backward
                return checkpoint(ops.fusion_stage, *args, use_reentrant=False)
            return ops.fusion_stage(*args)
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
            if isinstance(m, TableModule):
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
        return [ops.layer_norm(t, *ln_params(n), n.eps) for t, n in zip(xs, self.norm)]

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
