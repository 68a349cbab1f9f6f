"""`CrossViTConfig`: every architectural choice of a CrossViT, per branch, validated up front."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
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


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _int(v: Any, name: str, minimum: int) -> int:
    """An int >= minimum, exactly (4.5, "4", True and 4.0 are refused, not truncated)."""
    if not _is_int(v):
        raise ValueError(f"{name}: expected an int, got {v!r} ({type(v).__name__})")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v!r}")
    return int(v)


def _real(v: Any, name: str) -> float:
    """A finite real number (bools and strings refused; NaN and inf refused)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    return float(v)


def _flag(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name}: expected True or False, got {v!r} ({type(v).__name__})")
    return v


def _pair(v: Any, name: str) -> tuple[int, int]:
    """An int (square) or an (H, W) pair of ints, each >= 1."""
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return (_int(v[0], f"{name}[0]", 1), _int(v[1], f"{name}[1]", 1))
    if _is_int(v):
        return (_int(v, name, 1),) * 2
    raise ValueError(f"{name}: expected an int or an (H, W) pair of ints, got {v!r}")


def mlp_ratio_for(dim: int, hidden: int) -> float:
    """The simplest ratio r with timm's `int(dim * r) == hidden`.

    hidden / dim itself can fail: 152 * (106 / 152) evaluates to 105.99999999999999, so a model
    whose MLP timm built as int(152 * 0.7) = 106 wide would be rebuilt 105 wide. Tries fractions
    with small denominators first (0.7, 8/3, 2.2 come back as written), then the midpoint
    (hidden + 0.5) / dim, which always works.
    """
    exact = Fraction(hidden, dim)
    for max_den in (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 100, 1000):
        r = float(exact.limit_denominator(max_den))
        if int(dim * r) == hidden:
            return r
    return (hidden + 0.5) / dim


def _timm_schedule_error(depth: tuple) -> str | None:
    """Why timm's CrossVit cannot be built with these stage depths, or None.

    timm draws sum(last-branch depth + fusion depth) drop-path rates, but stage s consumes
    max(branch depths) + fusion depth of them and indexes rates[j] for block j of every branch:
    when an earlier branch is deeper than the last one, a later stage runs out (IndexError).
    """
    total = sum(stage[-2] + stage[-1] for stage in depth)
    ptr = 0
    for s, stage in enumerate(depth):
        need, n = max(stage[:-1]), max(stage[:-1]) + stage[-1]
        have = max(0, min(n, total - ptr))
        if have < need:
            return (
                f"depth[{s}]: {stage!r} cannot be built (timm's CrossVit raises IndexError too): "
                f"timm's drop-path schedule has {total} rates in all (per stage: last-branch depth "
                f"+ fusion depth), stage {s} starts at rate {ptr} and its deepest branch needs "
                f"{need}, but only {have} remain; make the last branch at least as deep as the "
                "others"
            )
        ptr += n
    return None


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
        mlp_ratio: per-branch MLP hidden ratio (hidden = int(embed_dim * ratio), `mlp_hidden`).
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
        # Every field is checked for its type and range, with a ValueError naming it; lists become
        # tuples (frozen dataclass: go through object.__setattr__). Nothing is coerced: 4.5, "4"
        # and True are refused where an int is expected.
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
        for name in ("patch_size", "embed_dim", "num_heads"):
            put(name, tuple(_int(v, f"{name}[{i}]", 1) for i, v in enumerate(getattr(self, name))))
        put("mlp_ratio", tuple(_real(r, f"mlp_ratio[{i}]") for i, r in enumerate(self.mlp_ratio)))
        if len(self.depth) < 1:
            raise ValueError("depth: expected at least one stage, got ()")
        depth = []
        for s, stage in enumerate(self.depth):
            if not isinstance(stage, (tuple, list)) or len(stage) != nb + 1:
                raise ValueError(
                    f"depth[{s}]: expected {nb + 1} ints (blocks per branch, then fusion depth), "
                    f"got {stage!r}"
                )
            if not all(_is_int(d) for d in stage):
                raise ValueError(f"depth[{s}]: expected ints, got {stage!r}")
            stage = tuple(int(d) for d in stage)
            if any(d < 1 for d in stage[:-1]) or stage[-1] < 0:
                raise ValueError(
                    f"depth[{s}]: branch depths must be >= 1 and fusion depth >= 0, got {stage!r}"
                )
            depth.append(stage)
        put("depth", tuple(depth))
        why = _timm_schedule_error(self.depth)
        if why:
            raise ValueError(why)

        for i in range(nb):
            p, (h, w), d, nh = (
                self.patch_size[i],
                self.img_size[i],
                self.embed_dim[i],
                self.num_heads[i],
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
                raise ValueError(
                    f"mlp_ratio[{i}]: expected > 0 with an MLP at least 1 wide "
                    f"(int(embed_dim * mlp_ratio) = int({d} * {self.mlp_ratio[i]})), "
                    f"got {self.mlp_ratio[i]}"
                )
        for name in ("qkv_bias", "multi_conv", "crop_scale"):
            _flag(getattr(self, name), name)
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
        for name in (
            "drop_rate",
            "pos_drop_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "drop_path_rate",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1), got {v!r}")
            put(name, float(v))
        if not isinstance(self.global_pool, str) or self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool: expected 'token' or 'avg', got {self.global_pool!r}")
        put("num_classes", _int(self.num_classes, "num_classes", 0))
        put("in_chans", _int(self.in_chans, "in_chans", 1))
        if _real(self.norm_eps, "norm_eps") <= 0:
            raise ValueError(f"norm_eps: expected a positive float, got {self.norm_eps!r}")
        put("norm_eps", float(self.norm_eps))

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

    @property
    def mlp_hidden(self) -> tuple[int, ...]:
        """Per-branch MLP hidden width, timm's rule: int(embed_dim * mlp_ratio)."""
        return tuple(int(d * r) for d, r in zip(self.embed_dim, self.mlp_ratio))

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
        for name in ("patch_size", "embed_dim", "num_heads", "mlp_ratio", "depth"):
            if not isinstance(a[name], (tuple, list)):
                raise ValueError(
                    f"{name}: expected a tuple with one entry per branch, got {a[name]!r}"
                )
        nb = len(a["patch_size"])
        img = _pair(a["img_size"], "img_size")
        scale = a["img_scale"]
        scale = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * 2
        if len(scale) == 1:
            scale = scale * 2
        if len(scale) != nb:
            raise ValueError(f"img_scale: expected {nb} per-branch scales, got {scale!r}")
        for i, sc in enumerate(scale):
            if _real(sc, f"img_scale[{i}]") <= 0:
                raise ValueError(f"img_scale[{i}]: expected a positive scale, got {sc!r}")
        # timm: img_size_scaled[i] = (int(H * s_i), int(W * s_i))
        img_size = tuple((int(img[0] * s), int(img[1] * s)) for s in scale)
        return cls(
            img_size=img_size,
            patch_size=tuple(a["patch_size"]),
            embed_dim=tuple(a["embed_dim"]),
            depth=tuple(a["depth"]),
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
