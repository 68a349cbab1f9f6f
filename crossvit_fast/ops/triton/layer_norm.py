"""LayerNorm in Triton — the `layer_norm` op (the final norms) — and the LayerNorm kernels the
fused ops reuse: `mlp` / `self_attention` normalise their input with the forward kernel and run
the backward one (residual gradient added in) on their GEMM's input gradient; `cross_attention`
and `cls_proj` normalise CLS rows with `_cls_norm_fwd_kernel` / `_cls_norm_bwd_kernel` (launchers
`cls_norm_fwd` / `cls_norm_bwd`): whole rows in registers, with the erf-GELU, residual-base and
bias-gradient extras those ops fold into the same launch.

Ladder: `_layer_norm_fwd_kernel` / `_layer_norm_bwd_kernel` -> launchers `layer_norm_fwd` /
`layer_norm_bwd` -> ops `crossvit_fast::layer_norm` / `crossvit_fast::layer_norm_backward`
(autograd registered on the first) -> functional `layer_norm` (reference signature).

Memory plan (persistent grids of G ~ 4 x SMs programs, each loading w / b once). Forward: x read
once, y and the fp32 (mean, rstd) of each row written once. Backward: x and dy read once, dx
written once; dw / db reduced per program into fp32 (G, C) partials that one small `sum(0)` (or
the caller, `finish=False`) finishes: deterministic, no atomics."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import check_param_dtype, check_tensor, layer_norm_out_dtype
from .utils import (
    dot_in_fp32,
    empty,
    finish_sums,
    gelu_erf,
    gelu_erf_grad,
    launch,
    next_pow2,
    program_slots,
    register_op,
    round_to,
)

__all__ = ["OPS", "layer_norm"]  # the table's op; below, the launchers the fused ops reuse
__all__ += ["as_rows", "cls_norm_bwd", "cls_norm_fwd", "layer_norm_bwd", "layer_norm_fwd"]
__all__ += ["split_norm_grads"]

# One row must fit in one program's registers (CrossViT widths are <= 768).
MAX_WIDTH = 16384


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, rows, cols, stride_r, stride_c, mask):
    """The (rows, cols) tile of a row-major-ish matrix, fp32 (masked elements 0)."""
    offs = rows.to(tl.int64)[:, None] * stride_r + cols[None, :] * stride_c
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _row_tile(r, row_end, cmask, BLOCK_M: tl.constexpr):
    """Rows r .. r + BLOCK_M (span end row_end): indices (int32, int64), row and tile masks."""
    rows = r + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    return rows, rows.to(tl.int64), rmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, C, rows_per_prog, stride_xm, stride_xc, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_Y: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """`rows_per_prog` consecutive rows per program, BLOCK_M whole rows at a time (w / b loaded
    once per program): fp32 mean / rstd (two-pass in registers, exact like PyTorch's Welford)
    and, with STORE_Y, y = (x - mean) * rstd * w + b in y's dtype."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else None
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_B else None
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows, rows64, rmask, mask = _row_tile(r, row_end, cmask, BLOCK_M)
        x = _load_rows(x_ptr, rows, cols, stride_xm, stride_xc, mask)
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        if STORE_Y:
            y = xc * rstd[:, None]
            if HAS_W:
                y = y * w[None, :]
            if HAS_B:
                y = y + b[None, :]
            y = round_to(y, y_ptr.dtype.element_ty, EMULATE)
            tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dres_ptr, dx_ptr, y_ptr, dw_ptr, db_ptr,
    M, C, rows_per_prog,
    stride_xm, stride_xc, stride_dym, stride_dyc, stride_rm, stride_rc, stride_dxm, stride_ym,
    stride_part,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DRES: tl.constexpr, STORE_Y: tl.constexpr,
    STORE_DW: tl.constexpr, STORE_DB: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """LayerNorm backward over `rows_per_prog` consecutive rows per program.

    dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)), g = dy * w, plus `dres` (the
    residual branch's gradient, fused here so the block's dx is written once). STORE_Y also
    re-emits y = LN(x) in y's dtype: the fused GEMMs never materialise it in forward, but the
    weight-gradient GEMM (cuBLAS) that follows needs it. Per-program partial sums of
    dy * xhat and dy go to row `pid` of dw / db (fp32)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else None
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_B else None
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows, rows64, rmask, mask = _row_tile(r, row_end, cmask, BLOCK_M)
        x = _load_rows(x_ptr, rows, cols, stride_xm, stride_xc, mask)
        dy = _load_rows(dy_ptr, rows, cols, stride_dym, stride_dyc, mask)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(g * xhat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += _load_rows(dres_ptr, rows, cols, stride_rm, stride_rc, mask)
        dx = round_to(dx, dx_ptr.dtype.element_ty, EMULATE)
        tl.store(dx_ptr + rows64[:, None] * stride_dxm + cols[None, :], dx, mask=mask)
        if STORE_Y:
            y = xhat * w[None, :] if HAS_W else xhat
            if HAS_B:
                y = y + b[None, :]
            y = round_to(y, y_ptr.dtype.element_ty, EMULATE)
            tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y, mask=mask)
        if STORE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if STORE_DB:
            db_acc += tl.sum(dy, axis=0)
    if STORE_DW:
        tl.store(dw_ptr + pid * stride_part + cols, dw_acc, mask=cmask)
    if STORE_DB:
        tl.store(db_ptr + pid * stride_part + cols, db_acc, mask=cmask)


# -- row helpers (the CLS-row kernels below) -------------------------------------------------------


@triton.jit
def _normalize_rows(x, mask_c, C, eps):
    """Rows of x (fp32, masked columns 0) -> ((x - mean) * rstd with masked columns 0, rstd).
    Two-pass statistics from the row already in registers (biased variance, as F.layer_norm)."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _ln_rows_bwd(dn, xhat, rstd, w, mask_c, C, HAS_W: tl.constexpr):
    """LayerNorm backward of rows: dn = dL/d(x^ * w + b) -> dL/dx (fp32)."""
    g = dn
    if HAS_W:
        g = g * w[None, :]
    g = tl.where(mask_c[None, :], g, 0.0)
    mean_g = tl.sum(g, axis=1) / C
    mean_gx = tl.sum(g * xhat, axis=1) / C
    return rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])


