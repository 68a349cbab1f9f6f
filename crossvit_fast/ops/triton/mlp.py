"""Fused ViT-block MLP in Triton: `x + fc2(GELU_erf(fc1(LN(x))))`, forward and backward.

Ladder: `_fused_linear_kernel` (one GEMM with bias / GELU / GELU-gradient / residual /
bias-gradient epilogues, A optionally read as 2-3 K-segments) -> launcher `fused_linear` -> ops
`crossvit_fast::mlp` / `crossvit_fast::mlp_backward` (autograd registered on the first) ->
functional `mlp` (reference signature, minus dropout). `self_attention` reuses `fused_linear`
for its proj GEMM (residual epilogue) and its dgrads.

Forward (M = tokens x batch rows, C = width, Hd = hidden):
  1. LayerNorm (`layer_norm_fwd`): one read of x (fp32 in CrossViT's residual stream), LN(x)
     written once in the compute dtype (saved: it is also dW1's operand) with the row statistics.
  2. fc1: epilogue + bias, the pre-activation saved for backward (training only), exact-erf
     GELU, the hidden activation written once in the compute dtype.
  3. fc2: epilogue + bias + residual (x), written once in the output dtype.
  Eager PyTorch writes and re-reads the pre-activation, GELU's output and fc2's output
  separately; here the only (M, Hd) traffic is writing the hidden activation (plus the
  pre-activation when training) and reading it once. Why LN(x) is written rather than applied
  in fc1's prologue: the GEMM re-reads A once per column tile (from L2), and a 16-bit LN(x) costs
  half the bytes of the fp32 x each time, for one extra (M, C) write.

Backward:
  1. Triton dgrad of fc2: da = (dy @ W2) * GELU'(a) in the epilogue; d(fc2 bias) from the
     column sums of the dy tiles and d(fc1 bias) from the column sums of da, reduced per
     64-row block into fp32 partial rows (deterministic, no atomics); the dy tiles, rounded
     to the compute dtype as the GEMM uses them, are also written out for dW2 (no cast pass).
  2. cuBLAS: dW2 = dy^T @ h, dxhat = da @ W1, dW1 = da^T @ LN(x). These are plain GEMMs
     without a prologue or epilogue to fuse, and cuBLAS's split-K / stream-K kernels handle the
     long-K weight-gradient shapes (K = M = 50k-100k rows, output only C x Hd) better than a
     Triton GEMM would.
  3. Triton LayerNorm backward (`layer_norm_bwd`) with the residual gradient dy added in, so
     dx is written once; its dgamma / dbeta partials finish with the bias sums in one launch.

Numerics follow the reference's rounding points: the LayerNorm output and the pre-activation
are rounded to the compute dtype before the GEMM / GELU, accumulation is fp32; fp32 GEMMs use
IEEE fp32 products unless torch's float32 matmul precision allows TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backends import MlpParams, as_params
from ..common import cast, check_params, check_tensor, compute_dtype
from .layer_norm import as_rows, layer_norm_bwd, layer_norm_fwd, split_norm_grads
from .utils import (
    dot_flags,
    dot_in_fp32,
    gelu_erf,
    gelu_erf_grad,
    gemm_configs,
    gemm_tile,
    launch,
    mma,
    prune_by_dtype,
    register_op,
    round_to,
)

__all__ = ["OPS", "finish_block_sums", "finish_sums", "fused_linear", "mlp"]

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


# -- launcher ------------------------------------------------------------------------------------


def sum_rows(M: int) -> int:
    """Rows of a partial column-sum buffer for an M-row GEMM (see `fused_linear`)."""
    return triton.cdiv(M, MIN_BLOCK_M)


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
    column sums of a / out; `finish_sums` (sum and cast, one launch) or `.sum(0)` finishes them.
    a_out (M, K) contiguous, w's dtype: receives a rounded to it (the GEMM's A as it ran).
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


# -- registered ops ------------------------------------------------------------------------------


def _out_dtype(x: Tensor, cdt: torch.dtype, residual: bool) -> torch.dtype:
    # The reference adds x to fc2's output (compute dtype): type promotion decides.
    return torch.promote_types(x.dtype, cdt) if residual else cdt


@register_op("crossvit_fast::mlp")
def _mlp_op(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    eps: float,
    residual: bool,
    save_act: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, mean, rstd, xhat, act, hidden). x: (..., C) any float dtype; fc weights / biases
    in the compute dtype. xhat: (M, C) LN(x) in the compute dtype (fc1's A and dW1's operand);
    act: (M, Hd) pre-activation when save_act (for backward), else empty; hidden: (M, Hd)
    GELU output; mean / rstd: fp32 (M,) LayerNorm statistics."""
    C = x.shape[-1]
    Hd = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    x2 = as_rows(x)
    M = x2.shape[0]
    xhat, mean, rstd = layer_norm_fwd(x2, norm_weight, norm_bias, eps, cdt)
    hidden = x.new_empty((M, Hd), dtype=cdt)
    act = x.new_empty((M, Hd) if save_act else (0,), dtype=cdt)
    fused_linear(
        xhat,
        fc1_weight,
        hidden,
        transpose_w=True,
        bias=fc1_bias,
        gelu=GELU_FWD,
        aux=act if save_act else None,
    )
    out = x.new_empty(x.shape, dtype=_out_dtype(x, cdt, residual))
    fused_linear(
        hidden,
        fc2_weight,
        out.view(M, C),
        transpose_w=True,
        bias=fc2_bias,
        res=x2 if residual else None,
    )
    return out, mean, rstd, xhat, act, hidden


