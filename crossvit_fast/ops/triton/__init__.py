"""Triton backend: fused kernels written in Triton.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set
before Triton is imported), which is how CI tests every kernel. Importing this package does not
import Triton; `ops()` does.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability(device_type: str) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU visible to torch"
        return True, "Triton kernels on the GPU"
    if interpreter_enabled():
        return True, "TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter (slow; for tests)"
    return False, (
        f"Triton kernels need CUDA tensors; got {device_type} tensors "
        "(set TRITON_INTERPRET=1 before importing triton to run them in the CPU interpreter)"
    )


# Kernel modules of this backend, one per op and named after it (ops/triton/<op>.py); each exports
# `OPS: dict[op name, functional]`. Ops no module provides fall back to the reference
# (crossvit_fast.backends).
_KERNEL_MODULES: tuple[str, ...] = (
    "layer_norm",
    "mlp",
    "self_attention",
    "block",
    "blocks",
    "patch_embed",
    "token_assemble",
    "cross_attention",
    "cls_proj",
    "cross_fusion",
    "fusion_stage",
    "cast_params",
)


def ops() -> dict:
    """op name -> implementation. Imports Triton (through the kernel modules)."""
    import importlib

    table = {}
    for mod in _KERNEL_MODULES:
        table.update(importlib.import_module(f"{__name__}.{mod}").OPS)
    return table