# -- CLS rows: LayerNorm (+ erf-GELU) of whole rows in registers -----------------------------------
#
# The CLS-side ops (`cross_attention`, `cls_proj`) normalise B rows at a time, so these kernels
# keep whole rows in registers and fold extras into the same launch (the residual base, GELU,
# partial dgamma / dbeta of other rows, bias-gradient column sums).


@triton.jit
def _cls_norm_fwd_kernel(
    x_ptr, stride_xm, stride_xc,
    w_ptr, b_ptr,
    y_ptr,  # (M, C) contiguous: [GELU](LN(x))
    add_ptr, r_ptr,  # HAS_R: r = x + add (C) -> (M, C) contiguous, the residual base of out-proj
    M, C, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, GELU: tl.constexpr,
    HAS_R: tl.constexpr, HAS_ADD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    mask = (rows < M)[:, None] & mask_c[None, :]
    rows = rows.to(tl.int64)
    x = _load_rows(x_ptr, rows, cols, stride_xm, stride_xc, mask)
    h, _ = _normalize_rows(x, mask_c, C, eps)
    if HAS_W:
        h = h * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        h = h + tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if GELU:
        h = gelu_erf(h)
    offs = rows[:, None] * C + cols[None, :]
    tl.store(y_ptr + offs, h, mask=mask)
    if HAS_R:
        r = x
        if HAS_ADD:
            r = r + tl.load(add_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        tl.store(r_ptr + offs, r, mask=mask)


@triton.jit
def _col_sums(part_ptr, e_ptr, stride_em, stride_ec, rows, mask_m, CE, BLOCK_E: tl.constexpr):
    """Store the column sums of rows `rows` of e (M, CE) at part_ptr (fp32)."""
    ecols = tl.arange(0, BLOCK_E)
    emask = mask_m[:, None] & (ecols < CE)[None, :]
    e = tl.load(
        e_ptr + rows[:, None] * stride_em + ecols[None, :] * stride_ec, mask=emask, other=0.0
    )
    tl.store(part_ptr + ecols, tl.sum(e.to(tl.float32), axis=0), mask=ecols < CE)


@triton.jit
def _cls_norm_bwd_kernel(
    x_ptr, stride_xm, stride_xc,
    dy_ptr, stride_dym, stride_dyc,  # dL/d [GELU](LN(x)), (M, C)
    w_ptr, b_ptr,
    res_ptr, stride_rm, stride_rc,  # HAS_RES: added to dx (the residual's gradient)
    pre_ptr, S,  # HAS_PRE: (M, S, 2, C) fp32 partial (dgamma, dbeta) of the same LayerNorm
    e0_ptr, stride_e0m, stride_e0c,  # NUM_E extra (M, CE) tensors whose column sums are wanted
    e1_ptr, stride_e1m, stride_e1c,  # (bias gradients), so they need no launch of their own
    e2_ptr, stride_e2m, stride_e2c,
    dx_ptr,  # (M, C) contiguous
    part_ptr,  # (P, 2C + NUM_E*CE) fp32 per-program partials: dgamma | dbeta | e0 | e1 | e2
    M, C, CE, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_PRE: tl.constexpr, NUM_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    mask_m = rows < M
    mask_c = cols < C
    mask = mask_m[:, None] & mask_c[None, :]
    rows = rows.to(tl.int64)
    x = _load_rows(x_ptr, rows, cols, stride_xm, stride_xc, mask)
    xhat, rstd = _normalize_rows(x, mask_c, C, eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_W else None
    dn = _load_rows(dy_ptr, rows, cols, stride_dym, stride_dyc, mask)
    if GELU:  # recompute the pre-activation h = LN(x) instead of saving it
        h = xhat
        if HAS_W:
            h = h * w[None, :]
        if HAS_B:
            h = h + tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        dn = dn * gelu_erf_grad(h)
    dn = tl.where(mask, dn, 0.0)
    dx = _ln_rows_bwd(dn, xhat, rstd, w, mask_c, C, HAS_W)
    if HAS_RES:
        dx += _load_rows(res_ptr, rows, cols, stride_rm, stride_rc, mask)
    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx, mask=mask)

    dw = tl.sum(dn * xhat, axis=0)
    db = tl.sum(dn, axis=0)
    if HAS_PRE:  # fold in the token rows' partials of these samples, split by split: fixed order
        for s in range(S):
            p = pre_ptr + ((rows * S + s) * 2 * C)[:, None] + cols[None, :]
            dw += tl.sum(tl.load(p, mask=mask, other=0.0), axis=0)
            db += tl.sum(tl.load(p + C, mask=mask, other=0.0), axis=0)
    part = part_ptr + pid.to(tl.int64) * (2 * C + NUM_E * CE)
    tl.store(part + cols, dw, mask=mask_c)
    tl.store(part + C + cols, db, mask=mask_c)
    if NUM_E > 0:
        _col_sums(part + 2 * C, e0_ptr, stride_e0m, stride_e0c, rows, mask_m, CE, BLOCK_E)
    if NUM_E > 1:
        _col_sums(part + 2 * C + CE, e1_ptr, stride_e1m, stride_e1c, rows, mask_m, CE, BLOCK_E)
    if NUM_E > 2:
        _col_sums(part + 2 * C + 2 * CE, e2_ptr, stride_e2m, stride_e2c, rows, mask_m, CE, BLOCK_E)


# -- launchers -----------------------------------------------------------------------------------


def _row_block(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, num_warps): ~4K fp32 values per program keeps registers in budget."""
    block_c = next_pow2(C)
    block_m = max(1, min(16, 4096 // block_c))
    return block_c, block_m, 4 if block_m * block_c <= 4096 else 8


def _rows_per_prog(M: int, block_m: int, device: torch.device) -> int:
    """Rows per program of the persistent row grids (a multiple of block_m): one program per
    `program_slots` slot, so per-program loads (w, b) and partial-sum rows stay per SM slot."""
    return block_m * triton.cdiv(triton.cdiv(max(M, 1), block_m), program_slots(device))


def as_rows(t: Tensor) -> Tensor:
    """(..., C) -> (M, C): a view (any strides suit the kernels) unless the dims cannot merge."""
    return t.reshape(-1, t.shape[-1])


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, y_dtype: torch.dtype | None
) -> tuple[Tensor | None, Tensor, Tensor]:
    """x: (..., C) any float dtype and strides. Returns (y or None, mean, rstd): y (..., C) in
    `y_dtype` (None: statistics only), mean / rstd fp32 (M,) with M = x.numel() // C."""
    C = x.shape[-1]
    x2 = as_rows(x)
    M = x2.shape[0]
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    y = None if y_dtype is None else torch.empty(x.shape, device=x.device, dtype=y_dtype)
    if M == 0:
        return y, mean, rstd
    block_c, block_m, warps = _row_block(C)
    rows_per_prog = _rows_per_prog(M, block_m, x.device)
    y2 = y.view(M, C) if y is not None else mean  # dummy pointer when not stored
    launch(
        _layer_norm_fwd_kernel, (triton.cdiv(M, rows_per_prog),),
        x2, weight, bias, y2, mean, rstd, M, C, rows_per_prog, x2.stride(0), x2.stride(1), C, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_Y=y is not None,
        EMULATE=dot_in_fp32(), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dy: Tensor,
    dres: Tensor | None,
    need_dw: bool,
    need_db: bool,
    y_dtype: torch.dtype | None = None,
    finish: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradient of y = LN(x) (+ a residual gradient `dres`, same shape as x, added to dx).

    x, dy, dres: (..., C), any strides / float dtypes. Returns (dx in x's dtype, dnorm, y):
    dnorm (n, C) the requested rows of [dweight; dbias] (fp32 sums in the parameters' dtype,
    `split_norm_grads` takes them apart; `finish=False`: the fp32 partial rows (G, n * C) for
    the caller's reduction; None: neither requested), y re-emitted in `y_dtype` when given (for
    a following weight-gradient GEMM), else None."""
    C = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    M = x2.shape[0]
    dres2 = as_rows(dres) if dres is not None else None
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y = None if y_dtype is None else torch.empty(x.shape, device=x.device, dtype=y_dtype)
    block_c, block_m, warps = _row_block(C)
    rows_per_prog = _rows_per_prog(M, block_m, x.device)
    grid = triton.cdiv(M, rows_per_prog)
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    # Partial sums: every program writes its row, so empty (not zeros) is enough; dweight's and
    # dbias's rows side by side in one buffer, so one reduction finishes both.
    n_part = int(need_dw) + int(need_db)
    parts = torch.empty((grid, max(n_part, 1), C), device=x.device, dtype=torch.float32)
    dw_part = parts[:, 0] if need_dw else None
    db_part = parts[:, n_part - 1] if need_db else None
    if M > 0:
        launch(
            _layer_norm_bwd_kernel, (grid,),
            x2, weight, bias, mean, rstd, dy2, dres2, dx.view(M, C),
            y.view(M, C) if y is not None else dx, dw_part, db_part,
            M, C, rows_per_prog, x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
            dres2.stride(0) if dres2 is not None else 0,
            dres2.stride(1) if dres2 is not None else 0, C, C, parts.stride(0),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_DRES=dres2 is not None,
            STORE_Y=y is not None, STORE_DW=need_dw, STORE_DB=need_db, EMULATE=dot_in_fp32(),
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    if not n_part or not finish:
        return dx, parts.view(grid, n_part * C) if n_part else None, y
    return dx, parts.sum(0).to((weight if weight is not None else bias).dtype), y


def split_norm_grads(dnorm: Tensor, need_dw: bool, need_db: bool) -> tuple:
    """(dweight, dbias) from `layer_norm_bwd`'s stacked rows, None where not requested (views:
    take them outside a registered op, whose outputs may not alias each other)."""
    return (dnorm[0] if need_dw else None), (dnorm[int(need_dw)] if need_db else None)


def _row_tiles(C: int, cap: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for the row kernels: whole rows in registers."""
    block_c = next_pow2(max(C, 16))
    return max(1, min(16, cap // block_c)), block_c, 4 if block_c <= 512 else 8


def cls_norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    gelu: bool,
    residual_base: bool = False,
    add: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Row-wise [GELU](LayerNorm(x)). x: (M, C) any strides, fp32/fp16/bf16; statistics in fp32.

    Returns (y (M, C) in out_dtype, r) with r = x + add (M, C) in out_dtype when residual_base
    (the residual base that the out-projection GEMM then accumulates into), else None.
    """
    M, C = x.shape
    y = x.new_empty((M, C), dtype=out_dtype)
    r = x.new_empty((M, C), dtype=out_dtype) if residual_base else None
    if M == 0:
        return y, r
    block_m, block_c, num_warps = _row_tiles(C, 4096)
    launch(
        _cls_norm_fwd_kernel, (triton.cdiv(M, block_m),),
        x, x.stride(0), x.stride(1), weight, bias, y, add, r, M, C, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, GELU=gelu, HAS_R=residual_base,
        HAS_ADD=add is not None, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )  # fmt: skip
    return y, r


def cls_norm_bwd(
    x: Tensor,
    dy: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    gelu: bool,
    res: Tensor | None = None,
    pre: Tensor | None = None,
    extras: tuple[Tensor, ...] = (),
    extras_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward of `cls_norm_fwd`. x, dy: (M, C); res: (M, C) added to dx; pre: (M, S, 2, C)
    fp32 partial (dgamma, dbeta) of the same LayerNorm from other rows; extras: up to 3 tensors
    (M, CE) whose column sums are wanted (bias gradients). Returns dx (M, C) in x.dtype, dnorm
    (2C,) fp32 = dgamma | dbeta and dextras = colsum(extras[0]) | ... in extras_dtype (None
    without extras): per-program partials reduced in a fixed order, both in one launch."""
    M, C = x.shape
    CE = extras[0].shape[1] if extras else 0
    width = 2 * C + len(extras) * CE
    dx = x.new_empty((M, C))
    if M == 0:
        dext = x.new_zeros((width - 2 * C,), dtype=extras_dtype) if extras else None
        return dx, x.new_zeros((2 * C,), dtype=torch.float32), dext
    block_m, _, num_warps = _row_tiles(max(C, CE), 2048)  # rows of both tiles fit registers
    block_c = next_pow2(max(C, 16))
    P = triton.cdiv(M, block_m)
    part = x.new_empty((P, width), dtype=torch.float32)
    e = list(extras) + [None] * (3 - len(extras))
    es = [(t.stride(0), t.stride(1)) if t is not None else (0, 0) for t in e]
    launch(
        _cls_norm_bwd_kernel, (P,),
        x, x.stride(0), x.stride(1), dy, dy.stride(0), dy.stride(1), weight, bias,
        res, *((res.stride(0), res.stride(1)) if res is not None else (0, 0)),
        pre, pre.shape[1] if pre is not None else 0,
        e[0], *es[0], e[1], *es[1], e[2], *es[2],
        dx, part, M, C, CE, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, GELU=gelu, HAS_RES=res is not None,
        HAS_PRE=pre is not None, NUM_E=len(extras), BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_E=next_pow2(max(CE, 16)), num_warps=num_warps,
    )  # fmt: skip
    rest = part[:, 2 * C :] if extras else None  # P <= M / BLOCK_M rows; a fixed-order sum
    dnorm, dext = finish_sums((part[:, : 2 * C], torch.float32), (rest, extras_dtype))
    return dx, dnorm, dext


# -- registered ops ------------------------------------------------------------------------------


@register_op("crossvit_fast::layer_norm")
def _layer_norm_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = LN(x) in out_dtype, fp32 row statistics saved for backward."""
    return layer_norm_fwd(x, weight, bias, eps, out_dtype)


@register_op("crossvit_fast::layer_norm_backward")
def _layer_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    need_dw: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dnorm): dnorm the requested rows of [dweight; dbias] (`layer_norm_bwd`), empty
    when neither is requested (or the parameters are None)."""
    dx, dnorm, _ = layer_norm_bwd(x, weight, bias, mean, rstd, dy, None, need_dw, need_db)
    return dx, dnorm if dnorm is not None else empty(x)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients of mean / rstd (never read)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dx, dnorm = torch.ops.crossvit_fast.layer_norm_backward(
        dy, x, weight, bias, mean, rstd, need_dw, need_db
    )
    return dx, *split_norm_grads(dnorm, need_dw, need_db), None, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# -- functional ----------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim (reference signature).

    x: (..., C), fp32 / fp16 / bf16, any strides, C <= 16384; weight, bias: (C,) or None.
    Output dtype as F.layer_norm: x's dtype, or fp32 under CUDA autocast (its fp32 op list).
    Statistics and the normalisation are fp32 in every case."""
    check_tensor("x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"x: expected shape (..., C) with C >= 1, got {tuple(x.shape)}")
    C = x.shape[-1]
    if C > MAX_WIDTH:
        raise ValueError(f"x: the Triton layer_norm supports C <= {MAX_WIDTH}, got C = {C}")
    check_tensor("weight", weight, shape=(C,), like=x, optional=True)
    check_tensor("bias", bias, shape=(C,), like=x, optional=True)
    check_param_dtype(x, weight=weight, bias=bias)
    out_dtype = layer_norm_out_dtype(x)
    return torch.ops.crossvit_fast.layer_norm(x, weight, bias, float(eps), out_dtype)[0]


OPS = {"layer_norm": layer_norm}


# -- cost formulas (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` --------


from .utils import esize, register_cost  # noqa: E402


@register_cost("_layer_norm_fwd_kernel")
def _cost_layer_norm_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    M, C, P = a["M"], a["C"], grid[0]
    b = M * C * esize(a["x_ptr"]) + 8 * M  # x once; fp32 mean, rstd
    b += P * C * (esize(a["w_ptr"]) * meta["HAS_W"] + esize(a["b_ptr"]) * meta["HAS_B"])
    b += M * C * esize(a["y_ptr"]) * meta["STORE_Y"]
    return b, 0


@register_cost("_layer_norm_bwd_kernel")
def _cost_layer_norm_bwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    M, C, P = a["M"], a["C"], grid[0]
    per_row = esize(a["x_ptr"]) + esize(a["dy_ptr"]) + esize(a["dx_ptr"])
    per_row += esize(a["dres_ptr"]) * meta["HAS_DRES"] + esize(a["y_ptr"]) * meta["STORE_Y"]
    b = M * C * per_row + 8 * M  # + mean, rstd
    b += P * C * (esize(a["w_ptr"]) * meta["HAS_W"] + esize(a["b_ptr"]) * meta["HAS_B"])
    b += P * C * 4 * (meta["STORE_DW"] + meta["STORE_DB"])  # fp32 partial rows
    return b, 0


@register_cost("_cls_norm_fwd_kernel")
def _cost_cls_norm_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    M, C, P = a["M"], a["C"], grid[0]
    b = M * C * (esize(a["x_ptr"]) + esize(a["y_ptr"]))
    b += P * C * (esize(a["w_ptr"]) * meta["HAS_W"] + esize(a["b_ptr"]) * meta["HAS_B"])
    if meta["HAS_R"]:
        b += M * C * esize(a["r_ptr"]) + P * C * esize(a["add_ptr"]) * meta["HAS_ADD"]
    return b, 0


@register_cost("_cls_norm_bwd_kernel")
def _cost_cls_norm_bwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    M, C, CE, P = a["M"], a["C"], a["CE"], grid[0]
    b = M * C * (esize(a["x_ptr"]) + esize(a["dy_ptr"]) + esize(a["dx_ptr"]))
    b += P * C * esize(a["w_ptr"]) * meta["HAS_W"]
    b += P * C * esize(a["b_ptr"]) * (meta["GELU"] and meta["HAS_B"])
    b += M * C * esize(a["res_ptr"]) * meta["HAS_RES"]
    b += 2 * a["S"] * M * C * 4 * meta["HAS_PRE"]
    b += P * 2 * C * 4
    for i in range(meta["NUM_E"]):
        b += M * CE * esize(a[f"e{i}_ptr"]) + P * CE * 4
    return b, 0
