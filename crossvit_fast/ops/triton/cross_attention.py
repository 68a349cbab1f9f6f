"""CrossViT's CLS cross-attention in Triton, K/V-free (weight absorption), forward and backward.

Spec: `crossvit_fast.ops.reference.cross_attention`; derivation: docs/cls_cross_attention.md.
One CLS query per sample attends over itself and the other branch's patch tokens. Because there is
a single query, the key and value projections move to the query side:

    k~_h = W_k,h^T q_h        z_hn = s k~_h . LN(x_n)        u_h = sum_n softmax_n(z_hn) LN(x_n)
    o_h  = W_v,h u_h + b_v,h  out  = cls + W_o o + b_o

so K and V (2 N C^2 MACs per sample) never exist and the op reads each token row once.

Memory plan, per sample b. LN(cls) -> q -> k~ are (B, C) / (H, B, C) GEMMs (cuBLAS, see
`_cross_attention_op`). The token pass streams the 1 + N attended rows (the CLS row, then
tokens[b, 1:] read in place) in blocks of BLOCK_N rows, and each block's width in BLOCK_C = 64
column chunks: no tile ever holds a whole row or a whole (heads x C) accumulator, so the working
set is the same at every width and dtype (sm_90: 64-150 registers, zero spills; checked by
tests/test_toolchain_triton.py). The price is a second read of the rows, in two phases of one
program:
  forward phase 1: LayerNorm statistics (chunked two-pass), logits z = k~ y^T (tensor cores,
  heads padded to 16), the softmax max / sum; z (64 B a row, fp32) and the statistics (8 B a
  row) go to a small scratch. Phase 2, per width chunk: u~ += exp2(z - max) y over the same
  rows. The token rows are read twice (2 x 2C bytes a row in 16-bit), the second time right after
  the first by the same program, so mostly from L2; the scratch adds 72 B a row (< 10% at
  C >= 384). Partials of several splits are merged flash-decoding style
  (`_cross_attention_merge_kernel`, one program per (sample, width chunk)).
  LayerNorm's beta and the key bias shift every logit of a head by the same constant, so both
  are dropped from z (softmax is shift invariant; db_k is exactly 0) and beta is added to u once.
  Saved for backward: LN(cls), q, k~, u and u~ = u - beta (H x C per sample, not N x C), o, the
  base-2 log-sum-exp and the rows' LayerNorm statistics (8 B a row).

Backward recomputes the softmax weights from the log-sum-exp (flash-attention style), with the
same two phases: phase 1 computes per row the weights a, dz and the two row means LayerNorm's
backward needs (they reduce to per-head dot products, see `_cross_attention_bwd_kernel`; 136 B a
row of scratch), phase 2 per width chunk writes d tokens once and the per-program partials of
dk~, dgamma, dbeta, which are reduced in a fixed order (deterministic: no float atomics). The CLS
row finishes last (`cls_norm_bwd`, crossvit_fast.ops.triton.layer_norm): its LayerNorm gradient
needs dq, which needs the complete dk~.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...backends import CrossAttentionParams, as_params
from ..common import cast, compute_dtype
from .cross_attention_rows import (
    MAX_HEADS,
    check_args,
    gamma_chunk,
    head_chunk,
    mm,
    normed_chunk,
    row_span,
    row_stats,
    saved_stats,
    split_plan,
    token_tiles,
)
from .layer_norm import cls_norm_bwd, cls_norm_fwd
from .utils import dot_flags, input_grads, launch, register_op

__all__ = ["OPS", "cross_attention"]

_LOG2E = 1.0 / math.log(2.0)  # exp(z) = exp2(z * log2(e)): the kernels work in base 2


# -- the token pass: forward ------------------------------------------------------------------------


@triton.jit
def _cross_attention_fwd_kernel(
    cls_ptr, stride_cb, stride_cc,  # (B, C): row 0 of the attended sequence
    tok_ptr, stride_tb, stride_tn, stride_tc,  # (B, 1 + N, C): rows 1..N are read in place
    kt_ptr, stride_kh, stride_kb,  # k~ (H, B, C), unit column stride, dot dtype
    w_ptr, b_ptr,  # norm1 affine (C,)
    z_ptr, mean_ptr, rstd_ptr,  # (B, BLOCK_H, 1 + N) logits (scratch), (B, 1 + N) LN statistics
    u_ptr, ut_ptr, lse_ptr,  # SINGLE: u, u~ (B, H, C), lse (B, BLOCK_H)
    m_ptr, l_ptr, acc_ptr,  # else partials (B, S, BLOCK_H) x2, (B, S, H, C) fp32
    N1, C, H, rows_per_split, eps, qk_scale,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SINGLE: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B, S): program (b, s) attends over rows s*R .. (s+1)*R - 1 of the N1 = 1 + N rows
    (R = rows_per_split).

    Phase 1, per row block: LayerNorm statistics (stored: backward reuses them), the logits
    z = k~ . y^T accumulated chunk by chunk over the width (stored, fp32 (BLOCK_H x rows): 64
    bytes a row), and the softmax max / sum of every head over the program's rows.
    Phase 2, per width chunk: u~_chunk = sum_rows exp2(z - max) y_chunk over the same rows,
    re-read from L2 (this program read them a moment ago) and the stored logits.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    kt_b = kt_ptr + b * stride_kb
    start = s * rows_per_split
    end = tl.minimum(start + rows_per_split, N1)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows, mask_r = row_span(r0, end, BLOCK_N)
        mean, rstd = row_stats(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb, stride_tn,
                                stride_tc, b, rows, mask_r, C, eps, BLOCK_N, BLOCK_C)  # fmt: skip
        tl.store(mean_ptr + b * N1 + rows, mean, mask=mask_r)
        tl.store(rstd_ptr + b * N1 + rows, rstd, mask=mask_r)
        z = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            _, y, cols, mask_c = normed_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb,
                                               stride_tn, stride_tc, b, rows, mask_r, c0, C, mean,
                                               rstd, w_ptr, HAS_W, BLOCK_C)  # fmt: skip
            kt = head_chunk(kt_b, stride_kh, heads, mask_h, cols, mask_c, EMULATE)
            z = mm(kt, tl.trans(y.to(kt.dtype)), z, PRECISION)
        z = tl.where(mask_r[None, :], z * qk_scale, float("-inf"))  # base 2
        tl.store(
            z_ptr + (b * BLOCK_H + heads[:, None]) * N1 + rows[None, :], z, mask=mask_r[None, :]
        )
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), axis=1)
        m_i = m_new
    tl.debug_barrier()  # phase 2 reads what other threads of this program stored above
    S = tl.num_programs(1)
    dt = kt_ptr.dtype.element_ty  # the dot operand dtype (fp32 under the interpreter)
    if EMULATE:
        dt = tl.float32
    for c0 in range(0, C, BLOCK_C):
        acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        for r0 in range(start, end, BLOCK_N):
            rows, mask_r = row_span(r0, end, BLOCK_N)
            mean, rstd = saved_stats(mean_ptr, rstd_ptr, b, N1, rows, mask_r)
            _, y, cols, mask_c = normed_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb,
                                               stride_tn, stride_tc, b, rows, mask_r, c0, C, mean,
                                               rstd, w_ptr, HAS_W, BLOCK_C)  # fmt: skip
            z = tl.load(z_ptr + (b * BLOCK_H + heads[:, None]) * N1 + rows[None, :],
                        mask=mask_r[None, :], other=float("-inf"))  # fmt: skip
            p = tl.exp2(z - m_i[:, None])
            acc = mm(p.to(dt), y.to(dt), acc, PRECISION)
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = mask_h[:, None] & (cols < C)[None, :]
        if SINGLE:
            ut = acc / l_i[:, None]
            offs = (b * H + heads[:, None]) * C + cols[None, :]
            tl.store(ut_ptr + offs, ut, mask=mask)
            if HAS_B:  # sum_n a_hn = 1: beta passes through the average exactly
                ut += tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
            tl.store(u_ptr + offs, ut, mask=mask)
        else:
            offs = ((b * S + s) * H + heads[:, None]) * C + cols[None, :]
            tl.store(acc_ptr + offs, acc, mask=mask)
    if SINGLE:
        tl.store(lse_ptr + b * BLOCK_H + heads, m_i + tl.log2(l_i))
    else:
        ml = (b * S + s) * BLOCK_H + heads
        tl.store(m_ptr + ml, m_i)
        tl.store(l_ptr + ml, l_i)


@triton.jit
def _cross_attention_merge_kernel(
    m_ptr, l_ptr, acc_ptr, b_ptr, u_ptr, ut_ptr, lse_ptr, S, C, H,
    HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(C, BLOCK_C)): merge the S (max, sum, acc) partials of one sample's width
    chunk in split order (deterministic)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    mask = mask_h[:, None] & mask_c[None, :]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for s in range(S):
        ml = (b * S + s) * BLOCK_H + heads
        m_s = tl.load(m_ptr + ml)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        alpha_s = tl.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.load(l_ptr + ml) * alpha_s
        acc_s = tl.load(
            acc_ptr + ((b * S + s) * H + heads)[:, None] * C + cols[None, :], mask=mask, other=0.0
        )
        acc = acc * alpha[:, None] + acc_s * alpha_s[:, None]
        m_i = m_new
    ut = acc / l_i[:, None]
    offs = (b * H + heads[:, None]) * C + cols[None, :]
    tl.store(ut_ptr + offs, ut, mask=mask)
    if HAS_B:
        ut += tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(u_ptr + offs, ut, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + b * BLOCK_H + heads, m_i + tl.log2(l_i))


# -- the token pass: backward -----------------------------------------------------------------------


@triton.jit
def _cross_attention_bwd_kernel(
    cls_ptr, stride_cb, stride_cc,
    tok_ptr, stride_tb, stride_tn, stride_tc,
    kt_ptr, stride_kh, stride_kb,  # k~ (H, B, C)
    du_ptr, stride_duh, stride_dub,  # dL/du (H, B, C)
    ut_ptr, lse_ptr,  # u~ = u - beta (B, H, C) fp32, lse (B, BLOCK_H)
    mean_ptr, rstd_ptr,  # (B, 1 + N) LayerNorm statistics of the forward
    w_ptr,  # norm1 weight (C,); beta only enters through u~
    p_ptr, dz_ptr, c1_ptr, c2_ptr,  # scratch: (B, BLOCK_H, 1 + N) x2, (B, 1 + N) x2, fp32
    dtok_ptr, stride_db, stride_dn,  # (B, 1 + N, C), unit column stride
    dres_ptr, stride_rb, stride_rn, stride_rc,  # HAS_DRES: (B, 1 + N, C), added into rows 1..
    dn0_ptr,  # (B, C): the attention part of dL/dLN(cls), written by split 0
    dkt_ptr, stride_dks, stride_dkh, stride_dkb,  # (S, H, B, C) partials of dL/dk~
    part_ptr,  # (B, S, 2, C) fp32 partials of dgamma, dbeta over the token rows
    N1, C, H, rows_per_split, qk_scale, scale,
    HAS_W: tl.constexpr, HAS_DRES: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr, ONE_KEY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B, S), the forward's row ranges. HAS_DRES: d tokens = dres + this op's gradient
    in rows 1.. (the token gradient the tokens get elsewhere, summed as it is written).

    With y_n = LN(x_n) (no beta), a_hn = softmax_n(s k~_h . y_n), da_hn = du_h . y_n:
      dz_hn = a_hn (da_hn - delta_h),  delta_h = du_h . u~_h
      dn_n  = dL/dy_n = sum_h a_hn du_h + s dz_hn k~_h,     dk~_h = s sum_n dz_hn y_n
    and LayerNorm's backward dx_n = rstd_n (g_n - mean(g_n) - x^_n mean(g_n x^_n)), g = dn * gamma,
    whose two row means reduce to per-head dot products phase 1 already has:
      mean(g_n) = sum_h (a_hn (du_h . gamma) + s dz_hn (k~_h . gamma)) / C
      mean(g_n x^_n) = sum_h (a_hn da_hn + s dz_hn (k~_h . y_n)) / C.
    Phase 1, per row block (width in chunks): a and dz (stored, 128 bytes a row) and the two
    means. Phase 2, per width chunk over the same rows: dn, dx (written once), dk~ and
    dgamma / dbeta partials. Rows are read twice, the second time from L2.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    kt_b = kt_ptr + b * stride_kb
    du_b = du_ptr + b * stride_dub
    # per-head constants: delta_h = du_h . u~_h (the beta parts of da and u cancel in da - delta),
    # du_h . gamma, k~_h . gamma
    delta = tl.zeros([BLOCK_H], tl.float32)
    duw = tl.zeros([BLOCK_H], tl.float32)
    ktw = tl.zeros([BLOCK_H], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < C
        du = head_chunk(du_b, stride_duh, heads, mask_h, cols, mask_c, EMULATE).to(tl.float32)
        kt = head_chunk(kt_b, stride_kh, heads, mask_h, cols, mask_c, EMULATE).to(tl.float32)
        ut = tl.load(ut_ptr + (b * H + heads[:, None]) * C + cols[None, :],
                     mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        delta += tl.sum(du * ut, axis=1)
        w = gamma_chunk(w_ptr, cols, mask_c, HAS_W, BLOCK_C)
        duw += tl.sum(du * w[None, :], axis=1)
        ktw += tl.sum(kt * w[None, :], axis=1)
    lse = tl.load(lse_ptr + b * BLOCK_H + heads)
    start = s * rows_per_split
    end = tl.minimum(start + rows_per_split, N1)

    for r0 in range(start, end, BLOCK_N):  # phase 1
        rows, mask_r = row_span(r0, end, BLOCK_N)
        mean, rstd = saved_stats(mean_ptr, rstd_ptr, b, N1, rows, mask_r)
        z = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        da = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            _, y, cols, mask_c = normed_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb,
                                               stride_tn, stride_tc, b, rows, mask_r, c0, C, mean,
                                               rstd, w_ptr, HAS_W, BLOCK_C)  # fmt: skip
            kt = head_chunk(kt_b, stride_kh, heads, mask_h, cols, mask_c, EMULATE)
            du = head_chunk(du_b, stride_duh, heads, mask_h, cols, mask_c, EMULATE)
            yt = tl.trans(y.to(kt.dtype))
            z = mm(kt, yt, z, PRECISION)
            da = mm(du, yt, da, PRECISION)
        p = tl.where(mask_r[None, :], tl.exp2(z * qk_scale - lse[:, None]), 0.0)
        dz = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
        if not ONE_KEY:  # (one key: a = 1 is constant, dz = 0 exactly, not rounding noise)
            dz = p * (da - delta[:, None])
        c1 = tl.sum(p * duw[:, None] + scale * dz * ktw[:, None], axis=0) / C
        c2 = tl.sum(p * da + scale * dz * z, axis=0) / C
        offs = (b * BLOCK_H + heads[:, None]) * N1 + rows[None, :]
        tl.store(p_ptr + offs, p, mask=mask_r[None, :])
        tl.store(dz_ptr + offs, dz, mask=mask_r[None, :])
        tl.store(c1_ptr + b * N1 + rows, c1, mask=mask_r)
        tl.store(c2_ptr + b * N1 + rows, c2, mask=mask_r)
    tl.debug_barrier()  # phase 2 reads what other threads of this program stored above

    for c0 in range(0, C, BLOCK_C):  # phase 2
        cols = c0 + tl.arange(0, BLOCK_C)
        mask_c = cols < C
        kt = head_chunk(kt_b, stride_kh, heads, mask_h, cols, mask_c, EMULATE)
        du = head_chunk(du_b, stride_duh, heads, mask_h, cols, mask_c, EMULATE)
        w = gamma_chunk(w_ptr, cols, mask_c, HAS_W, BLOCK_C)
        dkt = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
        dw = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        for r0 in range(start, end, BLOCK_N):
            rows, mask_r = row_span(r0, end, BLOCK_N)
            mean, rstd = saved_stats(mean_ptr, rstd_ptr, b, N1, rows, mask_r)
            xhat, y, _, _ = normed_chunk(cls_ptr, stride_cb, stride_cc, tok_ptr, stride_tb,
                                          stride_tn, stride_tc, b, rows, mask_r, c0, C, mean,
                                          rstd, w_ptr, HAS_W, BLOCK_C)  # fmt: skip
            offs = (b * BLOCK_H + heads[:, None]) * N1 + rows[None, :]
            p = tl.load(p_ptr + offs, mask=mask_r[None, :], other=0.0)
            dz = tl.load(dz_ptr + offs, mask=mask_r[None, :], other=0.0)
            dn = mm(
                tl.trans(p).to(kt.dtype), du, tl.zeros([BLOCK_N, BLOCK_C], tl.float32), PRECISION
            )
            dn = mm(tl.trans(dz * scale).to(kt.dtype), kt, dn, PRECISION)
            dkt = mm(dz.to(kt.dtype), y.to(kt.dtype), dkt, PRECISION)
            c1 = tl.load(c1_ptr + b * N1 + rows, mask=mask_r, other=0.0)
            c2 = tl.load(c2_ptr + b * N1 + rows, mask=mask_r, other=0.0)
            dx = rstd[:, None] * (dn * w[None, :] - c1[:, None] - xhat * c2[:, None])
            mask = mask_r[:, None] & mask_c[None, :]
            is_cls = (rows == 0)[:, None]
            # row 0 of tokens (the other branch's own CLS) is not attended: zero gradient; the
            # CLS row's LayerNorm backward waits for dq (cls_norm_bwd), so it gets dn itself
            dx = tl.where(is_cls, 0.0, dx)
            if HAS_DRES:
                dx += tl.load(dres_ptr + b * stride_rb + rows.to(tl.int64)[:, None] * stride_rn
                              + cols[None, :] * stride_rc, mask=mask & ~is_cls,
                              other=0.0).to(tl.float32)  # fmt: skip
            tl.store(dtok_ptr + b * stride_db + rows.to(tl.int64)[:, None] * stride_dn
                     + cols[None, :], dx, mask=mask)  # fmt: skip
            tl.store(dn0_ptr + b * C + rows[:, None] * 0 + cols[None, :], dn, mask=mask & is_cls)
            tok_dn = tl.where(is_cls, 0.0, dn)  # masked rows have dn = 0 and x^ = 0
            dw += tl.sum(tok_dn * xhat, axis=0)
            db += tl.sum(tok_dn, axis=0)
        offs = s * stride_dks + heads[:, None] * stride_dkh + b * stride_dkb + cols[None, :]
        tl.store(dkt_ptr + offs, dkt * scale, mask=mask_h[:, None] & mask_c[None, :])
        part = part_ptr + (b * S + s) * 2 * C
        tl.store(part + cols, dw, mask=mask_c)
        tl.store(part + C + cols, db, mask=mask_c)


# -- launchers ----------------------------------------------------------------------------------


def _head_view(t: Tensor, H: int) -> Tensor:
    """(B, C) -> (H, B, d) view, the batched-GEMM layout of per-head slabs."""
    return t.view(t.shape[0], H, t.shape[1] // H).transpose(0, 1)


def _merge_heads(t: Tensor) -> Tensor:
    """(H, B, d) -> (B, H * d): a (B x C) copy, tiny next to the tokens. (Writing the batched
    GEMM straight into a strided view of the output with `out=` is what AOTAutograd cannot
    functionalise, so the GPU path would not trace under torch.compile.)"""
    return t.transpose(0, 1).reshape(t.shape[1], t.shape[0] * t.shape[2])


# -- registered ops ---------------------------------------------------------------------------------


@register_op("crossvit_fast::cross_attention")
def _cross_attention_op(
    cls: Tensor,
    tokens: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    wq: Tensor,
    bq: Tensor | None,
    wk: Tensor,
    bk: Tensor | None,
    wv: Tensor,
    bv: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    num_heads: int,
    eps: float,
    residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out (B, C), and for backward: LN(cls) (B, C), q (B, C), k~ (H, B, C),
    u (B, H, C), u~ = u - beta (B, H, C) fp32, lse (B, 16) fp32 base 2, o (B, C), and the
    LayerNorm statistics of the attended rows (2, B, 1 + N) fp32 (mean, rstd)).

    Weights are in the compute dtype `wq.dtype`; cls / tokens / norm params may be any of
    fp32 / fp16 / bf16 (autocast: LayerNorm math in fp32). bk is unused: it cancels in the
    softmax (it is an input so that it gets its exactly-zero gradient)."""
    B, C = cls.shape
    H, d = num_heads, C // num_heads
    N1 = tokens.shape[1]  # the CLS row + N token rows
    dt = wq.dtype
    # The (B x C)(C x C) GEMMs and per-head (B x d)(d x C) batched GEMMs go to cuBLAS: at these
    # sizes they run near its latency floor, and a fused Triton GEMM would have to re-read
    # every weight per batch tile while saving at most one launch each.
    n0, r = cls_norm_fwd(
        cls,
        norm_weight,
        norm_bias,
        eps,
        dt,
        gelu=False,
        residual_base=residual and cls.dtype == dt,
        add=proj_bias,
    )
    q = torch.addmm(bq, n0, wq.t()) if bq is not None else torch.mm(n0, wq.t())
    kt = torch.bmm(_head_view(q, H), wk.reshape(H, d, C))  # (H, B, C): k~_h = W_k,h^T q_h
    u = cls.new_empty((B, H, C), dtype=dt)
    ut = cls.new_empty((B, H, C), dtype=torch.float32)
    lse = cls.new_empty((B, MAX_HEADS), dtype=torch.float32)
    stats = cls.new_empty((2, B, N1), dtype=torch.float32)
    if B > 0:
        tiles = token_tiles(dt)
        S, rows = split_plan(B, N1, tiles["BLOCK_N"], cls.device)
        single = S == 1
        part_m = part_l = part_acc = None
        if not single:
            part_m = cls.new_empty((B, S, MAX_HEADS), dtype=torch.float32)
            part_l = torch.empty_like(part_m)
            part_acc = cls.new_empty((B, S, H, C), dtype=torch.float32)
        z = cls.new_empty((B, MAX_HEADS, N1), dtype=torch.float32)  # logits, read back once
        has_b = norm_bias is not None
        launch(
            _cross_attention_fwd_kernel, (B, S),
            cls, cls.stride(0), cls.stride(1),
            tokens, tokens.stride(0), tokens.stride(1), tokens.stride(2),
            kt, kt.stride(0), kt.stride(1), norm_weight, norm_bias, z, stats[0], stats[1],
            u, ut, lse, part_m, part_l, part_acc, N1, C, H, rows, eps, d**-0.5 * _LOG2E,
            HAS_W=norm_weight is not None, HAS_B=has_b, SINGLE=single, BLOCK_H=MAX_HEADS,
            **tiles, **dot_flags(dt),
        )  # fmt: skip
        if not single:
            block_c = tiles["BLOCK_C"]
            launch(
                _cross_attention_merge_kernel, (B, triton.cdiv(C, block_c)),
                part_m, part_l, part_acc, norm_bias, u, ut, lse, S, C, H,
                HAS_B=has_b, BLOCK_C=block_c, BLOCK_H=MAX_HEADS, num_warps=4,
            )  # fmt: skip
    wv_h = wv.reshape(H, d, C).transpose(1, 2)  # (H, C, d)
    u_h = u.transpose(0, 1)  # (H, B, C)
    o_h = torch.baddbmm(bv.view(H, 1, d), u_h, wv_h) if bv is not None else torch.bmm(u_h, wv_h)
    o = _merge_heads(o_h)
    if r is not None:  # r = cls + b_o: the GEMM accumulates into it (one launch, no copy)
        out = r.addmm_(o, proj_weight.t())
    else:
        y = (
            torch.addmm(proj_bias, o, proj_weight.t())
            if proj_bias is not None
            else o @ proj_weight.t()
        )
        out = cls + y if residual else y
    return out, n0, q, kt, u, ut, lse, o, stats