@register_op("crossvit_fast::mlp_backward")
def _mlp_backward_op(
    dout: Tensor,
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    fc1_weight: Tensor,
    fc2_weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    xhat: Tensor,
    act: Tensor,
    hidden: Tensor,
    residual: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dnorm, dfc1_weight, dfc2_weight, dbiases): dnorm the requested rows of
    [dnorm_weight; dnorm_bias] (`layer_norm_bwd`), dbiases = [dfc2_bias | dfc1_bias] for the
    requested ones (one reduction finishes both); `needs`
    flags (x, norm weight, norm bias, fc1 weight, fc1 bias, fc2 weight, fc2 bias); an unneeded
    gradient comes back empty."""
    _, need_nw, need_nb, need_w1, need_b1, need_w2, need_b2 = needs
    C = x.shape[-1]
    Hd = fc1_weight.shape[0]
    cdt = fc1_weight.dtype
    x2, dy = as_rows(x), as_rows(dout)
    M = x2.shape[0]
    empty = lambda: x.new_empty(0)  # a distinct placeholder each time: outputs must not alias
    # 1. da = (dy @ W2) * GELU'(a); column sums give both bias gradients.
    da = x.new_empty((M, Hd), dtype=cdt)
    # Both bias gradients' partial sums side by side ([fc2 | fc1] columns): one reduction.
    sums = x.new_empty((sum_rows(M), C * need_b2 + Hd * need_b1), dtype=torch.float32)
    b2_sum = sums[:, :C] if need_b2 else None
    b1_sum = sums[:, C * need_b2 :] if need_b1 else None
    dy16 = x.new_empty((M, C), dtype=cdt) if need_w2 and dy.dtype != cdt else None
    fused_linear(
        dy,
        fc2_weight,
        da,
        transpose_w=False,
        aux=act,
        gelu=GELU_BWD,
        a_sum=b2_sum,
        c_sum=b1_sum,
        a_out=dy16,
    )
    # 2. cuBLAS for the plain GEMMs (see the module docstring).
    dw2 = torch.mm((dy if dy16 is None else dy16).t(), hidden) if need_w2 else empty()
    dxhat = torch.mm(da, fc1_weight)
    # 3. LayerNorm backward + residual gradient.
    dx, norm_parts, _ = layer_norm_bwd(
        x2, norm_weight, norm_bias, mean, rstd, dxhat, dy if residual else None, need_nw, need_nb,
        finish=False,
    )  # fmt: skip
    dw1 = torch.mm(da.t(), xhat) if need_w1 else empty()
    bias_parts = sums if need_b1 or need_b2 else None
    dnorm, db = finish_block_sums(norm_parts, norm_weight, norm_bias, bias_parts, cdt, C)
    return (
        dx.view(x.shape),
        dnorm if dnorm is not None else empty(),
        dw1,
        dw2,
        db if db is not None else empty(),
    )


def _mlp_setup(ctx, inputs, output):
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _eps, residual, _ = (
        inputs
    )
    _out, mean, rstd, xhat, act, hidden = output
    ctx.mark_non_differentiable(mean, rstd, xhat, act, hidden)
    # No zero-filled gradients of the saved-for-backward outputs: two (M, hidden) memsets a block.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x, norm_weight, norm_bias, fc1_weight, fc2_weight, mean, rstd, xhat, act, hidden
    )
    ctx.residual = residual
    params = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    ctx.has = [t is not None for t in params]  # which inputs can have a gradient


def _mlp_backward(ctx, dout, *_):
    if dout is None:
        return (None,) * 10
    saved = ctx.saved_tensors
    needs = [h and n for h, n in zip(ctx.has, ctx.needs_input_grad[:7])]
    if saved[8].numel() == 0 and saved[0].numel() > 0:
        raise RuntimeError("crossvit_fast::mlp: backward through a call made with save_act=False")
    dx, dnorm, dw1, dw2, db = torch.ops.crossvit_fast.mlp_backward(
        dout, *saved, ctx.residual, needs
    )
    dnw, dnb = split_norm_grads(dnorm, needs[1], needs[2])
    C = saved[0].shape[-1] if needs[6] else 0
    db2, db1 = db[:C], db[C:]  # [fc2 | fc1], only the requested ones
    grads = (dx, dnw, dnb, dw1, db1, dw2, db2)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None, None)


_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# -- functional ----------------------------------------------------------------------------------


def mlp(x: Tensor, params: MlpParams, eps: float, residual: bool = True) -> Tensor:
    """ViT block MLP half: `x + fc2(GELU_erf(fc1(LN(x))))` (`residual=False`: without `x +`).

    x: (B, N, C) (any leading dims), fp32 / fp16 / bf16, any strides; params: `MlpParams`, norm
    (C,) or None, fc1: (Hd, C), fc2: (C, Hd), biases or None. Without autocast every parameter
    has x's dtype; under autocast the GEMMs run in the autocast dtype and LayerNorm in fp32, and
    the output dtype is the reference's (promote(x, autocast dtype) with the residual, else the
    autocast dtype). Batch 0 returns an empty result.
    """
    params = as_params(MlpParams, params)
    norm_weight, norm_bias, fc1_weight = params[:3]
    check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (B, N, C), got {tuple(x.shape)}")
    C = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, ndim=2, like=x)
    Hd = fc1_weight.shape[0]
    check_params(params, x, (C,), (C,), (Hd, C), (Hd,), (C, Hd), (C,))
    cdt = compute_dtype(x, **params._asdict())
    # what autocast does to F.linear's arguments (the LayerNorm affine stays as it is)
    args = (norm_weight, norm_bias, *(cast(t, cdt) for t in params[2:]))
    save_act = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *args)
    )
    return torch.ops.crossvit_fast.mlp(x, *args, float(eps), bool(residual), save_act)[0]


OPS = {"mlp": mlp}


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


@register_cost("_partial_sums_kernel")
def _cost_partial_sums(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    """The partial rows read once, the sums written once (each buffer)."""
    b = a["Ra"] * a["Na"] * esize(a["a_ptr"]) + a["Na"] * esize(a["out_a_ptr"])
    return b + a["Rb"] * a["Nb"] * esize(a["b_ptr"]) + a["Nb"] * esize(a["out_b_ptr"]), 0


@register_cost("_fused_linear_kernel")
def _cost_fused_linear(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    """Every program streams its BLOCK_M rows of A and BLOCK_N columns of W over all of K: A is
    issued once per column tile, W once per row tile. DRAM: once each — the grouped tile order
    (GROUP_M row tiles share a column tile) keeps the repeats in L2, as cuBLAS's do."""
    M, N, K = a["M"], a["N"], a["K"]
    tm, tn = cdiv(M, meta["BLOCK_M"]), cdiv(N, meta["BLOCK_N"])
    return _fused_linear_bytes(a, meta, tm, tn), 2 * M * N * K, _fused_linear_bytes(a, meta, 1, 1)
