"""Small pieces shared by the Triton kernels (imports Triton: only kernel modules import this)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from . import interpreter_enabled

__all__ = [
    "device_guard",
    "dot_in_fp32",
    "gelu_erf",
    "gelu_erf_grad",
    "grouped_tile",
    "launch",
    "next_pow2",
    "register_op",
]


def register_op(name: str):
    """Register an op body that launches Triton kernels (through `launch`).

    On the GPU: `torch.library.triton_op`, so torch.compile / export trace through the body and
    see the kernels (wrap_triton). Under TRITON_INTERPRET=1 the kernels are plain Python
    functions that wrap_triton cannot put in a graph, so the same body is registered as an
    opaque `custom_op` whose fake implementation is the body itself with kernel launches
    skipped (`launch`): shapes and dtypes come from the body's own allocations either way.
    """

    def deco(fn):
        if not interpreter_enabled():
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return deco


def launch(kernel, grid, *args, **meta) -> None:
    """Launch `kernel` through `wrap_triton` (on the current stream). Fake tensors (shape
    propagation of an interpreted op, see `register_op`) have no data: nothing to launch."""
    if interpreter_enabled() and any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def device_guard(device: torch.device):
    """Triton launches on the *current* CUDA device: make it the tensors' device (multi-GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program for a GEMM grid of cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    programs, in grouped order: GROUP_M row-tiles share each column-tile of B while it is hot in
    L2 (the Triton matmul tutorial's swizzle)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m
