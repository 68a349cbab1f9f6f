"""LayerNorm in Triton — the `layer_norm` op (the final norms) — and the LayerNorm kernels the
fused ops reuse: `mlp` and `self_attention` apply LayerNorm inside their GEMMs from the row
statistics computed here, and run the backward kernel below on the GEMM's input gradient.

Ladder: `_layer_norm_fwd_kernel` / `_layer_norm_bwd_kernel` -> launchers `layer_norm_fwd` /
`layer_norm_bwd` -> ops `crossvit_fast::layer_norm` / `crossvit_fast::layer_norm_backward`
(autograd registered on the first) -> functional `layer_norm` (reference signature).

This module also holds the small launch / registration helpers every kernel module of this
issue uses (`register_op`, `launch`, `round_to`, ...).

Memory plan. Forward: one read of x, one write of y and of the fp32 (mean, rstd) per row
(8 bytes a row, saved for backward). Backward: one read of x and dy, one write of dx; the
weight / bias gradients are reduced per program into fp32 partial rows (`G x C`, G ~ 4 x SMs)
that one small `sum(0)` finishes — deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import autocast_dtype, check_tensor
from .utils import device_guard, dot_in_fp32, launch, next_pow2, register_op, sm_count

__all__ = ["OPS", "layer_norm", "layer_norm_bwd", "layer_norm_fwd"]

# One row must fit in one program's registers (CrossViT widths are <= 768).
MAX_WIDTH = 16384


# -- helpers shared by the kernel modules of this backend ----------------------------------------


def on_device(t: Tensor):
    """Launch on t's CUDA device (multi-GPU); see `utils.device_guard`."""
    return device_guard(t.device)


def program_slots(device: torch.device) -> int:
    """How many programs a persistent-style reduction grid should use on `device`."""
    return 4 * sm_count(device)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The GEMM dtype timm would use for x: the autocast dtype when autocast is on, else x's."""
    return autocast_dtype(x.device.type) or x.dtype


def layer_norm_out_dtype(x: Tensor) -> torch.dtype:
    """F.layer_norm's output dtype for x: autocast runs layer_norm in fp32 on CUDA (ATen's fp32
    autocast list) but leaves it alone on CPU (the CPU policy has no layer_norm entry)."""
    if x.device.type != "cpu" and autocast_dtype(x.device.type) is not None:
        return torch.float32
    return x.dtype


def check_same_device(**tensors) -> None:
    ref = None
    for name, t in tensors.items():
        if t is None:
            continue
        if ref is None:
            ref = t
        elif t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device}, got {t.device}")


