"""The LayerNorm prologues of the resident GEMM (`gemm._resident_linear_kernel`): a shared piece,
not an op. Each works on one program's BLOCK_M rows of a (M, K) matrix in column chunks, so
no whole fp32 tile is live at once (the resident A already holds most of the registers' budget).

* `norm_rows` (forward, `NORM`): A = LayerNorm(x), the GEMM's input computed by the GEMM itself.
* `norm_rows_bwd` (backward, `DNORM`, 32-column chunks): A = dres + LayerNorm-backward(dn), the input gradient of a
  pre-norm residual sub-layer: the GEMM that consumes it (the previous sub-layer's dgrad) is what
  finishes it, so that gradient is written once and never read back by a separate launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import round_to

__all__ = ["norm_rows", "norm_rows_bwd"]


@triton.jit
def norm_rows(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, offs_m, m64, m_mask, K, stride_xm,
               stride_xk, eps, cdt: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """LayerNorm of this program's rows of x (K wide) in 64-column chunks, two reads of x: the
    statistics in one pass (Chan's combination of each chunk's mean and centred sum of squares:
    as exact as `_layer_norm_fwd_kernel`'s two passes over a whole row, without a third read),
    then y = (x - mean) * rstd * w + b rounded to cdt -> y (M, K) contiguous; mean / rstd fp32."""
    CHUNK: tl.constexpr = 64 if BLOCK_K > 64 else BLOCK_K
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in tl.static_range(0, BLOCK_K, CHUNK):
        kc = k0 + tl.arange(0, CHUNK)
        mask = m_mask[:, None] & (kc < K)[None, :]
        x = tl.load(x_ptr + m64[:, None] * stride_xm + kc[None, :] * stride_xk, mask=mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        n_c = tl.maximum(tl.minimum(K - k0, CHUNK), 0).to(tl.float32)  # valid columns (0: padding)
        n_a = tl.minimum(K, k0).to(tl.float32)  # columns combined so far
        c_mean = tl.sum(x, axis=1) / tl.maximum(n_c, 1.0)
        xc = tl.where(mask, x - c_mean[:, None], 0.0)
        delta = c_mean - mean
        share = n_c / tl.maximum(n_a + n_c, 1.0)
        mean += delta * share
        m2 += tl.sum(xc * xc, axis=1) + delta * delta * n_a * share
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    tl.store(mean_ptr + offs_m, mean, mask=m_mask)
    tl.store(rstd_ptr + offs_m, rstd, mask=m_mask)
    for k0 in tl.static_range(0, BLOCK_K, CHUNK):
        kc = k0 + tl.arange(0, CHUNK)
        kmask = kc < K
        mask = m_mask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + m64[:, None] * stride_xm + kc[None, :] * stride_xk, mask=mask,
                    other=0.0).to(tl.float32)  # fmt: skip
        y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m64[:, None] * K + kc[None, :], round_to(y, cdt, EMULATE), mask=mask)


@triton.jit
def _chunk_bwd(dn_ptr, x_ptr, w_ptr, mean, rstd, m64, m_mask, kc, K, stride_dn, stride_x,
               HAS_W: tl.constexpr):  # fmt: skip
    """One chunk of columns kc: (dn, xhat, g = dn * w, mask), fp32, masked elements 0."""
    kmask = kc < K
    mask = m_mask[:, None] & kmask[None, :]
    dn = tl.load(dn_ptr + m64[:, None] * stride_dn + kc[None, :], mask=mask, other=0.0)
    dn = dn.to(tl.float32)
    x = tl.load(x_ptr + m64[:, None] * stride_x + kc[None, :], mask=mask, other=0.0)
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    g = dn
    if HAS_W:
        g = dn * tl.load(w_ptr + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
    return dn, xhat, g, mask


@triton.jit
def norm_rows_bwd(dn_ptr, x_ptr, dres_ptr, dx_ptr, aout_ptr, w_ptr, mean_ptr, rstd_ptr, asum_ptr,
                  part_ptr, offs_m, m64, m_mask, K, stride_dn, stride_x, stride_r, stride_as,
                  stride_part, row0, n_rows, cdt: tl.constexpr, HAS_W: tl.constexpr,
                  A_SUM: tl.constexpr, DW: tl.constexpr, DB: tl.constexpr,
                  SUM_ROWS: tl.constexpr, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):  # fmt: skip
    """dx = dres + LayerNorm-backward(dn) of this program's rows (`_layer_norm_bwd_kernel`'s
    formula: rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = dn * w), in two passes over
    the chunks (the row sums, then dx; the second read of dn and x is an L2 hit).

    dn (M, K): the gradient of LN(x)'s output; x (M, K) the LayerNorm's input with its fp32
    mean / rstd; dres (M, K) the residual gradient; all unit column stride. Stores dx (M, K)
    contiguous in dx's dtype and, when that is not cdt, dx rounded to cdt -> aout (the GEMM's A,
    which the caller loads back from aout; the launcher passes dx itself as aout otherwise).
    A_SUM: column sums of A as rounded -> asum row `row0`. DW / DB: this program's partial
    dgamma = sum(dn * xhat) / dbeta = sum(dn) -> part[row0, :K] / part[row0, DW * K:], zeros in
    its other SUM_ROWS - 1 rows (every row written: no zero fill)."""
    # 32 columns at a time in loops that are not unrolled: the forward's 64-column unrolled
    # passes spilled on sm_90 here (five chunk tiles live at once, the next chunk's loads hoisted)
    CHUNK: tl.constexpr = 32 if BLOCK_K > 32 else BLOCK_K
    mean = tl.load(mean_ptr + offs_m, mask=m_mask, other=0.0)
    rstd = tl.load(rstd_ptr + offs_m, mask=m_mask, other=0.0)
    c1 = tl.zeros((BLOCK_M,), tl.float32)
    c2 = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, BLOCK_K, CHUNK):
        kc = k0 + tl.arange(0, CHUNK)
        _, xhat, g, _ = _chunk_bwd(dn_ptr, x_ptr, w_ptr, mean, rstd, m64, m_mask, kc, K,
                                   stride_dn, stride_x, HAS_W)  # fmt: skip
        c1 += tl.sum(g * xhat, axis=1)
        c2 += tl.sum(g, axis=1)
    c1 = c1 / K
    c2 = c2 / K
    db_col = 0  # dbeta's first column in part
    if DW:
        db_col = K
    for k0 in range(0, BLOCK_K, CHUNK):
        kc = k0 + tl.arange(0, CHUNK)
        kmask = kc < K
        dn, xhat, g, mask = _chunk_bwd(dn_ptr, x_ptr, w_ptr, mean, rstd, m64, m_mask, kc, K,
                                       stride_dn, stride_x, HAS_W)  # fmt: skip
        # The column sums first, so that dn is dead before dx and dres are live (registers).
        if DW:
            tl.store(part_ptr + row0 * stride_part + kc, tl.sum(dn * xhat, axis=0), mask=kmask)
        if DB:
            tl.store(part_ptr + row0 * stride_part + db_col + kc, tl.sum(dn, axis=0), mask=kmask)
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        dres = tl.load(dres_ptr + m64[:, None] * stride_r + kc[None, :], mask=mask, other=0.0)
        dx = round_to(dx + dres.to(tl.float32), dx_ptr.dtype.element_ty, EMULATE)
        tl.store(dx_ptr + m64[:, None] * K + kc[None, :], dx, mask=mask)
        a = dx
        if dx_ptr.dtype.element_ty != cdt:
            a = round_to(dx.to(tl.float32), cdt, EMULATE)
            tl.store(aout_ptr + m64[:, None] * K + kc[None, :], a, mask=mask)
        if A_SUM:
            tl.store(asum_ptr + row0 * stride_as + kc, tl.sum(a.to(tl.float32), axis=0), mask=kmask)
    cols = tl.arange(0, BLOCK_K)
    for r in tl.static_range(1, SUM_ROWS):
        zmask = (cols < K) & (cols * 0 + row0 + r < n_rows)
        zero = tl.zeros((BLOCK_K,), tl.float32)
        if DW:
            tl.store(part_ptr + (row0 + r) * stride_part + cols, zero, mask=zmask)
        if DB:
            tl.store(part_ptr + (row0 + r) * stride_part + db_col + cols, zero, mask=zmask)
