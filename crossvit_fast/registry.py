"""The 11 timm CrossViT variants by name: `create_model`, `list_models`."""

from __future__ import annotations

import os
from typing import Any

from .config import CrossViTConfig
from .model import CrossViT

__all__ = ["create_model", "list_models", "model_config", "pretrained_repo"]

_240 = dict(img_size=240, img_scale=(1.0, 224 / 240), patch_size=(12, 16), qkv_bias=True)
_408 = dict(img_size=408, img_scale=(1.0, 384 / 408), patch_size=(12, 16), qkv_bias=True)


def _v(base: dict, dims, large_depth, heads, ratio, dagger=False) -> dict:
    return dict(
        base,
        embed_dim=dims,
        depth=((1, large_depth, 0),) * 3,
        num_heads=(heads, heads),
        mlp_ratio=(ratio, ratio, 1.0),
        multi_conv=dagger,
    )


# timm's registrations (timm/models/crossvit.py), as timm `CrossVit(...)` keyword arguments.
_VARIANTS: dict[str, dict[str, Any]] = {
    "crossvit_tiny_240": _v(_240, (96, 192), 4, 3, 4.0),
    "crossvit_small_240": _v(_240, (192, 384), 4, 6, 4.0),
    "crossvit_base_240": _v(_240, (384, 768), 4, 12, 4.0),
    "crossvit_9_240": _v(_240, (128, 256), 3, 4, 3.0),
    "crossvit_15_240": _v(_240, (192, 384), 5, 6, 3.0),
    "crossvit_18_240": _v(_240, (224, 448), 6, 7, 3.0),
    "crossvit_9_dagger_240": _v(_240, (128, 256), 3, 4, 3.0, dagger=True),
    "crossvit_15_dagger_240": _v(_240, (192, 384), 5, 6, 3.0, dagger=True),
    "crossvit_18_dagger_240": _v(_240, (224, 448), 6, 7, 3.0, dagger=True),
    "crossvit_15_dagger_408": _v(_408, (192, 384), 5, 6, 3.0, dagger=True),
    "crossvit_18_dagger_408": _v(_408, (224, 448), 6, 7, 3.0, dagger=True),
}


def pretrained_repo(name: str) -> str:
    """The Hugging Face hub repo of timm's published weights for a registered variant."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return f"timm/{name}.in1k"


def list_models() -> list[str]:
    """The registered variant names (timm's)."""
    return list(_VARIANTS)


def model_config(name: str, **overrides: Any) -> CrossViTConfig:
    """The config of a registered variant; `overrides` are CrossViTConfig fields (e.g.
    num_classes=10, drop_path_rate=0.1)."""
    if name not in _VARIANTS:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return CrossViTConfig.from_timm(**_VARIANTS[name]).replace(**overrides)


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    backend: str = "auto",
    **overrides: Any,
) -> CrossViT:
    """Build a registered variant, randomly initialised as timm does, or with weights.

    pretrained: False; True for timm's published weights (hub repo `pretrained_repo(name)`,
        through huggingface_hub: its cache, HF_HOME and HF_HUB_OFFLINE apply); a hub repo id
        "org/repo"; or a checkpoint file path. See `crossvit_fast.hub`.
    overrides: CrossViTConfig fields (num_classes=10, drop_path_rate=0.1, ...). As in timm, a
        num_classes other than the checkpoint's keeps the fresh (timm-initialised) heads and
        loads everything else.

    >>> m = create_model("crossvit_tiny_240", num_classes=10)
    """
    if not isinstance(backend, str):
        raise ValueError(f"backend: expected a backend name, got {backend!r}")
    cfg = model_config(name, **overrides)
    if pretrained is False or pretrained is None:
        return CrossViT(cfg, backend=backend)
    from .hub import pretrained_state_dict

    # The weights first: a bad `pretrained` fails before the model is built and initialised.
    sd, path = pretrained_state_dict(pretrained, pretrained_repo(name))
    model = CrossViT(cfg, backend=backend)
    head = [k for k in sd if k.startswith("head.")]
    ckpt_classes = sd["head.0.weight"].shape[0] if "head.0.weight" in sd else 0
    if ckpt_classes != model.num_classes:
        for k in head:  # timm: a different num_classes keeps the new classifier's init
            del sd[k]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise RuntimeError(f"{path}: does not fit {name} with {overrides}: {exc}") from None
    missing = [
        k for k in missing if not (ckpt_classes != model.num_classes and k.startswith("head."))
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: does not fit {name}: missing keys {missing[:8]}, unexpected keys "
            f"{unexpected[:8]}"
        )
    return model