@register_op("crossvit_fast::cross_attention_backward")
def _cross_attention_backward_op(
    dout: Tensor, cls: Tensor, tokens: Tensor, norm_weight: Tensor | None,
    wq: Tensor, wk: Tensor, wv: Tensor, proj_weight: Tensor,
    n0: Tensor, q: Tensor, kt: Tensor, u: Tensor, ut: Tensor, lse: Tensor, o: Tensor, stats: Tensor,
    num_heads: int, eps: float, residual: bool, dres: Tensor | None = None,
    bias_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Returns (dcls, dtokens, dwq, dwk, dwv, dwo, dnorm, dbias) with dnorm (2C,) fp32 = dgamma |
    dbeta and dbias (3C,) in bias_dtype = db_o | db_v | db_q (db_k is exactly 0). dres
    (B, 1 + N, C), any strides: added into dtokens' rows 1.. (row 0 stays 0), for
    `fusion_stage`."""
    B, C = cls.shape
    H, d = num_heads, C // num_heads
    N1 = tokens.shape[1]
    dt = wq.dtype
    dy = dout.to(dt)  # the out-proj GEMM ran in dt; the residual gets dout as it is
    do = dy @ proj_weight
    dwo = dy.t() @ o
    du = torch.bmm(_head_view(do, H), wv.reshape(H, d, C))  # (H, B, C)
    dwv = torch.bmm(_head_view(do, H).transpose(1, 2), u.transpose(0, 1)).reshape(C, C)
    dtokens = tokens.new_empty((B, N1, C))
    dn0 = cls.new_empty((B, C), dtype=dt)
    tiles = token_tiles(dt, backward=True)
    S, rows = split_plan(B, N1, tiles["BLOCK_N"], cls.device)
    # S == 1: the kernel writes dk~ in its final dtype; else fp32 partials, summed in split order
    dkt_part = cls.new_empty((S, H, B, C), dtype=dt if S == 1 else torch.float32)
    part = cls.new_empty((B, S, 2, C), dtype=torch.float32)
    if B > 0:
        pdz = cls.new_empty((2, B, MAX_HEADS, N1), dtype=torch.float32)  # scratch: a, dz
        means = cls.new_empty((2, B, N1), dtype=torch.float32)  # scratch: mean(g), mean(g x^)
        launch(
            _cross_attention_bwd_kernel, (B, S),
            cls, cls.stride(0), cls.stride(1),
            tokens, tokens.stride(0), tokens.stride(1), tokens.stride(2),
            kt, kt.stride(0), kt.stride(1), du, du.stride(0), du.stride(1), ut, lse,
            stats[0], stats[1], norm_weight, pdz[0], pdz[1], means[0], means[1],
            dtokens, dtokens.stride(0), dtokens.stride(1),
            dres, *(dres.stride() if dres is not None else (0, 0, 0)), dn0,
            dkt_part, *dkt_part.stride()[:3], part,
            N1, C, H, rows, d**-0.5 * _LOG2E, d**-0.5,
            HAS_W=norm_weight is not None, HAS_DRES=dres is not None, ONE_KEY=N1 == 1,
            BLOCK_H=MAX_HEADS, **tiles,
            **dot_flags(dt),
        )  # fmt: skip
    dkt = dkt_part[0] if S == 1 else dkt_part.sum(0).to(dt)
    dq = _merge_heads(torch.bmm(dkt, wk.reshape(H, d, C).transpose(1, 2)))  # dq_h = W_k,h dk~_h
    dwk = torch.bmm(_head_view(q, H).transpose(1, 2), dkt).reshape(C, C)
    dwq = dq.t() @ n0
    dn0.addmm_(dq, wq)  # dL/dLN(cls): attention part + W_q^T dq
    dcls, dnorm, dbias = cls_norm_bwd(
        cls,
        dn0,
        norm_weight,
        None,
        eps,
        gelu=False,
        res=dout if residual else None,
        pre=part,
        extras=(dy, do, dq),
        extras_dtype=bias_dtype,
    )
    return dcls, dtokens, dwq, dwk, dwv, dwo, dnorm, dbias


def _cross_attention_setup(ctx, inputs, output) -> None:
    cls, tokens, nw, nb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, residual = inputs
    _, n0, q, kt, u, ut, lse, o, stats = output
    ctx.mark_non_differentiable(n0, q, kt, u, ut, lse, o, stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cls, tokens, nw, wq, wk, wv, wo, n0, q, kt, u, ut, lse, o, stats)
    ctx.args = (num_heads, eps, residual)
    # dtypes of the optional inputs (None: absent, no gradient)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (nw, nb, bq, bk, bv, bo))


def _cross_attention_backward(ctx, dout, *_):
    name = "crossvit_fast::cross_attention"
    if dout is None:
        return input_grads(name)
    saved = ctx.saved_tensors
    C = saved[0].shape[1]
    # `fusion_stage` runs this backward with a stand-in ctx that may carry the tokens' other
    # gradient (`dres`); autograd's ctx never has one.
    dres = getattr(ctx, "dres", None)
    bias_dtypes = {ctx.dtypes[i] for i in (2, 4, 5)}  # b_q, b_v, b_o
    # one dtype for the three: the reduction's launch casts them (else fp32, cast below)
    one = next(iter(bias_dtypes)) if len(bias_dtypes) == 1 else None
    dcls, dtok, dwq, dwk, dwv, dwo, dnorm, tail = _cross_attention_backward_op(
        dout, *saved, *ctx.args, dres, one or torch.float32
    )
    dnw, dnb = dnorm[:C], dnorm[C:]
    dbo, dbv, dbq = (tail[i * C : (i + 1) * C] for i in range(3))  # tail: db_o | db_v | db_q
    # b_k shifts every logit of a head equally: exactly 0
    dbk = dnorm.new_zeros(C, dtype=ctx.dtypes[3] or dnorm.dtype)
    g_nw, g_nb, g_bq, g_bk, g_bv, g_bo = (
        None if t is None else g.to(t) for g, t in zip((dnw, dnb, dbq, dbk, dbv, dbo), ctx.dtypes)
    )
    grads = CrossAttentionParams(g_nw, g_nb, dwq, g_bq, dwk, g_bk, dwv, g_bv, dwo, g_bo)
    return input_grads(name, cls=dcls, tokens=dtok, **grads._asdict())


_cross_attention_op.register_autograd(
    _cross_attention_backward, setup_context=_cross_attention_setup
)

# The op with its autograd pieces, for `fusion_stage` (which runs them under its own node).
AUTOGRAD_PARTS = (_cross_attention_op, _cross_attention_setup, _cross_attention_backward)


# -- functional ---------------------------------------------------------------------------------


def cross_attention(
    cls: Tensor,
    tokens: Tensor,
    params: CrossAttentionParams,
    num_heads: int,
    eps: float,
    residual: bool = True,
) -> Tensor:
    """CrossViT CrossAttentionBlock on the CLS query, K/V-free (see the module docstring).

    cls: (B, C); tokens: (B, 1 + N, C), N >= 0, rows 1.. attended (row 0 ignored, zero grad);
    any strides. fp32 / fp16 / bf16 (fp64: ValueError), fp32 accumulation. params:
    `CrossAttentionParams`, weights (C, C), biases / norm params (C,) or None. num_heads 1..16,
    head dim C / num_heads in 8..128; on the GPU C <= 1024 (shared memory).
    Under autocast the GEMMs run in the autocast dtype and LayerNorm / softmax in fp32, and the
    output dtype is the reference's (cls + y promoted). Returns (B, C).
    """
    return _cross_attention_op(*op_inputs(cls, tokens, params, num_heads, eps, residual))[0]


def op_inputs(cls, tokens, params, num_heads, eps, residual=True) -> tuple:
    """`cross_attention`'s arguments, checked and converted, as `crossvit_fast::cross_attention`
    takes them (also how `fusion_stage` calls the op)."""
    params = as_params(CrossAttentionParams, params)
    check_args(cls, tokens, params, num_heads)
    # As the reference: timm's block sees cat(cls, tokens), which promotes a low-precision CLS
    # (autocast) to the tokens' dtype, and its residual is that promoted CLS.
    if cls.dtype != tokens.dtype:  # (no op at all in the common case: no launch, no graph node)
        cls = cls.to(torch.promote_types(cls.dtype, tokens.dtype))
    dt = compute_dtype(cls, tokens=tokens, **params._asdict())
    # LayerNorm affine stays in its own dtype (fp32 statistics); the GEMM operands are cast.
    gemm = (cast(t, dt) for t in params[2:])
    nw, nb = params.norm_weight, params.norm_bias
    return (cls, tokens, nw, nb, *gemm, num_heads, float(eps), bool(residual))


OPS = {"cross_attention": cross_attention}
