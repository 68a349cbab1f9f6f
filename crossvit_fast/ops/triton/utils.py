"""Small pieces shared by the Triton kernels (imports Triton: only kernel modules import this).

What the CPU interpreter (TRITON_INTERPRET=1, how CI runs every kernel) does differently from the
GPU path — the whole list, each forced by the interpreter; everything else (kernels, tile plans,
autotune configs, launchers) is the same program:

1. Registration (`register_op`): an opaque `custom_op` instead of `triton_op`, because
   `wrap_triton` cannot put an interpreted kernel into a graph. The GPU path's tracing is checked
   by the toolchain tier (tests/fake_cuda_compile.py).
2. Launches with fake tensors (shape propagation of that custom op) are skipped (`launch`).
3. `EMULATE` (`dot_flags`): the interpreter computes 16-bit `tl.dot` and fp32 -> bf16 casts
   wrongly, so kernels upcast dot operands to fp32 (IEEE products: `mma`) and round to bf16 on
   the bits (`round_to`). On the GPU the operands stay 16-bit (tensor cores).
4. Autotuning (`launch`): the interpreter cannot time configs, so an autotuned kernel runs the
   first config its pruning keeps — or the one a test forces with `force_configs`, which is how
   every config of every op is checked against the reference (tests/test_triton_configs.py).
5. The SM count (`sm_count`): CPU tensors have no device properties; a pretend 4-SM device makes
   small tests exercise the split (flash-decoding) plans.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton
from triton.runtime.autotuner import Autotuner

from . import interpreter_enabled

__all__ = [
    "device_guard",
    "dot_flags",
    "dot_in_fp32",
    "dot_precision",
    "empty",
    "finish_block_sums",
    "finish_sums",
    "force_configs",
    "gelu_erf",
    "gelu_erf_grad",
    "gemm_configs",
    "gemm_tile",
    "grouped_tile",
    "input_grads",
    "launch",
    "mma",
    "next_pow2",
    "program_slots",
    "prune_by_dtype",
    "register_op",
    "round_to",
    "saves",
    "sm_count",
]


# registered op name -> its argument names, in order (`input_grads`)
_ARG_NAMES: dict[str, tuple[str, ...]] = {}


def register_op(name: str):
    """Register an op body that launches Triton kernels (through `launch`).

    On the GPU: `torch.library.triton_op`, so torch.compile / export trace through the body and
    see the kernels (wrap_triton). Under TRITON_INTERPRET=1 the kernels are plain Python
    functions that wrap_triton cannot put in a graph, so the same body is registered as an
    opaque `custom_op` whose fake implementation is the body itself with kernel launches
    skipped (`launch`): shapes and dtypes come from the body's own allocations either way.
    """

    def deco(fn):
        _ARG_NAMES[name] = tuple(inspect.signature(fn).parameters)
        if not interpreter_enabled():
            return triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fn)
        return op

    return deco


def saves(*tensors: Tensor | None) -> bool:
    """Whether an op called on `tensors` must save for backward: grad mode on and one of them
    requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def input_grads(name: str, **grads) -> tuple:
    """What an autograd backward of registered op `name` returns: one gradient per argument, in
    argument order, given by argument name; every argument not named gets None."""
    unknown = set(grads) - set(_ARG_NAMES[name])
    if unknown:
        raise TypeError(f"{name} has no arguments {sorted(unknown)}")
    return tuple(grads.get(arg) for arg in _ARG_NAMES[name])


# kernel name -> index into its pruned autotune configs; set only by `force_configs` (tests)
_FORCED_CONFIGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "forced", default=None
)


@contextlib.contextmanager
def force_configs(choice: dict[str, int]):
    """Inside the block, autotuned kernels run under the interpreter with config number
    `choice[kernel name]` of their pruned list (default 0). Tests only: the GPU path autotunes."""
    token = _FORCED_CONFIGS.set(dict(choice))
    try:
        yield
    finally:
        _FORCED_CONFIGS.reset(token)


def _interpreter_config(kernel: Autotuner, args: tuple, meta: dict) -> dict:
    """The config an autotuned kernel runs with under the interpreter (see the module docstring)."""
    named = dict(zip(kernel.arg_names, args))
    prune = kernel.early_config_prune
    configs = prune(kernel.configs, named, **meta) if prune else kernel.configs
    index = (_FORCED_CONFIGS.get() or {}).get(kernel.fn.__name__, 0)
    if not 0 <= index < len(configs):
        raise IndexError(f"{kernel.fn.__name__}: config {index} of {len(configs)} forced")
    cfg = configs[index]
    return {**cfg.all_kwargs(), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def launch(kernel, grid, *args, **meta) -> None:
    """Launch `kernel` through `wrap_triton`, on the current stream of the device of its first
    tensor argument (`device_guard`). Every kernel of this backend is launched here, which is
    how the sm_90 compile tier (tests/sm90_compile.py) sees all of them. Fake tensors (shape
    propagation of an interpreted op, see `register_op`) have no data: nothing to launch."""
    if interpreter_enabled():
        if any(isinstance(a, Tensor) and is_fake(a) for a in args):
            return
        if isinstance(kernel, Autotuner):
            meta = {**meta, **_interpreter_config(kernel, args, meta)}
            kernel = kernel.fn
    device = next((a.device for a in args if isinstance(a, Tensor)), None)
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **meta)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`: what grid plans size themselves by."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a pretend 4-SM device, so that small tests exercise splits


def program_slots(device: torch.device) -> int:
    """How many programs a persistent-style reduction grid should use on `device`."""
    return 4 * sm_count(device)


def device_guard(device: torch.device | None):
    """Triton launches on the *current* CUDA device: make it the tensors' device (multi-GPU)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def empty(x: Tensor) -> Tensor:
    """A 0-element tensor on x's device: what a registered op returns for an absent output (a
    gradient not requested, or of a None parameter); custom ops cannot return None."""
    return x.new_empty(0)


def gemm_configs(*tiles: tuple[int, int, int, int, int]) -> list[triton.Config]:
    """Autotune configs of a GEMM-like kernel, one per (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages), all in grouped order with GROUP_M = 8 (`grouped_tile`)."""
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for m, n, k, warps, stages in tiles
    ]


def prune_by_dtype(fp32: list, bit16: list, bit16_variant: list, is_variant):
    """`early_config_prune` of a GEMM-like kernel: `fp32` for fp32 weights (`w_ptr`), else
    `bit16_variant` when `is_variant(named_args, meta)`, else `bit16`."""

    def prune(configs, named_args, **meta):
        if named_args["w_ptr"].element_size() >= 4:
            return list(fp32)
        return list(bit16_variant if is_variant(named_args, meta) else bit16)

    return prune


# erf-GELU constants: GELU(x) = x * Phi(x), Phi(x) = (1 + erf(x / sqrt(2))) / 2, Phi' = pdf.
# tl.constexpr: the GPU compiler rejects plain Python globals inside @triton.jit (the interpreter
# does not, so only a real compile catches it: the sm_90 tier, tests/test_toolchain_triton.py).
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def dot_in_fp32() -> bool:
    """Whether kernels must upcast tl.dot operands to fp32: the CPU interpreter computes bf16/fp16
    dots wrongly; on the GPU we keep bf16/fp16 operands for the tensor cores."""
    return interpreter_enabled()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 follows torch's float32 matmul
    precision (IEEE products unless TF32 is allowed; TF32 costs ~1e-3 relative error); ignored
    for 16-bit operands."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def dot_flags(dtype: torch.dtype) -> dict:
    """The dot constexprs every GEMM-like kernel takes: EMULATE (see the module docstring) and
    PRECISION ("ieee" whenever EMULATE: its fp32 copies must multiply exactly)."""
    emulate = dot_in_fp32()
    return {"EMULATE": emulate, "PRECISION": "ieee" if emulate else dot_precision(dtype)}


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """Cast fp32 `x` to `dtype` rounding to nearest even, as the GPU (and PyTorch) do. The CPU
    interpreter truncates fp32 -> bf16, so there (EMULATE) the rounding is done on the bits."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, EMULATE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (tl.dot). EMULATE: on fp32 copies with IEEE products, since the CPU
    interpreter's 16-bit dot is wrong and its fp32 one exact (the module docstring's list)."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


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


@triton.jit
def gemm_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a grouped-order GEMM grid (`grouped_tile`): (pid_m, pid_n,
    row offsets, column offsets, row mask, column mask)."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, offs_m < M, offs_n < N


# -- partial column sums: the bias / LayerNorm-affine gradients of the block ops ---------------


@triton.jit
def _partial_sums_kernel(
    a_ptr, out_a_ptr, Ra, Na, stride_a, b_ptr, out_b_ptr, Rb, Nb, stride_b,
    HAS_B: tl.constexpr, EMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """out_a[n] = sum_r a[r, n] by the first cdiv(Na, BLOCK_N) programs, out_b from b (HAS_B)
    by the rest: partial column sums (an op's bias gradients, its LayerNorm's dgamma / dbeta)
    finished and cast to each output's dtype in one launch."""
    pid = tl.program_id(0)
    n_a = tl.cdiv(Na, BLOCK_N)
    if pid < n_a:
        _column_sums(a_ptr, out_a_ptr, Ra, Na, stride_a, pid, EMULATE, BLOCK_R, BLOCK_N)
    elif HAS_B:
        _column_sums(b_ptr, out_b_ptr, Rb, Nb, stride_b, pid - n_a, EMULATE, BLOCK_R, BLOCK_N)


@triton.jit
def _column_sums(part_ptr, out_ptr, R, N, stride_r, col_block, EMULATE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """`_partial_sums_kernel`'s columns [col_block * BLOCK_N, ...): fp32 sums in a fixed row
    order (deterministic), rounded once to out's dtype."""
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < R)[:, None] & mask_n[None, :]
        acc += tl.load(part_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
    total = round_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_ptr + cols, total, mask=mask_n)


def finish_sums(*parts: tuple[Tensor | None, torch.dtype | None]) -> list[Tensor | None]:
    """One or two (part, dtype) pairs: part (R, N) fp32 partial rows, unit column stride -> its
    column sums (N,) in dtype (`part.sum(0).to(dtype)`), all in one launch; a None part gives
    None (e.g. an op's bias and LayerNorm partial sums, `layer_norm_bwd(finish=False)`)."""
    given = [(p, d) for p, d in parts if p is not None]
    assert len(given) <= 2, "finish_sums: at most two buffers in one launch"
    outs = [p.new_empty(p.shape[1], dtype=d) for p, d in given]
    blocks = sum(triton.cdiv(p.shape[1], 32) for p, _ in given)
    if blocks:
        a, out_a = given[0][0], outs[0]
        b, out_b = (given[1][0], outs[1]) if len(given) == 2 else (None, None)
        launch(
            _partial_sums_kernel, (blocks,), a, out_a, *a.shape, a.stride(0),
            b, out_b, *(b.shape if b is not None else (0, 0)),
            b.stride(0) if b is not None else 0, HAS_B=b is not None,
            EMULATE=dot_in_fp32(), BLOCK_R=64, BLOCK_N=32,
        )  # fmt: skip
    it = iter(outs)
    return [None if p is None else next(it) for p, _ in parts]


def finish_block_sums(norm_parts, norm_weight, norm_bias, bias_parts, cdt, C) -> tuple:
    """A block op's LayerNorm partial rows (`layer_norm_bwd(finish=False)`) and GEMM bias partial
    sums, each or None -> (dnorm (n, C) in the norm's dtype, dbiases in cdt): one launch."""
    norm = norm_weight if norm_weight is not None else norm_bias
    dnorm, db = finish_sums((norm_parts, None if norm is None else norm.dtype), (bias_parts, cdt))
    return (dnorm.view(-1, C) if dnorm is not None else None), db


# -- cost formulas (the `python -m crossvit_fast cost` ledger) -------------------------------------

# kernel name -> f(args: {arg name: value}, meta: constexprs incl. the config, grid: 3-tuple)
#   -> (bytes its programs load + store, FLOPs[, DRAM bytes]). Each lives beside its kernel;
#   tests/test_cost.py checks the issued bytes against what the interpreter's loads and stores
#   touch. The optional DRAM bytes leave out repeats that L2 serves (a GEMM's operand re-read by
#   every tile of a row / column; a program re-reading its own rows), stated beside each formula.
KERNEL_COSTS: dict = {}


def register_cost(kernel_name: str):
    def deco(fn):
        KERNEL_COSTS[kernel_name] = fn
        return fn

    return deco


def esize(t) -> int:
    """Bytes per element of a pointer argument (0 for None: that load / store is compiled out)."""
    return t.element_size() if isinstance(t, torch.Tensor) else 0


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


@register_cost("_partial_sums_kernel")
def _cost_partial_sums(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    """The partial rows read once, the sums written once (each buffer)."""
    b = a["Ra"] * a["Na"] * esize(a["a_ptr"]) + a["Na"] * esize(a["out_a_ptr"])
    return b + a["Rb"] * a["Nb"] * esize(a["b_ptr"]) + a["Nb"] * esize(a["out_b_ptr"]), 0
