"""Helpers every fast backend uses: input validation with clear messages, and autocast.

Autocast: a registered custom op is opaque to autocast, so each functional applies timm's dtype
rules itself. Under `torch.autocast(device_type, dtype)` timm's modules run LayerNorm and softmax
in float32 and every Linear / matmul in the autocast dtype; an op's output dtype must equal the
reference op's output dtype under the same autocast (tests check it). `autocast_dtype` tells the
functional which compute dtype to use; kernels then run with the cast operands.
"""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_tensor(
    name: str,
    t: Tensor | None,
    *,
    ndim: int | None = None,
    shape: tuple | None = None,
    like: Tensor | None = None,
    dtypes: tuple = KERNEL_DTYPES,
    optional: bool = False,
) -> None:
    """Raise ValueError naming `name`, what was expected and what came.

    shape: expected sizes, None entries are free. like: must share its device (and dtype when
    `dtypes` is None).
    """
    if t is None:
        if optional:
            return
        raise ValueError(f"{name}: expected a tensor, got None")
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and (
        t.ndim != len(shape) or any(e is not None and s != e for s, e in zip(t.shape, shape))
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes and t.dtype not in dtypes:
        raise ValueError(
            f"{name}: expected dtype in {[str(d).replace('torch.', '') for d in dtypes]}, got {t.dtype}"
        )
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: expected a tensor on {like.device}, got {t.device}")
        if dtypes is None and t.dtype != like.dtype:
            raise ValueError(f"{name}: expected dtype {like.dtype}, got {t.dtype}")