def check_param_dtype(x: Tensor, **params) -> None:
    """Without autocast, timm's modules require every parameter in x's dtype (F.linear /
    F.layer_norm refuse mixed dtypes); under autocast any float dtype is cast like autocast does."""
    if autocast_dtype(x.device.type) is not None:
        return
    for name, t in params.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(
                f"{name}: expected dtype {x.dtype} (x's dtype, no autocast), got {t.dtype}"
            )


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """Cast fp32 `x` to `dtype` rounding to nearest even, as the GPU (and PyTorch) do. The CPU
    interpreter truncates fp32 -> bf16, so there (EMULATE) the rounding is done on the bits."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# -- kernels -------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, C, stride_xm, stride_xc, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_Y: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """BLOCK_M whole rows per program: fp32 mean / rstd (two-pass in registers, exact like
    PyTorch's Welford) and, with STORE_Y, y = (x - mean) * rstd * w + b in y's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(
        x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0
    )
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    if STORE_Y:
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = round_to(y, y_ptr.dtype.element_ty, EMULATE)
        tl.store(y_ptr + rows64[:, None] * stride_ym + cols[None, :], y, mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, dy_ptr, dres_ptr, dx_ptr, y_ptr, dw_ptr, db_ptr,
    M, C, rows_per_prog,
    stride_xm, stride_xc, stride_dym, stride_dyc, stride_rm, stride_rc, stride_dxm, stride_ym,
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
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0
        )
        dy = tl.load(
            dy_ptr + rows64[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask, other=0.0
        )
        dy = dy.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(g * xhat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dres = tl.load(
                dres_ptr + rows64[:, None] * stride_rm + cols[None, :] * stride_rc,
                mask=mask,
                other=0.0,
            )
            dx += dres.to(tl.float32)
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
        tl.store(dw_ptr + pid * C + cols, dw_acc, mask=cmask)
    if STORE_DB:
        tl.store(db_ptr + pid * C + cols, db_acc, mask=cmask)


# -- launchers -----------------------------------------------------------------------------------


def _row_block(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_M, num_warps): ~4K fp32 values per program keeps registers in budget."""
    block_c = next_pow2(C)
    block_m = max(1, min(16, 4096 // block_c))
    return block_c, block_m, 4 if block_m * block_c <= 4096 else 8


def as_rows(t: Tensor) -> Tensor:
    """(..., C) -> (M, C) without a copy when the leading dims merge (any strides are fine for
    the kernels); a copy only when they cannot be viewed as one dim."""
    return t.reshape(-1, t.shape[-1])


def layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    y_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor, Tensor]:  # fmt: skip
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
    y2 = y.view(M, C) if y is not None else mean  # dummy pointer when not stored
    with on_device(x):
        launch(
            _layer_norm_fwd_kernel, (triton.cdiv(M, block_m),),
            x2, weight, bias, y2, mean, rstd, M, C, x2.stride(0), x2.stride(1), C, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, STORE_Y=y is not None,
            EMULATE=dot_in_fp32(), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
        )  # fmt: skip
    return y, mean, rstd


def layer_norm_bwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
    dy: Tensor, dres: Tensor | None, need_dw: bool, need_db: bool,
    y_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Gradient of y = LN(x) (+ a residual gradient `dres`, same shape as x, added to dx).

    x, dy, dres: (..., C), any strides / float dtypes. Returns (dx in x's dtype, dweight,
    dbias (fp32 sums in the parameter's dtype, None unless requested), y re-emitted in
    `y_dtype` when given (for a following weight-gradient GEMM), else None)."""
    C = x.shape[-1]
    x2, dy2 = as_rows(x), as_rows(dy)
    M = x2.shape[0]
    dres2 = as_rows(dres) if dres is not None else None
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    y = None if y_dtype is None else torch.empty(x.shape, device=x.device, dtype=y_dtype)
    block_c, block_m, warps = _row_block(C)
    rows_per_prog = block_m * triton.cdiv(triton.cdiv(max(M, 1), block_m), program_slots(x.device))
    grid = triton.cdiv(M, rows_per_prog)
    need_dw = need_dw and weight is not None
    need_db = need_db and bias is not None
    # Partial sums: every program writes its row, so empty (not zeros) is enough.
    dw_part = torch.empty((grid, C), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.empty((grid, C), device=x.device, dtype=torch.float32) if need_db else None
    if M > 0:
        with on_device(x):
            launch(
                _layer_norm_bwd_kernel, (grid,),
                x2, weight, bias, mean, rstd, dy2, dres2, dx.view(M, C),
                y.view(M, C) if y is not None else dx, dw_part, db_part,
                M, C, rows_per_prog, x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1),
                dres2.stride(0) if dres2 is not None else 0,
                dres2.stride(1) if dres2 is not None else 0, C, C,
                HAS_W=weight is not None, HAS_B=bias is not None, HAS_DRES=dres2 is not None,
                STORE_Y=y is not None, STORE_DW=need_dw, STORE_DB=need_db, EMULATE=dot_in_fp32(),
                BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
            )  # fmt: skip
    dw = dw_part.sum(0).to(weight.dtype) if need_dw else None
    db = db_part.sum(0).to(bias.dtype) if need_db else None
    return dx, dw, db, y


# -- registered ops ------------------------------------------------------------------------------


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


@register_op("crossvit_fast::layer_norm")
def _layer_norm_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y = LN(x) in out_dtype, fp32 row statistics saved for backward."""
    y, mean, rstd = layer_norm_fwd(x, weight, bias, eps, out_dtype)
    return y, mean, rstd


@register_op("crossvit_fast::layer_norm_backward")
def _layer_norm_backward_op(
    dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
    rstd: Tensor, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dx, dweight, dbias); a gradient not requested (or of a None parameter) is empty."""
    dx, dw, db, _ = layer_norm_bwd(x, weight, bias, mean, rstd, dy, None, need_dw, need_db)
    return dx, dw if dw is not None else _empty(x), db if db is not None else _empty(x)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.crossvit_fast.layer_norm_backward(
        dy, x, weight, bias, mean, rstd, need_dw, need_db
    )
    return dx, dw if need_dw else None, db if need_db else None, None, None


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
    return torch.ops.crossvit_fast.layer_norm(x, weight, bias, float(eps), layer_norm_out_dtype(x))[
        0
    ]


OPS = {"layer_norm": layer_norm}


# -- cost formulas (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` --------


from .utils import esize, register_cost  # noqa: E402


@register_cost("_layer_norm_fwd_kernel")
def _cost_layer_norm_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    M, C, P = a["M"], a["C"], grid[0]
    b = M * C * esize(a["x_ptr"]) + 8 * M  # x once; fp32 mean, rstd
    if meta["STORE_Y"]:
        b += M * C * esize(a["y_ptr"])
        b += P * C * (esize(a["w_ptr"]) * meta["HAS_W"] + esize(a["b_ptr"]) * meta["HAS_B"])
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
