"""The token pass of `cross_attention` (crossvit_fast.ops.triton.cross_attention): its row access
(device functions its forward and backward kernels share) and its tile / split plan.

The attended sequence of sample b is rows r = 0..N: row 0 is the CLS row (cls[b]), rows 1..N are
tokens[b, 1..N] read in place. Every tile is BLOCK_N rows x BLOCK_C columns of it, never a whole
row: widths up to 1024 stream through in BLOCK_C-wide chunks, so the live registers are a few
(BLOCK_N x BLOCK_C) and (BLOCK_H x BLOCK_C) tiles at any width and dtype (no spills).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import sm_count

__all__ = ["head_chunk", "mm", "normed_chunk", "row_stats", "split_plan", "token_tiles"]

_MIN_BLOCKS_PER_SPLIT = 2  # a split must amortise loading k~ and writing its (H x C) partial


# -- device functions ------------------------------------------------------------------------------


@triton.jit
def mm(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b, fp32 accumulation; PRECISION: tl.dot's input precision (`utils.dot_flags`)."""
    return tl.dot(a, b, acc, input_precision=PRECISION)


# -- row access ------------------------------------------------------------------------------------


@triton.jit
def row_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn, stride_tc, b, rows,
               mask_r, c0, C, BLOCK_C: tl.constexpr):  # fmt: skip
    """Columns c0 .. c0 + BLOCK_C of rows `rows` of sample b's sequence, fp32, masked 0.
    Returns (x, cols, mask_c)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    p_tok = (
        tok_ptr + b * stride_tb + rows.to(tl.int64)[:, None] * stride_tn + cols[None, :] * stride_tc
    )
    p_cls = cls_ptr + b * stride_cb + rows[:, None] * 0 + cols[None, :] * stride_cc
    mask = mask_r[:, None] & mask_c[None, :]
    is_cls = (rows == 0)[:, None]
    # two predicated loads, not one select of pointers: cls and tokens may differ in dtype
    x = tl.load(p_tok, mask=mask & ~is_cls, other=0.0).to(tl.float32)
    x += tl.load(p_cls, mask=mask & is_cls, other=0.0).to(tl.float32)
    return x, cols, mask_c


@triton.jit
def row_stats(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn, stride_tc, b, rows,
               mask_r, C, eps, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """LayerNorm (mean, rstd) of BLOCK_N rows, fp32: two passes over the chunks (mean, then the
    centred sum of squares: biased variance, as F.layer_norm). The second pass re-reads the
    block from L1 / L2, not DRAM (it was loaded a moment ago by the same program)."""
    s1 = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x, _, _ = row_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn,
                             stride_tc, b, rows, mask_r, c0, C, BLOCK_C)  # fmt: skip
        s1 += tl.sum(x, axis=1)
    mean = s1 / C
    s2 = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        x, _, mask_c = row_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn,
                                  stride_tc, b, rows, mask_r, c0, C, BLOCK_C)  # fmt: skip
        xc = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
        s2 += tl.sum(xc * xc, axis=1)
    return mean, 1.0 / tl.sqrt(s2 / C + eps)


@triton.jit
def normed_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn, stride_tc, b,
                  rows, mask_r, c0, C, mean, rstd, w_ptr, HAS_W: tl.constexpr,
                  BLOCK_C: tl.constexpr):  # fmt: skip
    """(x^, y = x^ * gamma, cols, mask_c) of one chunk, fp32, masked 0."""
    x, cols, mask_c = row_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn,
                                 stride_tc, b, rows, mask_r, c0, C, BLOCK_C)  # fmt: skip
    xhat = tl.where(mask_c[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
    y = xhat
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return xhat, y, cols, mask_c


@triton.jit
def head_chunk(ptr, stride_h, heads, mask_h, cols, mask_c, EMULATE: tl.constexpr):
    """(BLOCK_H, BLOCK_C) chunk of a per-head (H, C) slab with unit column stride, in its own
    dtype (the dot dtype) — fp32 under the interpreter, whose 16-bit dots are wrong."""
    t = tl.load(ptr + heads[:, None] * stride_h + cols[None, :],
                mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
    if EMULATE:
        t = t.to(tl.float32)
    return t


# -- tile and split plan --------------------------------------------------------------------------


# Launch meta of the token pass, for every dtype and width: 32-row blocks (tl.dot needs >= 16),
# 64-column chunks, 8 warps, no software pipelining. sm_90 (Triton 3.8, ptxas): forward 64
# registers, backward 101 (16-bit) / 150 (fp32), zero spills; with 4 warps, or Triton's 2-stage
# pipelining, the backward spilled 16-488 bytes (tests/test_toolchain_triton.py checks this).
# The interpreter runs the same tiles.
_TOKEN_TILES = {"BLOCK_N": 32, "BLOCK_C": 64, "num_warps": 8, "num_stages": 1}


def token_tiles(dt: torch.dtype) -> dict:
    """Launch meta of the token pass (one table for every dtype, see `_TOKEN_TILES`)."""
    return dict(_TOKEN_TILES)


def split_plan(B: int, N1: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(S splits over the N1 = 1 + N rows, rows per split). One sample is one program unless the
    batch alone cannot fill the GPU (B < #SMs): then each sample's rows are split over up to
    2 * #SMs / B programs (flash-decoding), each of at least _MIN_BLOCKS_PER_SPLIT blocks."""
    n_blocks = triton.cdiv(N1, block_n)
    sms = sm_count(device)
    splits = 1
    if sms > B:
        splits = max(1, min(triton.cdiv(2 * sms, max(B, 1)), n_blocks // _MIN_BLOCKS_PER_SPLIT))
    rows = triton.cdiv(n_blocks, splits) * block_n
    return triton.cdiv(N1, rows), rows
