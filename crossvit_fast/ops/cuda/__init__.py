"""CUDA C++ backend: hand-written kernels in csrc/, built as `crossvit_fast._C` (prebuilt by
setup.py, or JIT-built on first use: see `build`).

Ops (`functional`): LayerNorm with fused residual add / GELU / output cast, bias + GELU epilogue,
patch-embedding token assembly, and the K/V-free CLS cross-attention core; GEMMs go through
cuBLAS. Kernels are registered as torch.library custom ops (`kernels`).

Importing this package loads nothing; `availability("cuda")` loads (possibly builds) the
extension and says exactly why it is unavailable; `ops()` imports the op definitions only.
"""

from __future__ import annotations

import torch


def availability(device_type: str) -> tuple[bool, str]:
    from . import build

    if device_type == "cpu" and build.emulated():
        return True, "the CPU emulator build of csrc/ (tests, through build.use_extension)"
    if torch.version.cuda is None:
        return (
            False,
            f"torch {torch.__version__} is a CPU-only build (the CUDA kernels need a CUDA build of torch)",
        )
    if device_type != "cuda":
        return False, f"CUDA kernels need CUDA tensors; got {device_type} tensors"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch"
    return build.status()


def ops() -> dict:
    """op name -> implementation (does not load the extension)."""
    from .functional import OPS

    return dict(OPS)
