"""The token pass of `cross_attention` (crossvit_fast.ops.triton.cross_attention): its row access
(device functions its forward and backward kernels share), its tile / split plan, the limits its
inputs must meet (`check_args`), and the cost formulas of its kernels (bytes and FLOPs per
launch, for `crossvit_fast.cost`).

The attended sequence of sample b is rows r = 0..N: row 0 is the CLS row (cls[b]), rows 1..N are
tokens[b, 1..N] read in place. Every tile is BLOCK_N rows x BLOCK_C columns of it, never a whole
row: widths up to 1024 stream through in BLOCK_C-wide chunks, so the live registers are a few
(BLOCK_N x BLOCK_C) and (BLOCK_H x BLOCK_C) tiles at any width and dtype (no spills).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...backends import CrossAttentionParams
from ..common import check_params, check_tensor
from .utils import cdiv, esize, register_cost, sm_count

__all__ = [
    "MAX_HEADS",
    "check_args",
    "gamma_chunk",
    "head_chunk",
    "mm",
    "normed_chunk",
    "row_span",
    "row_stats",
    "saved_stats",
    "split_plan",
    "token_tiles",
]

_MIN_BLOCKS_PER_SPLIT = 2  # a split must amortise loading k~ and writing its (H x C) partial


# -- input limits --------------------------------------------------------------------------------

MAX_HEADS = 16  # the head axis is padded to one 16-wide tensor-core tile
_HEAD_DIMS = (8, 128)
# The token pass works in width chunks at any C, but the CLS-row LayerNorm kernels hold whole rows
# in registers; the sm_90 toolchain tier checks them (zero spills) up to CrossViT's C = 768.
_GPU_MAX_WIDTH = 1024


def _check_heads(C: int, num_heads: int) -> None:
    if not isinstance(num_heads, int) or not 1 <= num_heads <= MAX_HEADS:
        raise ValueError(f"num_heads: expected an int in 1..{MAX_HEADS}, got {num_heads!r}")
    if C % num_heads:
        raise ValueError(f"width C={C} is not divisible by num_heads={num_heads}")
    d = C // num_heads
    if not _HEAD_DIMS[0] <= d <= _HEAD_DIMS[1]:
        raise ValueError(
            f"head dim C / num_heads = {d}: expected {_HEAD_DIMS[0]}..{_HEAD_DIMS[1]} "
            f"(C={C}, num_heads={num_heads})"
        )


def check_args(cls, tokens, params: CrossAttentionParams, num_heads: int) -> None:
    """`cross_attention`'s argument checks (shapes, dtypes, devices, head layout, GPU width):
    a ValueError that names what was expected and what came."""
    check_tensor("cls", cls, ndim=2)
    B, C = cls.shape
    check_tensor("tokens", tokens, ndim=3, like=cls)
    if tokens.shape[0] != B or tokens.shape[2] != C or tokens.shape[1] < 1:
        raise ValueError(
            f"tokens: expected shape ({B}, 1 + N, {C}) with N >= 0 (row 0 is ignored), "
            f"got {tuple(tokens.shape)}"
        )
    _check_heads(C, num_heads)
    if cls.device.type == "cuda" and C > _GPU_MAX_WIDTH:
        raise ValueError(
            f"width C={C}: the GPU kernels keep whole CLS rows in registers and support "
            f"C <= {_GPU_MAX_WIDTH} (CrossViT's widths are <= 768)"
        )
    check_params(params, cls, (C,), (C,), *[(C, C), (C,)] * 4)  # the norm, then wq .. proj_bias


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
def row_span(r0, end, BLOCK_N: tl.constexpr):
    """Token rows [r0, r0 + BLOCK_N) of a program's span ending at `end`, and their mask."""
    rows = r0 + tl.arange(0, BLOCK_N)
    return rows, rows < end


@triton.jit
def saved_stats(mean_ptr, rstd_ptr, b, N1, rows, mask_r):
    """The (mean, rstd) of rows `rows` that forward phase 1 stored ((B, N1) fp32 each)."""
    mean = tl.load(mean_ptr + b * N1 + rows, mask=mask_r, other=0.0)
    rstd = tl.load(rstd_ptr + b * N1 + rows, mask=mask_r, other=0.0)
    return mean, rstd


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
        y = y * gamma_chunk(w_ptr, cols, mask_c, HAS_W, BLOCK_C)[None, :]
    return xhat, y, cols, mask_c


@triton.jit
def gamma_chunk(w_ptr, cols, mask_c, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """The LayerNorm weight at `cols`, fp32 (ones without an affine weight)."""
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    return w


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
# registers, backward 103 (16-bit) / 182 (AMP: fp32 tokens) / 128 (fp32, 32-column chunks:
# `token_tiles`), zero spills; with 4
# warps, or Triton's 2-stage pipelining, the backward spilled 16-488 bytes. ptxas is sensitive
# here: hoisting the backward's per-head constants loop into a helper spilled 36 bytes in fp32.
# tests/test_toolchain_triton.py checks zero spills. The interpreter runs the same tiles.
_TOKEN_TILES = {"BLOCK_N": 32, "BLOCK_C": 64, "num_warps": 8, "num_stages": 1}


def token_tiles(dt: torch.dtype, backward: bool = False) -> dict:
    """Launch meta of the token pass (one table for every dtype, see `_TOKEN_TILES`), but the
    all-fp32 backward runs 32-column chunks: with fusion_stage's summed-in gradient (HAS_DRES)
    its extra tile spilled 36 bytes at 64, and both of its variants keep one chunking so that
    their reductions round alike (16-bit and AMP keep 64)."""
    if backward and dt == torch.float32:
        return {**_TOKEN_TILES, "BLOCK_C": 32}
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


# -- cost formulas (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` --------


def _token_pass_splits(a: dict, grid: tuple):
    """(rows R, holds the CLS row 0) of each split's row range."""
    N1, rps = a["N1"], a["rows_per_split"]
    for s in range(grid[1]):
        start = s * rps
        yield max(0, min(start + rps, N1) - start), start == 0


def _row_pass(a: dict, R: int, has_cls: bool) -> int:
    """Bytes of one read of rows (tokens in place, row 0 from cls) over the whole width."""
    return a["C"] * ((R - has_cls) * esize(a["tok_ptr"]) + has_cls * esize(a["cls_ptr"]))


@register_cost("_cross_attention_fwd_kernel")
def _cost_cross_attention_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    """Per program: phase 1 reads its rows 3x (two statistics passes, then the logits), phase 2
    once more (L2 serves the repeats of a program's own rows); k~ once per row block."""
    B, C, H, BH = grid[0], a["C"], a["H"], meta["BLOCK_H"]
    bn, n_c = meta["BLOCK_N"], cdiv(C, meta["BLOCK_C"])
    ew = esize(a["w_ptr"]) * meta["HAS_W"]
    total = flops = dram = 0
    for R, has_cls in _token_pass_splits(a, grid):
        nb = cdiv(R, bn)
        b = 4 * _row_pass(a, R, has_cls) + 2 * nb * C * ew + nb * H * C * esize(a["kt_ptr"])
        b += 8 * R + 4 * BH * R  # statistics, logits (stored)
        b += n_c * (8 * R + 4 * BH * R)  # phase 2 re-reads them per width chunk
        if meta["SINGLE"]:
            b += H * C * (esize(a["ut_ptr"]) + esize(a["u_ptr"])) + 4 * BH
            b += C * esize(a["b_ptr"]) * meta["HAS_B"]
        else:
            b += H * C * esize(a["acc_ptr"]) + 8 * BH
        total += B * b
        # DRAM: the program's own rows and k~ once (the repeats come from L1 / L2)
        l2 = 3 * _row_pass(a, R, has_cls) + (nb - 1) * H * C * esize(a["kt_ptr"])
        dram += B * (b - l2)
        flops += B * 4 * BH * R * C  # logits + weighted sum (on the padded head tile)
    return total, flops, dram


@register_cost("_cross_attention_merge_kernel")
def _cost_cross_attention_merge(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    B, C, H, S, BH = grid[0], a["C"], a["H"], a["S"], meta["BLOCK_H"]
    b = S * (8 * BH * grid[1] + H * C * esize(a["acc_ptr"]))
    b += H * C * (esize(a["ut_ptr"]) + esize(a["u_ptr"])) + C * esize(a["b_ptr"]) * meta["HAS_B"]
    return B * (b + 4 * BH), 0


@register_cost("_cross_attention_bwd_kernel")
def _cost_cross_attention_bwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    """Per program: the per-head constants, phase 1 (rows once, k~ / du~ per row block), phase 2
    (rows once more, k~ / du~ once, the stored probabilities re-read per width chunk)."""
    B, C, H, BH = grid[0], a["C"], a["H"], meta["BLOCK_H"]
    bn, n_c = meta["BLOCK_N"], cdiv(C, meta["BLOCK_C"])
    ew = esize(a["w_ptr"]) * meta["HAS_W"]
    heads = H * C * (esize(a["kt_ptr"]) + esize(a["du_ptr"]))
    total = flops = dram = 0
    for R, has_cls in _token_pass_splits(a, grid):
        nb = cdiv(R, bn)
        b = heads + H * C * esize(a["ut_ptr"]) + C * ew + 4 * BH  # constants, lse
        b += 8 * R + _row_pass(a, R, has_cls) + nb * (C * ew + heads)  # phase 1
        b += 2 * 4 * BH * R + 8 * R  # p, dz, c1, c2 stored
        b += heads + C * ew  # phase 2
        b += n_c * (8 * R + 8 * R + 2 * 4 * BH * R)  # mean / rstd, c1 / c2, p / dz per chunk
        b += _row_pass(a, R, has_cls) + nb * C * ew
        b += R * C * esize(a["dtok_ptr"]) + has_cls * C * esize(a["dn0_ptr"])
        b += (R - has_cls) * C * esize(a["dres_ptr"]) * meta["HAS_DRES"]
        b += H * C * esize(a["dkt_ptr"]) + 2 * C * 4
        total += B * b
        dram += B * (b - _row_pass(a, R, has_cls) - nb * heads)  # repeats served by L2
        flops += B * 10 * BH * R * C  # z, da, dn (2), dk~ on the padded head tile
    return total, flops, dram
