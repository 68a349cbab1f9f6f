"""Small pieces shared by the Triton kernels (imports Triton: only kernel modules import this)."""

from __future__ import annotations

import triton
import triton.language as tl

from . import interpreter_enabled

__all__ = ["dot_in_fp32", "gelu_erf", "gelu_erf_grad", "next_pow2"]

# erf-GELU constants: GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2, Phi' = pdf.
# tl.constexpr: the GPU compiler rejects plain Python globals inside @triton.jit (the interpreter
# does not, so only a real compile catches it — see tests/test_triton_mlp.py's H100 compile test).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def dot_in_fp32() -> bool:
    """Whether kernels must upcast tl.dot operands to fp32: the CPU interpreter computes bf16/fp16
    dots wrongly; on the GPU we keep bf16/fp16 operands for the tensor cores."""
    return interpreter_enabled()


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def gelu_erf(x):
    """Exact (erf) GELU in fp32, as nn.GELU(approximate='none')."""
    return 0.5 * x * (1.0 + tl.erf(x * _SQRT1_2))


@triton.jit
def gelu_erf_grad(x):
    """d GELU(x) / dx = Phi(x) + x * pdf(x), fp32."""
    cdf = 0.5 * (1.0 + tl.erf(x * _SQRT1_2))
    pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf
