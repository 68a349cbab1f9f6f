"""The GEMM launcher the block ops share: `fused_linear`, a GEMM with the fused epilogues (bias,
erf-GELU / its gradient, residual, bias-gradient partial sums; `utils.finish_sums` finishes
those in one launch). Used by `mlp` (fc1, fc2 and fc2's dgrad) and
`self_attention` (proj and its dgrad, the qkv dgrad); a shared piece, not an op (README, Layout).

Two kernels behind one launcher, chosen per call by shape (`fused_linear`'s plan):
* `_fused_linear_kernel`: one program per (BLOCK_M, BLOCK_N) output tile, streaming A's rows and
  W's columns over K. A is re-read by every column tile and W by every row tile (from L2).
* `_resident_linear_kernel` (16-bit compute, K <= 512, one A segment): one program per BLOCK_M
  rows of A, which it reads once, keeps (shared memory, for wgmma) and multiplies by every
  BLOCK_N column slab of W in turn, running the epilogue per slab. A is read from L2 once
  instead of cdiv(N, BLOCK_N) times: for fc1 (N = 3C) and fc2's dgrad (N = 3C, A the fp32 dy)
  that is most of what the tiled kernel issues beyond W.

Ladder: kernels -> launcher `fused_linear` (no registered op of its own: it
run inside the block ops' `triton_op`s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import utils
from .layer_norm import layer_norm_bwd, layer_norm_fwd
from .norm_rows import norm_rows, norm_rows_bwd
from .utils import (
    dot_flags,
    gelu_erf,
    gelu_erf_grad,
    gemm_configs,
    gemm_tile,
    launch,
    mma,
    next_pow2,
    prune_by_dtype,
    round_to,
)

__all__ = [
    "GELU_BWD",
    "GELU_FWD",
    "GELU_NONE",
    "fused_linear",
    "norm_linear",
    "resident_plan",
    "residual_dgrad",
    "sum_rows",
]

# GELU modes of the epilogue.
GELU_NONE, GELU_FWD, GELU_BWD = 0, 1, 2


# -- kernel --------------------------------------------------------------------------------------


@triton.jit
def _fused_linear_kernel(
    a_ptr, a1_ptr, a2_ptr, w_ptr, c_ptr, bias_ptr, res_ptr, aux_ptr,
    asum_ptr, csum_ptr, aout_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_rm, stride_rn, stride_xm,
    stride_as, stride_cs,
    A_SEGS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_AUX: tl.constexpr, HAS_RES: tl.constexpr,
    A_SUM: tl.constexpr, C_SUM: tl.constexpr, A_OUT: tl.constexpr, MIN_BLOCK_M: tl.constexpr,
    EMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C (M, N) = A (M, K) @ B (K, N), B[k, n] at w_ptr + k * stride_wk + n * stride_wn (so a
    weight (N, K) is read transposed for forward, (K, N) as is for dgrad); fp32 accumulation.
    A_SEGS = 2 / 3: A is the column concatenation [a | a1 | a2] of equal-width (M, K / A_SEGS)
    tensors with a's strides, each read in place (attention's q / k / v gradients: no stack).

    A is rounded to the compute dtype (w's dtype) before the product, as the reference rounds.
    A_SUM: column sums of A (rounded) for programs with pid_n == 0 -> asum[row, k] (bias
    gradient of the layer that produced A, when A is an output gradient). A_OUT: those programs
    also store A rounded to the compute dtype -> aout (M, K) contiguous (the dy the weight-
    gradient GEMM takes: no separate cast pass).
    Partial-sum rows (A_SUM, C_SUM): cdiv(M, MIN_BLOCK_M) rows; a program owns rows
    [pid_m * BLOCK_M / MIN_BLOCK_M, ...) and writes its sums to the first, zeros to the others,
    so every row is written and the buffers need no zero fill.
    Epilogue, in order: + bias[n]; GELU == 1: aux <- pre-activation (STORE_AUX), then
    GELU_erf; GELU == 2: * GELU_erf'(aux[m, n]); + res[m, n]; store in c's dtype;
    C_SUM: column sums of the stored tile -> csum[pid_m, n].
    """
    pid_m, pid_n, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m64 = offs_m.to(tl.int64)
    a_rows = a_ptr + m64[:, None] * stride_am
    w_cols = w_ptr + offs_n[None, :] * stride_wn
    cdt = w_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    SUM_ROWS: tl.constexpr = BLOCK_M // MIN_BLOCK_M  # partial-sum rows a program owns
    row0 = pid_m * SUM_ROWS
    n_rows = tl.cdiv(M, MIN_BLOCK_M)
    K_SEG = K // A_SEGS
    for seg in tl.static_range(A_SEGS):
        if seg == 1:
            a_rows = a1_ptr + m64[:, None] * stride_am
        if seg == 2:
            a_rows = a2_ptr + m64[:, None] * stride_am
        for k0 in range(0, K_SEG, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < K_SEG
            a = tl.load(
                a_rows + ks[None, :] * stride_ak, mask=m_mask[:, None] & k_mask[None, :], other=0.0
            )
            if a.dtype != cdt:
                a = round_to(a.to(tl.float32), cdt, EMULATE)
            # Masked stores, not a branch: keep the K loop straight-line for software pipelining.
            only_first = k_mask & ((ks * 0 + pid_n) == 0)
            if A_SUM:
                cols = asum_ptr + seg * K_SEG + ks
                tl.store(cols + row0 * stride_as, tl.sum(a.to(tl.float32), axis=0), mask=only_first)
                for r in tl.static_range(1, SUM_ROWS):
                    tl.store(cols + (row0 + r) * stride_as, tl.zeros_like(ks).to(tl.float32),
                             mask=only_first & (ks * 0 + row0 + r < n_rows))  # fmt: skip
            if A_OUT:
                tl.store(aout_ptr + m64[:, None] * K + (seg * K_SEG + ks)[None, :], a,
                         mask=m_mask[:, None] & only_first[None, :])  # fmt: skip
            w = tl.load(
                w_cols + (seg * K_SEG + ks)[:, None] * stride_wk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc = mma(a, w, acc, EMULATE, PRECISION)

    # Epilogue in column slices of 128 (64 with a GELU): the extra tiles it loads (residual,
    # pre-activation) and the GELU temporaries exist for one slice at a time, which is what keeps
    # the 128 x 256 tiles (and the 128 x 128 GELU-gradient tile with A_OUT) spill-free on sm_90;
    # the toolchain tier compiles every config.
    EPI_COLS: tl.constexpr = 64 if GELU != 0 else 128
    _fused_linear_epilogue(
        acc, pid_n * BLOCK_N, m64, m_mask, N, row0, n_rows, c_ptr, bias_ptr, res_ptr, aux_ptr,
        csum_ptr, stride_cm, stride_rm, stride_rn, stride_xm, stride_cs, cdt, HAS_BIAS, GELU,
        STORE_AUX, HAS_RES, C_SUM, EMULATE, SUM_ROWS, BLOCK_M, BLOCK_N,
        BLOCK_N // EPI_COLS if BLOCK_N > EPI_COLS else 1,
    )  # fmt: skip


@triton.jit
def _fused_linear_epilogue(
    acc, n0, m64, m_mask, N, row0, n_rows, c_ptr, bias_ptr, res_ptr, aux_ptr, csum_ptr,
    stride_cm, stride_rm, stride_rn, stride_xm, stride_cs, cdt, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr, STORE_AUX: tl.constexpr, HAS_RES: tl.constexpr, C_SUM: tl.constexpr,
    EMULATE: tl.constexpr, SUM_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr,
    PARTS: tl.constexpr,
):  # fmt: skip
    """`_fused_linear_kernel`'s epilogue (see there) for the accumulator columns [n0, n0 + WIDTH),
    in PARTS (a power of two) slices one after the other, so only a slice's bias / residual /
    pre-activation tiles are live at a time (tl.split halves a trailing dim of 2: quarters are
    halves of halves)."""
    if PARTS > 1:
        HALF: tl.constexpr = WIDTH // 2
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        _fused_linear_epilogue(
            lo, n0, m64, m_mask, N, row0, n_rows, c_ptr, bias_ptr, res_ptr, aux_ptr, csum_ptr,
            stride_cm, stride_rm, stride_rn, stride_xm, stride_cs, cdt, HAS_BIAS, GELU,
            STORE_AUX, HAS_RES, C_SUM, EMULATE, SUM_ROWS, BLOCK_M, HALF, PARTS // 2,
        )  # fmt: skip
        _fused_linear_epilogue(
            hi, n0 + HALF, m64, m_mask, N, row0, n_rows, c_ptr, bias_ptr, res_ptr, aux_ptr,
            csum_ptr, stride_cm, stride_rm, stride_rn, stride_xm, stride_cs, cdt, HAS_BIAS, GELU,
            STORE_AUX, HAS_RES, C_SUM, EMULATE, SUM_ROWS, BLOCK_M, HALF, PARTS // 2,
        )  # fmt: skip
        return  # (a constexpr branch: the slices are done)
    offs_n = n0 + tl.arange(0, WIDTH)
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GELU == 1:
        pre = round_to(acc, cdt, EMULATE)  # the reference's pre-activation, in the compute dtype
        if STORE_AUX:
            tl.store(aux_ptr + m64[:, None] * stride_xm + offs_n[None, :], pre, mask=mask)
        acc = gelu_erf(pre.to(tl.float32))
    if GELU == 2:
        pre = tl.load(aux_ptr + m64[:, None] * stride_xm + offs_n[None, :], mask=mask, other=0.0)
        pre = pre.to(tl.float32)
        acc = round_to(acc, cdt, EMULATE).to(tl.float32) * gelu_erf_grad(pre)
    if HAS_RES:
        res = tl.load(
            res_ptr + m64[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0
        )
        acc += res.to(tl.float32)
    c = round_to(acc, c_ptr.dtype.element_ty, EMULATE)
    tl.store(c_ptr + m64[:, None] * stride_cm + offs_n[None, :], c, mask=mask)
    if C_SUM:
        csum = tl.sum(tl.where(mask, c.to(tl.float32), 0.0), axis=0)
        tl.store(csum_ptr + row0 * stride_cs + offs_n, csum, mask=n_mask)
        for r in tl.static_range(1, SUM_ROWS):
            tl.store(csum_ptr + (row0 + r) * stride_cs + offs_n, tl.zeros_like(csum),
                     mask=n_mask & (offs_n * 0 + row0 + r < n_rows))  # fmt: skip


@triton.jit
def _resident_linear_kernel(
    a_ptr, w_ptr, c_ptr, bias_ptr, res_ptr, aux_ptr, asum_ptr, csum_ptr, aout_ptr,
    nw_ptr, nb_ptr, mean_ptr, rstd_ptr, lnx_ptr, dres_ptr, dx_ptr, npart_ptr,
    M, N, K,
    stride_am, stride_ak, stride_wk, stride_wn, stride_cm, stride_rm, stride_rn, stride_xm,
    stride_as, stride_cs, stride_lx, stride_dr, stride_np, eps,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_AUX: tl.constexpr, HAS_RES: tl.constexpr,
    A_SUM: tl.constexpr, C_SUM: tl.constexpr, NORM: tl.constexpr, DNORM: tl.constexpr,
    HAS_NW: tl.constexpr, HAS_NB: tl.constexpr, MIN_BLOCK_M: tl.constexpr,
    EMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """`_fused_linear_kernel`'s product and epilogues (same arguments, one A segment), with this
    program's BLOCK_M rows of A read once and kept for every column slab: BLOCK_K = K padded to
    a power of two (<= 512), w 16-bit. Program pid owns rows [pid * BLOCK_M, ...) and loops over
    the BLOCK_N-wide column slabs of W, each a (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) product
    followed by the epilogue of that slab.

    A in w's dtype is loaded whole. A in another dtype (fp32 dy) is read in 64-column chunks,
    rounded and written to aout (M, K) (always given then: the GEMM's A as it ran, which the
    weight gradient reuses), and the tile is loaded back from there: the whole fp32 tile at
    once spills on sm_90 (255 registers), the rounded 16-bit tile is half of it. The bar.sync
    (`debug_barrier`) orders the program's own stores before that load; `.cg` reads it from L2.
    A_SUM (column sums of A rounded, this program's partial row) comes from the same chunks.
    NORM: A is LayerNorm(a) (weight nw, bias nb, `eps`), computed here in the same way
    (`norm_rows`): LN(a) -> aout (the op's saved LN output), its statistics -> mean / rstd.
    DNORM: A is dres + LayerNorm-backward(a) (`norm_rows_bwd`: a = the gradient of LN(lnx)'s
    output, LayerNorm weight nw (HAS_NW), lnx's mean / rstd; HAS_NW / HAS_NB also ask for the
    dgamma / dbeta partial rows -> npart): A -> dx (and rounded -> aout), then loaded back.
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    m64 = offs_m.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    k_mask = ks < K
    cdt = w_ptr.dtype.element_ty
    SUM_ROWS: tl.constexpr = BLOCK_M // MIN_BLOCK_M
    row0 = pid_m * SUM_ROWS
    n_rows = tl.cdiv(M, MIN_BLOCK_M)
    tile = m_mask[:, None] & k_mask[None, :]
    if NORM:
        norm_rows(a_ptr, aout_ptr, nw_ptr, nb_ptr, mean_ptr, rstd_ptr, offs_m, m64, m_mask, K,
                   stride_am, stride_ak, eps, cdt, HAS_NW, HAS_NB, EMULATE, BLOCK_M, BLOCK_K)  # fmt: skip
        tl.debug_barrier()
        a = tl.load(aout_ptr + m64[:, None] * K + ks[None, :], mask=tile, other=0.0,
                    cache_modifier=".cg")  # fmt: skip
    elif DNORM:
        norm_rows_bwd(a_ptr, lnx_ptr, dres_ptr, dx_ptr, aout_ptr, nw_ptr, mean_ptr, rstd_ptr,
                      asum_ptr, npart_ptr, offs_m, m64, m_mask, K, stride_am, stride_lx,
                      stride_dr, stride_as, stride_np, row0, n_rows, cdt, HAS_NW, A_SUM, HAS_NW,
                      HAS_NB, SUM_ROWS, EMULATE, BLOCK_M, BLOCK_K)  # fmt: skip
        tl.debug_barrier()
        a = tl.load(aout_ptr + m64[:, None] * K + ks[None, :], mask=tile, other=0.0,
                    cache_modifier=".cg")  # fmt: skip
    elif a_ptr.dtype.element_ty != cdt:
        CHUNK: tl.constexpr = 64 if BLOCK_K > 64 else BLOCK_K
        for k0 in tl.static_range(0, BLOCK_K, CHUNK):
            kc = k0 + tl.arange(0, CHUNK)
            mask = m_mask[:, None] & (kc < K)[None, :]
            part = tl.load(a_ptr + m64[:, None] * stride_am + kc[None, :] * stride_ak, mask=mask,
                           other=0.0)  # fmt: skip
            part = round_to(part.to(tl.float32), cdt, EMULATE)
            tl.store(aout_ptr + m64[:, None] * K + kc[None, :], part, mask=mask)
            if A_SUM:
                sums = tl.sum(part.to(tl.float32), axis=0)
                tl.store(asum_ptr + row0 * stride_as + kc, sums, mask=kc < K)
        tl.debug_barrier()
        a = tl.load(aout_ptr + m64[:, None] * K + ks[None, :], mask=tile, other=0.0,
                    cache_modifier=".cg")  # fmt: skip
    else:
        a = tl.load(a_ptr + m64[:, None] * stride_am + ks[None, :] * stride_ak, mask=tile,
                    other=0.0)  # fmt: skip
        if A_SUM:
            tl.store(
                asum_ptr + row0 * stride_as + ks, tl.sum(a.to(tl.float32), axis=0), mask=k_mask
            )
    if A_SUM:
        for r in tl.static_range(1, SUM_ROWS):
            tl.store(asum_ptr + (row0 + r) * stride_as + ks, tl.zeros_like(ks).to(tl.float32),
                     mask=k_mask & (ks * 0 + row0 + r < n_rows))  # fmt: skip
    w_rows = w_ptr + ks[:, None] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(w_rows + offs_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & (offs_n < N)[None, :], other=0.0)  # fmt: skip
        acc = mma(a, w, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), EMULATE, PRECISION)
        _fused_linear_epilogue(
            acc, n0, m64, m_mask, N, row0, n_rows, c_ptr, bias_ptr, res_ptr, aux_ptr, csum_ptr,
            stride_cm, stride_rm, stride_rn, stride_xm, stride_cs, cdt, HAS_BIAS, GELU,
            STORE_AUX, HAS_RES, C_SUM, EMULATE, SUM_ROWS, BLOCK_M, BLOCK_N, 1,
        )  # fmt: skip


# -- configs -------------------------------------------------------------------------------------

# Hopper: 128x256 tiles with 8 warps (two wgmma warpgroups, 3 stages, 129-165 KB of shared memory
# at 16 bits) first: per FLOP they issue 3/4 of a 128x128 tile's bytes (each A tile is re-read
# by half as many column tiles), and the cost ledger charges a GEMM for those re-reads (L2).
# Then 128x128 with 8 warps and 128x64 / 64x128 with 4, 64-deep K steps, 4 stages. Every config
# of every variant is compiled for sm_90 in the toolchain tier (tests/test_toolchain_triton.py:
# wgmma, shared memory, zero spills). What that tier found: 128x256 tiles spilled (152-2160 bytes)
# until the epilogue ran in column slices (`_fused_linear_epilogue`); now 206-255 registers,
# no spills. The GELU-gradient epilogue also holds the pre-activation tile, and with 4 warps a
# 128x64 / 64x128 fp16 tile spilled 32 bytes, so that variant runs them with 8 warps; fp32 (IEEE
# products on the FMA units, no tensor cores) spilled ~320 bytes at 32-deep K steps and uses
# 16-deep ones (198-206 registers). The autotuner picks per (N, K, variant, dtypes) among the
# configs `_prune` keeps; the ledger (crossvit_fast.cost) assumes the first.
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CONFIGS_16 = gemm_configs(
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)
)
_CONFIGS_16_GELU_BWD = gemm_configs(
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)
)
_CONFIGS_32 = gemm_configs((128, 64, 16, 8, 3), (64, 64, 16, 4, 3))
# Partial-sum rows: one per 64 rows of A, the smallest BLOCK_M any config may use.
MIN_BLOCK_M = 64

_prune = prune_by_dtype(
    _CONFIGS_32, _CONFIGS_16, _CONFIGS_16_GELU_BWD, lambda named, meta: meta.get("GELU") == GELU_BWD
)


_fused_linear_tuned = triton.autotune(
    configs=_CONFIGS_16 + _CONFIGS_16_GELU_BWD + _CONFIGS_32,
    key=["N", "K", "A_SEGS", "GELU", "HAS_RES", "A_SUM", "C_SUM"],
    prune_configs_by={"early_config_prune": _prune},
)(_fused_linear_kernel)

# The resident plan: BLOCK_M = 128 rows of A held in shared memory (128 KB at K = 512, 16 bits)
# plus W slabs of BLOCK_N columns, double-buffered at 32 columns (64 KB at K = 512) or single at
# 64: at most 213 KB of shared memory at K = 512 (a 64-column slab double-buffered needed 278 KB)
# and no spills; the toolchain tier compiles every variant and config for sm_90 and checks both.
# The tiled kernel's 128 x 256 tiles would not fit beside the resident A.
RESIDENT_MAX_K = 512
_RESIDENT_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=1),
]
_resident_linear_tuned = triton.autotune(
    configs=_RESIDENT_CONFIGS, key=["N", "K", "GELU", "HAS_RES", "A_SUM", "C_SUM"]
)(_resident_linear_kernel)


# -- launcher ------------------------------------------------------------------------------------


def sum_rows(M: int) -> int:
    """Rows of a partial column-sum buffer for an M-row GEMM (see `fused_linear`)."""
    return triton.cdiv(M, MIN_BLOCK_M)


def resident_plan(M: int, K: int, segs: int, w: Tensor, a: Tensor) -> bool:
    """Whether `fused_linear` runs the resident kernel: one A segment, 16-bit compute, K small
    enough for A's rows to stay in shared memory, and enough row blocks to give every SM one
    (otherwise the tiled kernel's rows x columns grid is the one that fills the GPU)."""
    return (
        segs == 1
        and w.element_size() == 2
        and K <= RESIDENT_MAX_K
        and triton.cdiv(M, 128) >= utils.sm_count(a.device)
    )


def fused_linear(
    a: Tensor | tuple[Tensor, ...],
    w: Tensor,
    out: Tensor,
    *,
    transpose_w: bool,
    bias: Tensor | None = None,
    res: Tensor | None = None,
    aux: Tensor | None = None,
    gelu: int = GELU_NONE,
    a_sum: Tensor | None = None,
    c_sum: Tensor | None = None,
    a_out: Tensor | None = None,
    norm: tuple | None = None,
    dnorm: tuple | None = None,
) -> Tensor:
    """out (M, N) = a (M, K) @ (w.T if transpose_w else w) with the fused extras of
    `_fused_linear_kernel`; returns `out`.

    a: (M, K) any strides / float dtype (cast to w's dtype, the compute dtype), or a tuple of
    2 / 3 same-shape, same-strides (M, K / len) tensors read as their column concatenation
    (no LayerNorm prologue then). w: (N, K) with
    transpose_w (nn.Linear forward) or (K, N) (dgrad), any strides. out: (M, N) with unit
    column stride, any float dtype. bias (N,); res (M, N) any strides; aux (M, N) unit column
    stride: pre-activation written (gelu=GELU_FWD, when given) or read (GELU_BWD).
    a_sum (sum_rows(M), K) / c_sum (sum_rows(M), N), unit column stride (column slices of one
    buffer may share a `.sum(0)`): fp32 (torch.empty: every row is written), receiving partial
    column sums of a / out; `utils.finish_sums` (sum and cast, one launch) or `.sum(0)` finishes them.
    a_out (M, K) contiguous, w's dtype: receives a rounded to it (the GEMM's A as it ran).
    Plan (`resident_plan`): the resident kernel for one A segment, 16-bit w, K <= 512 and at
    least one 128-row block per SM; else the tiled kernel. Same rounding points and epilogue;
    only the fp32 accumulation order over K differs (one dot over the padded K vs 64-deep
    steps): tests/ops/test_gemm.py holds both to the 2x rule.
    norm: (weight, bias, eps, mean, rstd), resident plan only (`norm_linear`): A = LN(a), written
    to a_out, its statistics to mean / rstd.
    dnorm: (lnx, weight, bias, mean, rstd, dres, dx, parts), resident plan only (`resident`):
    A = dres + the LayerNorm backward of a (the gradient of LN(lnx)'s output; lnx, dres (M, K)
    unit column stride, mean / rstd its fp32 statistics), written to dx ((M, K) contiguous, the
    input gradient) and, rounded, to a_out (given when dx is not in w's dtype); parts
    (sum_rows(M), n * K) fp32 receives the dweight | dbias partial rows of the affine present.
    """
    segs = tuple(a) if isinstance(a, (tuple, list)) else (a,)
    a = segs[0]
    if any(t.shape != a.shape or t.stride() != a.stride() for t in segs):
        raise ValueError("fused_linear: A segments must share shape and strides")
    M, K = a.shape[0], a.shape[1] * len(segs)
    N = w.shape[0] if transpose_w else w.shape[1]
    if M == 0 or N == 0:
        return out
    stride_wk, stride_wn = (w.stride(1), w.stride(0)) if transpose_w else (w.stride(0), w.stride(1))
    if norm is not None or dnorm is not None or resident_plan(M, K, len(segs), w, a):
        nw, nb, eps, mean, rstd = norm if norm is not None else (None, None, 0.0, None, None)
        lnx = dres = dx = parts = None
        if dnorm is not None:
            lnx, nw, nb, mean, rstd, dres, dx, parts = dnorm
            a_out = dx if dx.dtype == w.dtype else a_out  # the kernel loads A back from a_out
        elif norm is None and a.dtype == w.dtype and a_out is not None:  # A as it ran: A itself
            a_out.copy_(a)
        elif norm is None and a.dtype != w.dtype and a_out is None:  # rounded through it
            a_out = a.new_empty((M, K), dtype=w.dtype)  # (see the kernel; NORM: LN(a) there)
        args = (
            a, w, out, bias, res, aux, a_sum, c_sum, a_out, nw, nb, mean, rstd, lnx, dres, dx,
            parts, M, N, K, a.stride(0), a.stride(1), stride_wk, stride_wn, out.stride(0),
            res.stride(0) if res is not None else 0, res.stride(1) if res is not None else 0,
            aux.stride(0) if aux is not None else 0,
            a_sum.stride(0) if a_sum is not None else 0,
            c_sum.stride(0) if c_sum is not None else 0,
            *((lnx.stride(0), dres.stride(0), parts.stride(0)) if dnorm else (0, 0, 0)),
            float(eps),
        )  # fmt: skip
        flags = dict(
            HAS_BIAS=bias is not None, GELU=gelu, STORE_AUX=aux is not None,
            HAS_RES=res is not None, A_SUM=a_sum is not None, C_SUM=c_sum is not None,
            NORM=norm is not None, DNORM=dnorm is not None, HAS_NW=nw is not None,
            HAS_NB=nb is not None,
            MIN_BLOCK_M=MIN_BLOCK_M, BLOCK_K=next_pow2(K), **dot_flags(w.dtype),
        )  # fmt: skip
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        launch(_resident_linear_tuned, grid, *args, **flags)
        return out
    args = (
        a, segs[1] if len(segs) > 1 else None, segs[2] if len(segs) > 2 else None, w, out,
        bias, res, aux, a_sum, c_sum, a_out, M, N, K,
        a.stride(0), a.stride(1), stride_wk, stride_wn, out.stride(0),
        res.stride(0) if res is not None else 0, res.stride(1) if res is not None else 0,
        aux.stride(0) if aux is not None else 0,
        a_sum.stride(0) if a_sum is not None else 0, c_sum.stride(0) if c_sum is not None else 0,
    )  # fmt: skip
    flags = dict(
        A_SEGS=len(segs), HAS_BIAS=bias is not None,
        GELU=gelu, STORE_AUX=aux is not None, HAS_RES=res is not None, A_SUM=a_sum is not None,
        C_SUM=c_sum is not None, A_OUT=a_out is not None, MIN_BLOCK_M=MIN_BLOCK_M,
        **dot_flags(w.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(_fused_linear_tuned, grid, *args, **flags)
    return out


def residual_dgrad(
    dy: Tensor,
    w: Tensor,
    out: Tensor,
    after: tuple | None = None,
    need_a16: bool = True,
    **epilogue,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """out = A @ w (a dgrad: w (K, N) as is) with `fused_linear`'s epilogue, A (M, K) the output
    gradient of a residual sub-layer: dy itself, or with `after` = (lnx, weight, bias, mean,
    rstd, dn) dy + the LayerNorm backward of dn (the gradient of LN(lnx)'s output: the pre-norm
    sub-layer that follows), made in the GEMM's prologue on the resident plan (`dnorm`), else
    by `layer_norm_bwd` first. Returns (A in dy's / lnx's dtype, A rounded to w's dtype (the
    weight gradient's operand: A itself when that is its dtype; None if not `need_a16` and not
    made anyway), the LayerNorm's [dweight | dbias] partial rows of the affine present, or
    None)."""
    M, K = dy.shape
    if after is not None:
        lnx, aw, ab, mean, rstd, dn = after
        lnx = lnx.reshape(M, K)
    if after is not None and resident_plan(M, K, 1, w, dy):
        a = dy.new_empty((M, K), dtype=lnx.dtype)
        a16 = dy.new_empty((M, K), dtype=w.dtype) if a.dtype != w.dtype else a
        n = int(aw is not None) + int(ab is not None)
        parts = dy.new_empty((sum_rows(M), max(n, 1) * K), dtype=torch.float32)
        dnorm = (lnx.contiguous(), aw, ab, mean, rstd, dy.contiguous(), a, parts)
        fused_linear(dn, w, out, transpose_w=False, a_out=a16, dnorm=dnorm, **epilogue)
        return a, a16, parts if n else None
    parts = None
    if after is not None:
        dy, parts, _ = layer_norm_bwd(lnx, aw, ab, mean, rstd, dn, dy, True, True, finish=False)
    a16 = dy.new_empty((M, K), dtype=w.dtype) if need_a16 and dy.dtype != w.dtype else None
    fused_linear(dy, w, out, transpose_w=False, a_out=a16, **epilogue)
    return dy, (dy if a16 is None and dy.dtype == w.dtype else a16), parts


def norm_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    eps: float,
    w: Tensor,
    out: Tensor,
    **epilogue,
) -> tuple[Tensor, Tensor, Tensor]:
    """out = LayerNorm(x) @ w.T with `fused_linear`'s epilogue (keyword arguments); returns
    (LN(x) (M, K) in w's dtype, mean, rstd (M,) fp32), what the op saves for backward.

    x: (M, K) any float dtype / strides; w: (N, K). Resident plan: the GEMM normalises its own
    rows (`norm_rows`: x read twice from L2 and once from DRAM, no LayerNorm launch); else
    `layer_norm_fwd` and the tiled GEMM."""
    M, K = x.shape
    if not resident_plan(M, K, 1, w, x):
        xhat, mean, rstd = layer_norm_fwd(x, norm_weight, norm_bias, eps, w.dtype)
        fused_linear(xhat, w, out, transpose_w=True, **epilogue)
        return xhat, mean, rstd
    xhat = x.new_empty((M, K), dtype=w.dtype)
    mean, rstd = (x.new_empty(M, dtype=torch.float32) for _ in range(2))
    norm = (norm_weight, norm_bias, eps, mean, rstd)
    fused_linear(x, w, out, transpose_w=True, a_out=xhat, norm=norm, **epilogue)
    return xhat, mean, rstd


# -- cost formula (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` ---------


from .utils import cdiv, esize, register_cost  # noqa: E402


def _fused_linear_bytes(a: dict, meta: dict, tm: int, tn: int) -> int:
    """Bytes loaded + stored when A is read by `tn` column tiles and W by `tm` row tiles."""
    M, N, K = a["M"], a["N"], a["K"]
    rows_out = cdiv(M, MIN_BLOCK_M)  # partial-sum rows, every one written
    b = M * K * tn * esize(a["a_ptr"]) + N * K * tm * esize(a["w_ptr"])
    if meta["A_SUM"]:
        b += 4 * rows_out * K
    b += tm * N * esize(a["bias_ptr"]) * meta["HAS_BIAS"]
    if (meta["GELU"] == GELU_FWD and meta["STORE_AUX"]) or meta["GELU"] == GELU_BWD:
        b += M * N * esize(a["aux_ptr"])
    b += M * N * (esize(a["res_ptr"]) * meta["HAS_RES"] + esize(a["c_ptr"]))
    if meta["C_SUM"]:
        b += 4 * rows_out * N
    if meta["A_OUT"]:
        b += M * K * esize(a["aout_ptr"])
    return b


@register_cost("_fused_linear_kernel")
def _cost_fused_linear(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    """Every program streams its BLOCK_M rows of A and BLOCK_N columns of W over all of K: A is
    issued once per column tile, W once per row tile. DRAM: once each — the grouped tile order
    (GROUP_M row tiles share a column tile) keeps the repeats in L2, as cuBLAS's do."""
    M, N, K = a["M"], a["N"], a["K"]
    tm, tn = cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"])
    return _fused_linear_bytes(a, meta, tm, tn), 2 * M * N * K, _fused_linear_bytes(a, meta, 1, 1)


@register_cost("_resident_linear_kernel")
def _cost_resident_linear(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    """A read once (a 16-bit copy written and read back when A is not in w's dtype; NORM: x read
    twice, LN(x) written and read back, its statistics and affine), W once per row block, the
    epilogue's tensors once. DRAM: W once (L2 keeps it for every row block); the second read
    of x and the read-back of A's copy are L2 hits (the program's own rows, just touched)."""
    M, N, K = a["M"], a["N"], a["K"]
    tm = cdiv(M, meta["BLOCK_M"])
    if meta["DNORM"]:
        return _cost_dnorm_prologue(a, meta, tm)
    copied = meta["NORM"] or a["a_ptr"].dtype != a["w_ptr"].dtype
    copy = M * K * esize(a["aout_ptr"]) if copied else 0
    flags = {**meta, "A_OUT": copy > 0}
    issued = _fused_linear_bytes(a, flags, tm, 1) + copy
    dram = _fused_linear_bytes(a, flags, 1, 1)
    if meta["NORM"]:
        affine = K * (esize(a["nw_ptr"]) + esize(a["nb_ptr"]))
        issued += M * K * esize(a["a_ptr"]) + 8 * M + tm * affine
        dram += 8 * M + affine
    return issued, 2 * M * N * K, dram


def _cost_dnorm_prologue(a: dict, meta: dict, tm: int) -> tuple[int, int, int]:
    """DNORM: dn and lnx read twice (row sums, then dx), dres once, dx written once (and its
    rounded copy when dx is not in w's dtype), A read back, the statistics, the LayerNorm weight
    per program and pass, the dgamma / dbeta partial rows. DRAM: each tensor once (the second
    pass and the read-back are the program's own rows, L2 hits)."""
    M, N, K = a["M"], a["N"], a["K"]
    e = M * K
    separate = a["dx_ptr"].dtype != a["w_ptr"].dtype  # dx and the rounded A are two tensors
    flags = {**meta, "A_OUT": separate}
    parts = 4 * cdiv(M, MIN_BLOCK_M) * K * (int(meta["HAS_NW"]) + int(meta["HAS_NB"]))
    once = e * (esize(a["lnx_ptr"]) + esize(a["dres_ptr"]) + esize(a["dx_ptr"])) + 8 * M + parts
    issued = _fused_linear_bytes(a, flags, tm, 1) + once + e * esize(a["a_ptr"])
    issued += e * esize(a["lnx_ptr"]) + e * esize(a["aout_ptr"]) + 2 * tm * K * esize(a["nw_ptr"])
    dram = _fused_linear_bytes(a, flags, 1, 1) + once + K * esize(a["nw_ptr"])
    return issued, 2 * M * N * K, dram
