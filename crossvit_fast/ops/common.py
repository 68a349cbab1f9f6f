"""Helpers every fast backend uses: input validation with clear messages, and the one dtype /
autocast policy (`compute_dtype`, `check_param_dtype`, `layer_norm_out_dtype`).

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


def check_param_dtype(x: Tensor, **params: Tensor | None) -> None:
    """Without autocast, timm's modules require every parameter in x's dtype (F.linear /
    F.layer_norm refuse mixed dtypes); under autocast any float dtype is cast like autocast does."""
    if autocast_dtype(x.device.type) is not None:
        return
    for name, t in params.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(
                f"{name}: expected dtype {x.dtype} (x's dtype, no autocast), got {t.dtype}"
            )


def compute_dtype(x: Tensor, **params: Tensor | None) -> torch.dtype:
    """The GEMM dtype timm would use for x: the autocast dtype when autocast is on, else x's
    dtype, which every tensor in `params` must then share (`check_param_dtype`)."""
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        if dt not in KERNEL_DTYPES:
            raise ValueError(
                f"autocast dtype {dt} is not supported (expected one of {KERNEL_DTYPES})"
            )
        return dt
    check_param_dtype(x, **params)
    return x.dtype


def layer_norm_out_dtype(x: Tensor) -> torch.dtype:
    """F.layer_norm's output dtype for x: autocast runs layer_norm in fp32 on CUDA (ATen's fp32
    autocast list) but leaves it alone on CPU (the CPU policy has no layer_norm entry)."""
    if x.device.type != "cpu" and autocast_dtype(x.device.type) is not None:
        return torch.float32
    return x.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """t in `dtype` (autocast's cast of a parameter), None stays None."""
    return None if t is None else t.to(dtype)


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


def check_params(params: tuple, like: Tensor, *shapes: tuple, prefix: str = "") -> None:
    """`check_tensor` for every field of an op's parameter group (a NamedTuple of
    crossvit_fast.backends): `shapes` in the group's field order, on `like`'s device. The
    LayerNorm affine (`norm_*`) and the biases may be None, the weights not. Errors name
    `prefix + field`."""
    for (name, t), shape in zip(params._asdict().items(), shapes, strict=True):
        optional = name.startswith(("norm_", "b")) or name.endswith("bias")
        check_tensor(prefix + name, t, shape=shape, like=like, optional=optional)


def check_stage_args(ys: list, params: list, num_heads: list) -> None:
    """`fusion_stage`'s inputs: one params group and one head count per branch, and branch
    tensors (B, 1 + N_i, C_i) of one batch size; ValueError naming what came otherwise."""
    nb = len(ys)
    if nb == 0 or len(params) != nb or len(num_heads) != nb:
        raise ValueError(
            f"fusion_stage: expected one params group and one head count per branch "
            f"({nb} branches), got {len(params)} and {len(num_heads)}"
        )
    if any(not isinstance(y, Tensor) or y.ndim != 3 or y.shape[0] != ys[0].shape[0] for y in ys):
        raise ValueError(
            "fusion_stage: expected (B, 1 + N, C) tensors of one batch size, got "
            f"{[tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in ys]}"
        )
