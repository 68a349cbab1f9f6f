"""`CrossViTConfig`: every architectural choice of a CrossViT, per branch, validated up front."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

__all__ = ["CrossViTConfig"]

_TIMM_DEFAULTS: dict[str, Any] = dict(  # timm's `CrossVit.__init__` defaults
    img_size=224,
    img_scale=(1.0, 1.0),
    patch_size=(8, 16),
    in_chans=3,
    num_classes=1000,
    embed_dim=(192, 384),
    depth=((1, 3, 1), (1, 3, 1), (1, 3, 1)),
    num_heads=(6, 12),
    mlp_ratio=(2.0, 2.0, 4.0),
    multi_conv=False,
    crop_scale=False,
    qkv_bias=True,
    drop_rate=0.0,
    pos_drop_rate=0.0,
    proj_drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
    global_pool="token",
)


def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ValueError(f"{name}: expected an int or an (H, W) pair of ints, got {v!r}")


@dataclass(frozen=True)
class CrossViTConfig:
    """A CrossViT architecture. Tuples hold one entry per branch (2 in timm; >= 2 supported).

    Attributes:
        img_size: per-branch input size, each an int (square) or (H, W); e.g. (240, 224). The
            model resizes (bicubic) or centre-crops (`crop_scale`) its input to each branch's size.
        patch_size: per-branch patch size; each img_size must be divisible by it.
        embed_dim: per-branch width; divisible by that branch's `num_heads`.
        depth: one tuple per stage: (blocks of branch 0, ..., blocks of branch n-1, fusion depth).
            Fusion depth 0 is timm's "one bare CrossAttentionBlock" (every released model);
            k >= 1 builds k stacked blocks (keys `fusion.{i}.{k}.*`).
        num_heads: per-branch head count (fusion[i] uses the *other* branch's heads).
        mlp_ratio: per-branch MLP hidden ratio (hidden = int(embed_dim * ratio)).
        qkv_bias: bias in qkv and in the fusion's wq/wk/wv.
        multi_conv: dagger 3-conv stem (patch sizes 12 and 16 only).
        crop_scale: centre-crop instead of bicubic resize when the input is larger.
        drop_rate: dropout before the heads. pos_drop_rate / proj_drop_rate / attn_drop_rate:
            timm's other dropouts. drop_path_rate: stochastic depth, timm's schedule.
        global_pool: "token" (CLS) or "avg" (mean of patch tokens).
        num_classes: classes per head; 0 makes heads Identity (forward returns features).
        in_chans: image channels.
        norm_eps: LayerNorm eps of every norm (timm: 1e-6).
    """

    img_size: tuple = (240, 224)
    patch_size: tuple = (12, 16)
    embed_dim: tuple = (96, 192)
    depth: tuple = ((1, 4, 0), (1, 4, 0), (1, 4, 0))
    num_heads: tuple = (3, 3)
    mlp_ratio: tuple = (4.0, 4.0)
    qkv_bias: bool = True
    multi_conv: bool = False
    crop_scale: bool = False
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    global_pool: str = "token"
    num_classes: int = 1000
    in_chans: int = 3
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        # Normalise lists to tuples (frozen dataclass: go through object.__setattr__).
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("img_size", "patch_size", "embed_dim", "num_heads", "mlp_ratio", "depth"):
            v = getattr(self, name)
            if not isinstance(v, (tuple, list)):
                raise ValueError(f"{name}: expected a tuple with one entry per branch, got {v!r}")
        nb = len(self.patch_size)
        if nb < 2:
            raise ValueError(f"patch_size: CrossViT needs >= 2 branches, got {self.patch_size!r}")
        for name in ("img_size", "embed_dim", "num_heads", "mlp_ratio"):
            if len(getattr(self, name)) != nb:
                hint = (
                    " (timm's third mlp_ratio entry is unused; CrossViTConfig.from_timm drops it)"
                    if name == "mlp_ratio"
                    else ""
                )
                raise ValueError(
                    f"{name}: expected {nb} per-branch values (one per patch_size entry), "
                    f"got {len(getattr(self, name))}: {getattr(self, name)!r}{hint}"
                )
        put("img_size", tuple(_pair(s, f"img_size[{i}]") for i, s in enumerate(self.img_size)))
        put("patch_size", tuple(int(p) for p in self.patch_size))
        put("embed_dim", tuple(int(d) for d in self.embed_dim))
        put("num_heads", tuple(int(h) for h in self.num_heads))
        put("mlp_ratio", tuple(float(r) for r in self.mlp_ratio))
        put("depth", tuple(tuple(int(d) for d in stage) for stage in self.depth))

        for i in range(nb):
            p, (h, w), d, nh = (
                self.patch_size[i],
                self.img_size[i],
                self.embed_dim[i],
                self.num_heads[i],
            )
            if p <= 0 or d <= 0 or nh <= 0 or h <= 0 or w <= 0:
                raise ValueError(
                    f"branch {i}: patch_size, embed_dim, num_heads and img_size must be positive, "
                    f"got patch_size={p}, embed_dim={d}, num_heads={nh}, img_size={(h, w)}"
                )
            if h % p or w % p:
                raise ValueError(
                    f"img_size[{i}]: {(h, w)} is not divisible by patch_size[{i}]={p}; "
                    f"expected multiples of {p}"
                )
            if d % nh:
                raise ValueError(
                    f"embed_dim[{i}]={d} is not divisible by num_heads[{i}]={nh}; "
                    f"expected a multiple of {nh}"
                )
            if self.mlp_ratio[i] <= 0 or int(d * self.mlp_ratio[i]) < 1:
                raise ValueError(f"mlp_ratio[{i}]: expected > 0, got {self.mlp_ratio[i]}")
        if self.multi_conv:
            bad = [p for p in self.patch_size if p not in (12, 16)]
            if bad:
                raise ValueError(
                    f"patch_size: multi_conv (dagger) stems exist for patch sizes 12 and 16, got {bad}"
                )
            bad = [d for d in self.embed_dim if d % 4]
            if bad:
                raise ValueError(
                    f"embed_dim: multi_conv stems need widths divisible by 4 (D/4, D/2 channels), got {bad}"
                )
        if len(self.depth) < 1:
            raise ValueError("depth: expected at least one stage, got ()")
        for s, stage in enumerate(self.depth):
            if len(stage) != nb + 1:
                raise ValueError(
                    f"depth[{s}]: expected {nb + 1} ints (blocks per branch, then fusion depth), "
                    f"got {stage!r}"
                )
            if any(d < 1 for d in stage[:-1]) or stage[-1] < 0:
                raise ValueError(
                    f"depth[{s}]: branch depths must be >= 1 and fusion depth >= 0, got {stage!r}"
                )
        for name in (
            "drop_rate",
            "pos_drop_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
        ):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
            put(name, float(v))
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: expected 'token' or 'avg', got {self.global_pool!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes: expected an int >= 0, got {self.num_classes!r}")
        if not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans: expected an int >= 1, got {self.in_chans!r}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"norm_eps: expected a positive float, got {self.norm_eps!r}")

    # -- derived -----------------------------------------------------------------------------

    @property
    def num_branches(self) -> int:
        return len(self.patch_size)

    @property
    def num_patches(self) -> tuple[int, ...]:
        return tuple((h // p) * (w // p) for (h, w), p in zip(self.img_size, self.patch_size))

    @property
    def num_features(self) -> int:
        return sum(self.embed_dim)

    def drop_path_rates(self) -> list[tuple[list[float], float]]:
        """timm's (quirky) stochastic-depth schedule: per stage, (block rates, fusion rate).

        total = sum over stages of (last branch depth + fusion depth); stage s takes the next
        max(branch depths) + fusion depth values of linspace(0, rate, total); block j of *every*
        branch uses slice[j], the fusion blocks use slice[-1].
        """
        total = sum(stage[-2] + stage[-1] for stage in self.depth)
        dpr = torch.linspace(
            0, self.drop_path_rate, total, device="cpu"
        ).tolist()  # as timm, float32 steps
        out, ptr = [], 0
        for stage in self.depth:
            n = max(stage[:-1]) + stage[-1]
            sl = dpr[ptr : ptr + n]
            ptr += n
            out.append((sl, sl[-1] if sl else 0.0))
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    # -- timm ----------------------------------------------------------------------------------

    @classmethod
    def from_timm(cls, **kwargs: Any) -> CrossViTConfig:
        """Config from exactly timm's `CrossVit(...)` keyword arguments (`img_size` + `img_scale`,
        3-entry `mlp_ratio`, ...), with timm's defaults for what is not given."""
        unknown = set(kwargs) - set(_TIMM_DEFAULTS)
        if "norm_layer" in unknown:
            raise ValueError("from_timm: norm_layer is not configurable (LayerNorm, eps=norm_eps)")
        if unknown:
            raise ValueError(
                f"from_timm: unknown timm CrossVit argument(s) {sorted(unknown)}; "
                f"expected a subset of {sorted(_TIMM_DEFAULTS)}"
            )
        a = {**_TIMM_DEFAULTS, **kwargs}
        nb = len(a["patch_size"])
        img = _pair(a["img_size"], "img_size")
        scale = a["img_scale"]
        scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * 2
        if len(scale) == 1:
            scale = scale * 2
        if len(scale) != nb:
            raise ValueError(f"img_scale: expected {nb} per-branch scales, got {scale!r}")
        # timm: img_size_scaled[i] = (int(H * s_i), int(W * s_i))
        img_size = tuple((int(img[0] * s), int(img[1] * s)) for s in scale)
        return cls(
            img_size=img_size,
            patch_size=tuple(a["patch_size"]),
            embed_dim=tuple(a["embed_dim"]),
            depth=tuple(tuple(s) for s in a["depth"]),
            num_heads=tuple(a["num_heads"]),
            mlp_ratio=tuple(a["mlp_ratio"])[:nb],
            qkv_bias=a["qkv_bias"],
            multi_conv=a["multi_conv"],
            crop_scale=a["crop_scale"],
            drop_rate=a["drop_rate"],
            pos_drop_rate=a["pos_drop_rate"],
            proj_drop_rate=a["proj_drop_rate"],
            attn_drop_rate=a["attn_drop_rate"],
            drop_path_rate=a["drop_path_rate"],
            global_pool=a["global_pool"],
            num_classes=a["num_classes"],
            in_chans=a["in_chans"],
        )

    def replace(self, **overrides: Any) -> CrossViTConfig:
        names = {f.name for f in fields(self)}
        bad = set(overrides) - names
        if bad:
            raise ValueError(
                f"unknown CrossViTConfig field(s) {sorted(bad)}; expected {sorted(names)}"
            )
        return type(self)(**{**self.to_dict(), **overrides})
