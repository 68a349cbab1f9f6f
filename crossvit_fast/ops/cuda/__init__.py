"""CUDA C++ backend: kernels in csrc/, built as `crossvit_fast._C` (prebuilt or JIT).

Importing this package loads nothing; `availability()` and `ops()` do.
"""

from __future__ import annotations

import torch


def availability(device_type: str) -> tuple[bool, str]:
    if device_type != "cuda":
        return False, f"CUDA kernels need CUDA tensors; got {device_type} tensors"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    return False, "the CUDA C++ kernels are not built yet (issue: CUDA C++ backend)"


def ops() -> dict:
    return {}
