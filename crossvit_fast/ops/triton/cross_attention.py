"""CrossViT's CLS cross-attention in Triton, K/V-free (weight absorption), forward and backward.

Spec: `crossvit_fast.ops.reference.cross_attention`; derivation: docs/cls_cross_attention.md.
One CLS query per sample attends over itself and the other branch's patch tokens. Because there is
a single query, the key and value projections move to the query side:

    k~_h = W_k,h^T q_h        z_hn = s k~_h . LN(x_n)        u_h = sum_n softmax_n(z_hn) LN(x_n)
    o_h  = W_v,h u_h + b_v,h  out  = cls + W_o o + b_o

so K and V (2 N C^2 MACs per sample) never exist and the op reads each token row once.

Memory plan (forward), per sample b:
  LN(cls) -> q -> k~ are (B, C) / (H, B, C) GEMMs (cuBLAS, see `_cross_attention_fwd`);
  `_cross_attention_fwd_kernel` streams the token rows of one (sample, split) program once:
  per BLOCK_N rows it computes the LayerNorm statistics in registers, y = x^ * gamma, the logits
  z = k~ y^T (tensor cores, heads padded to 16), an online softmax and u += p y; partials of
  several splits are merged flash-decoding style by `_cross_attention_merge_kernel`.
  LayerNorm's beta and the key bias shift every logit of a head by the same constant, so both
  are dropped from z (softmax is shift invariant; db_k is exactly 0) and beta is added to u once.
  Saved for backward: LN(cls), q, k~, u and u~ = u - beta (H x C per sample, not N x C), o and
  the base-2 log-sum-exp.

Backward recomputes the softmax weights from the log-sum-exp (flash-attention style) in one
more pass over the tokens (`_cross_attention_bwd_kernel`), writes d tokens once and per-program
partials of dk~, dgamma, dbeta, which are reduced in a fixed order (deterministic: no float
atomics). The CLS row finishes last (`_cls_norm_bwd_kernel`): its LayerNorm gradient needs dq,
which needs the complete dk~.

Also here: `_cls_norm_fwd_kernel` / `_cls_norm_bwd_kernel`, the row-wise LayerNorm (+ erf-GELU)
of CLS rows shared with `cls_proj` (crossvit_fast.ops.triton.fusion).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import KERNEL_DTYPES, autocast_dtype, check_tensor
from . import interpreter_enabled
from .utils import (
    device_guard,
    dot_in_fp32,
    gelu_erf,
    gelu_erf_grad,
    launch,
    next_pow2,
    register_op,
)

__all__ = ["OPS", "cls_norm_bwd", "cls_norm_fwd", "cross_attention", "register_op"]

_INTERPRET = interpreter_enabled()  # fixed when Triton is first imported, as Triton's own mode
_LOG2E = 1.0 / math.log(2.0)  # exp(z) = exp2(z * log2(e)): the kernels work in base 2
_MAX_HEADS = 16  # the head axis is padded to one 16-wide tensor-core tile
_HEAD_DIMS = (8, 128)
_MIN_BLOCKS_PER_SPLIT = 2  # a split must amortise loading k~ and writing its (H x C) partial
# On the GPU the token pass keeps (16 x C) dot operands in shared memory (227 KB per SM on sm_90;
# Triton 3.9: bf16 33 / 65 KB forward / backward at C = 448, 131 KB backward at C <= 1024; fp32
# 67 / 100 KB at 448, 132 / 199 KB at 1024): C <= 1024 fits every dtype and pass.
_GPU_MAX_WIDTH = 1024


# -- shared device helpers -------------------------------------------------------------------------


@triton.jit
def _normalize_rows(x, mask_c, C, eps):
    """Rows of x (fp32, masked columns 0) -> ((x - mean) * rstd with masked columns 0, rstd).
    Two-pass statistics from the row already in registers (biased variance, as F.layer_norm)."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    """fp32-accumulating tl.dot. IEEE: exact fp32 products (fp32 inputs; TF32 would cost ~1e-3
    relative error), else the operands' own precision (bf16/fp16 tensor cores)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


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


# -- CLS-row LayerNorm (+ erf-GELU): also the first half of cls_proj ------------------------------


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
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
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
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0)
    xhat, rstd = _normalize_rows(x.to(tl.float32), mask_c, C, eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_W else None
    dn = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask,
                 other=0.0).to(tl.float32)  # fmt: skip
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
        dx += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rc, mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
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


# -- the token pass: forward ------------------------------------------------------------------------


@triton.jit
def _attend_rows(x, mask_n, mask_c, w, kt, m_i, l_i, acc, C, eps, qk_scale,
                 HAS_W: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """One block of rows x (BLOCK_N, BLOCK_C) into the online softmax state of all heads:
    m_i, l_i (BLOCK_H,) running max / sum in base 2, acc (BLOCK_H, BLOCK_C) = sum p y."""
    y, _ = _normalize_rows(x.to(tl.float32), mask_c, C, eps)
    if HAS_W:
        y = y * w[None, :]
    y = y.to(kt.dtype)  # the dot operand dtype (bf16/fp16 on the GPU: tensor cores)
    z = _mm(kt, tl.trans(y), IEEE) * qk_scale  # (BLOCK_H, BLOCK_N) logits, base 2
    z = tl.where(mask_n[None, :], z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(z - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _mm(p.to(y.dtype), y, IEEE)
    return m_new, l_i, acc


@triton.jit
def _store_u_lse(u_ptr, ut_ptr, lse_ptr, b, acc, m_i, l_i, beta, heads, cols, mask_h, mask_c, H,
                 C, HAS_B: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    """u~_h = acc_h / l_h -> ut (B, H, C) fp32 (for backward's delta); u_h = u~_h + beta -> u
    (B, H, C) in the GEMM dtype; lse (B, BLOCK_H) fp32 in base 2."""
    ut = acc / l_i[:, None]
    offs = b * H * C + heads[:, None] * C + cols[None, :]
    mask = mask_h[:, None] & mask_c[None, :]
    tl.store(ut_ptr + offs, ut, mask=mask)
    if HAS_B:
        ut = ut + beta[None, :]  # sum_n a_hn = 1: beta passes through the average exactly
    tl.store(u_ptr + offs, ut, mask=mask)
    tl.store(lse_ptr + b * BLOCK_H + heads, m_i + tl.log2(l_i))


@triton.jit
def _cross_attention_fwd_kernel(
    cls_ptr, stride_cb, stride_cc,  # (B, C): row 0 of the attended sequence
    tok_ptr, stride_tb, stride_tn, stride_tc,  # (B, 1 + N, C): rows 1..N are read in place
    kt_ptr, stride_kh, stride_kb,  # k~ (H, B, C), unit column stride, dot dtype
    w_ptr, b_ptr,  # norm1 affine (C,)
    u_ptr, ut_ptr, lse_ptr,  # SINGLE: u, u~ (B, H, C), lse (B, BLOCK_H)
    m_ptr, l_ptr, acc_ptr,  # else partials (B, S, BLOCK_H) x2, (B, S, H, C) fp32
    N, C, H, rows_per_split, eps, qk_scale,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SINGLE: tl.constexpr, DOT_F32: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B, S): program (b, s) attends over token rows 1 + s*R .. 1 + (s+1)*R - 1 (R =
    rows_per_split); split 0 also takes the CLS row. It reads each of its rows exactly once."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_W else None
    # k~ stays on chip for the whole pass; padded heads are 0 (their logits are 0, never stored)
    kt = tl.load(kt_ptr + heads[:, None] * stride_kh + b * stride_kb + cols[None, :],
                 mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
    if DOT_F32:  # the interpreter's bf16/fp16 dots are wrong
        kt = kt.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    rows = tl.arange(0, BLOCK_N)
    if s == 0:  # the CLS row, as a block with one valid row
        mask_n = rows < 1
        x = tl.load(cls_ptr + b * stride_cb + rows[:, None] * 0 + cols[None, :] * stride_cc,
                    mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        m_i, l_i, acc = _attend_rows(x, mask_n, mask_c, w, kt, m_i, l_i, acc, C, eps, qk_scale,
                                     HAS_W, IEEE)  # fmt: skip
    start = 1 + s * rows_per_split
    end = tl.minimum(start + rows_per_split, N + 1)
    # Prefetch: the next row block's load is issued before the current block is worked on. Left
    # to itself, Triton 3.9 does not pipeline this bf16 tile (sm_90 compile: shared memory does
    # not grow with num_stages), and ~200 registers leave one program per SM at C = 448, so this
    # doubles the bytes in flight per SM (228 registers, no spills). num_stages=1 at launch.
    tok = tok_ptr + b * stride_tb
    offs_n = start + rows
    x = tl.load(tok + offs_n.to(tl.int64)[:, None] * stride_tn + cols[None, :] * stride_tc,
                mask=(offs_n < end)[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        mask_n = (n0 + rows) < end
        offs_n = n0 + BLOCK_N + rows
        x_next = tl.load(tok + offs_n.to(tl.int64)[:, None] * stride_tn + cols[None, :] * stride_tc,
                         mask=(offs_n < end)[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        m_i, l_i, acc = _attend_rows(x, mask_n, mask_c, w, kt, m_i, l_i, acc, C, eps, qk_scale,
                                     HAS_W, IEEE)  # fmt: skip
        x = x_next
    if SINGLE:
        beta = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_B else None
        _store_u_lse(u_ptr, ut_ptr, lse_ptr, b, acc, m_i, l_i, beta, heads, cols, mask_h, mask_c,
                     H, C, HAS_B, BLOCK_H)  # fmt: skip
    else:
        S = tl.num_programs(1)
        ml = (b * S + s) * BLOCK_H + heads
        tl.store(m_ptr + ml, m_i)
        tl.store(l_ptr + ml, l_i)
        offs = ((b * S + s) * H + heads)[:, None] * C + cols[None, :]
        tl.store(acc_ptr + offs, acc, mask=mask_h[:, None] & mask_c[None, :])


@triton.jit
def _cross_attention_merge_kernel(
    m_ptr, l_ptr, acc_ptr, b_ptr, u_ptr, ut_ptr, lse_ptr, S, C, H,
    HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B,): merge the S (max, sum, acc) partials of one sample in split order."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
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
        acc_s = tl.load(acc_ptr + ((b * S + s) * H + heads)[:, None] * C + cols[None, :], mask=mask,
                        other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + acc_s * alpha_s[:, None]
        m_i = m_new
    beta = tl.load(b_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_B else None
    _store_u_lse(u_ptr, ut_ptr, lse_ptr, b, acc, m_i, l_i, beta, heads, cols, mask_h, mask_c, H, C,
                 HAS_B, BLOCK_H)  # fmt: skip


# -- the token pass: backward -----------------------------------------------------------------------


@triton.jit
def _attend_rows_bwd(x, mask_n, mask_c, w, kt, du, lse, delta, dkt, C, eps, qk_scale, scale,
                     HAS_W: tl.constexpr, IEEE: tl.constexpr, ONE_KEY: tl.constexpr):  # fmt: skip
    """Gradient of one block of rows. Returns dn = dL/dLN(x) (BLOCK_N, BLOCK_C) fp32, x^, rstd
    and dkt += dz^T y (times `scale` by the caller)."""
    xhat, rstd = _normalize_rows(x.to(tl.float32), mask_c, C, eps)
    y = xhat
    if HAS_W:
        y = y * w[None, :]
    y = y.to(kt.dtype)
    yt = tl.trans(y)
    p = tl.exp2(_mm(kt, yt, IEEE) * qk_scale - lse[:, None])  # softmax weights, recomputed
    p = tl.where(mask_n[None, :], p, 0.0)
    dn = _mm(tl.trans(p).to(y.dtype), du, IEEE)
    if not ONE_KEY:  # (one key: a = 1 is constant, dz = 0 exactly, not rounding noise)
        dz = p * (_mm(du, yt, IEEE) - delta[:, None])  # a (da - sum a da), da_hn = du_h . LN(x_n)
        dn += _mm(tl.trans(dz * scale).to(y.dtype), kt, IEEE)
        dkt += _mm(dz.to(y.dtype), y, IEEE)
    return dn, xhat, rstd, dkt


@triton.jit
def _cross_attention_bwd_kernel(
    cls_ptr, stride_cb, stride_cc,
    tok_ptr, stride_tb, stride_tn, stride_tc,
    kt_ptr, stride_kh, stride_kb,  # k~ (H, B, C)
    du_ptr, stride_duh, stride_dub,  # dL/du (H, B, C)
    ut_ptr, lse_ptr,  # u~ = u - beta (B, H, C) fp32, lse (B, BLOCK_H)
    w_ptr,  # norm1 weight (C,); beta only enters through u~
    dtok_ptr, stride_db, stride_dn,  # (B, 1 + N, C), unit column stride
    dn0_ptr,  # (B, C): the attention part of dL/dLN(cls), written by split 0
    dkt_ptr, stride_dks, stride_dkh, stride_dkb,  # (S, H, B, C) partials of dL/dk~
    part_ptr,  # (B, S, 2, C) fp32 partials of dgamma, dbeta over the token rows
    N, C, H, rows_per_split, eps, qk_scale, scale,
    HAS_W: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, ONE_KEY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Grid (B, S), the same row ranges as the forward. One pass over the rows: recompute p from
    the log-sum-exp, write dL/dtokens, accumulate dk~ and dgamma/dbeta per program."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_C)
    mask_c = cols < C
    heads = tl.arange(0, BLOCK_H)
    mask_h = heads < H
    mask_hc = mask_h[:, None] & mask_c[None, :]
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32) if HAS_W else None
    kt = tl.load(kt_ptr + heads[:, None] * stride_kh + b * stride_kb + cols[None, :], mask=mask_hc,
                 other=0.0)  # fmt: skip
    du = tl.load(du_ptr + heads[:, None] * stride_duh + b * stride_dub + cols[None, :],
                 mask=mask_hc, other=0.0)  # fmt: skip
    if DOT_F32:
        kt = kt.to(tl.float32)
        du = du.to(tl.float32)
    lse = tl.load(lse_ptr + b * BLOCK_H + heads)
    # delta_h = sum_n a_hn da_hn = du_h . u_h; the beta parts of da and u cancel in da - delta,
    # so delta = du_h . u~_h from the fp32 u~ (no rounding of u~ + beta - beta)
    ut = tl.load(ut_ptr + b * H * C + heads[:, None] * C + cols[None, :], mask=mask_hc, other=0.0)
    delta = tl.sum(du.to(tl.float32) * ut, axis=1)

    dkt = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    dw = tl.zeros([BLOCK_C], tl.float32)
    db = tl.zeros([BLOCK_C], tl.float32)
    rows = tl.arange(0, BLOCK_N)
    if s == 0:  # the CLS row: its LayerNorm backward waits for dq (see cls_norm_bwd)
        mask_n = rows < 1
        mask = mask_n[:, None] & mask_c[None, :]
        x = tl.load(cls_ptr + b * stride_cb + rows[:, None] * 0 + cols[None, :] * stride_cc,
                    mask=mask, other=0.0)  # fmt: skip
        dn, _, _, dkt = _attend_rows_bwd(x, mask_n, mask_c, w, kt, du, lse, delta, dkt, C, eps,
                                         qk_scale, scale, HAS_W, IEEE, ONE_KEY)  # fmt: skip
        offs = b * C + rows[:, None] * 0 + cols[None, :]
        tl.store(dn0_ptr + offs, dn, mask=mask)
        # row 0 of tokens (the other branch's own CLS) is not used: zero gradient
        tl.store(dtok_ptr + b * stride_db + rows[:, None] * 0 + cols[None, :],
                 tl.zeros([BLOCK_N, BLOCK_C], tl.float32), mask=mask)  # fmt: skip
    start = 1 + s * rows_per_split
    end = tl.minimum(start + rows_per_split, N + 1)
    tok = tok_ptr + b * stride_tb
    offs_n = (start + rows).to(tl.int64)  # prefetched one block ahead, as in the forward
    x = tl.load(tok + offs_n[:, None] * stride_tn + cols[None, :] * stride_tc,
                mask=(offs_n < end)[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
    for n0 in range(start, end, BLOCK_N):
        offs_n = (n0 + rows).to(tl.int64)
        mask_n = offs_n < end
        mask = mask_n[:, None] & mask_c[None, :]
        x_next = tl.load(tok + (offs_n + BLOCK_N)[:, None] * stride_tn + cols[None, :] * stride_tc,
                         mask=(offs_n + BLOCK_N < end)[:, None] & mask_c[None, :], other=0.0)  # fmt: skip
        dn, xhat, rstd, dkt = _attend_rows_bwd(x, mask_n, mask_c, w, kt, du, lse, delta, dkt, C,
                                               eps, qk_scale, scale, HAS_W, IEEE, ONE_KEY)  # fmt: skip
        x = x_next
        dx = _ln_rows_bwd(dn, xhat, rstd, w, mask_c, C, HAS_W)
        tl.store(dtok_ptr + b * stride_db + offs_n[:, None] * stride_dn + cols[None, :], dx,
                 mask=mask)  # fmt: skip
        dw += tl.sum(dn * xhat, axis=0)  # masked rows have dn = 0 and x^ = 0
        db += tl.sum(dn, axis=0)
    dkt_offs = s * stride_dks + heads[:, None] * stride_dkh + b * stride_dkb + cols[None, :]
    tl.store(dkt_ptr + dkt_offs, dkt * scale, mask=mask_hc)
    part = part_ptr + (b * S + s) * 2 * C
    tl.store(part + cols, dw, mask=mask_c)
    tl.store(part + C + cols, db, mask=mask_c)


# -- launchers ----------------------------------------------------------------------------------


def _launch(kernel, grid: tuple, device: torch.device, *args, **meta) -> None:
    with device_guard(device):
        launch(kernel, grid, *args, **meta)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: a pretend 4-SM device, so that small tests exercise splits


def _row_tiles(C: int, cap: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for the row kernels: whole rows in registers."""
    block_c = next_pow2(max(C, 16))
    return max(1, min(16, cap // block_c)), block_c, 4 if block_c <= 512 else 8


def _token_tiles(C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the token pass. Whole rows stay on chip (the row's
    LayerNorm and its dot with every head need all C columns); BLOCK_N >= 16 (tl.dot minimum).
    sm_90 (Triton 3.9, ptxas): bf16 forward 168 / 198 / 64 registers per thread at C = 224 / 448
    / 768 (4 / 8 / 16 warps), no spills; the backward is capped at 255, no spills."""
    block_c = next_pow2(max(C, 16))
    block_n = 32 if block_c <= 256 else 16
    num_warps = 4 if block_c <= 256 else (8 if block_c <= 512 else 16)
    return block_n, block_c, num_warps


def _split_plan(B: int, N: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(S splits over the tokens, rows per split). One sample is one program unless the batch
    alone cannot fill the GPU (B < #SMs): then each sample's rows are split over up to
    2 * #SMs / B programs (flash-decoding), each of at least _MIN_BLOCKS_PER_SPLIT blocks."""
    n_blocks = triton.cdiv(max(N, 1), block_n)
    sms = _sm_count(device)
    splits = 1
    if sms > B:
        splits = max(1, min(triton.cdiv(2 * sms, max(B, 1)), n_blocks // _MIN_BLOCKS_PER_SPLIT))
    rows = triton.cdiv(n_blocks, splits) * block_n
    return triton.cdiv(max(N, 1), rows), rows


def _dot_flags(dt: torch.dtype) -> dict:
    interp = dot_in_fp32()
    return {"DOT_F32": interp, "IEEE": interp or dt == torch.float32}


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
    _launch(
        _cls_norm_fwd_kernel, (triton.cdiv(M, block_m),), x.device,
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
) -> tuple[Tensor, Tensor]:
    """Backward of `cls_norm_fwd`. x, dy: (M, C); res: (M, C) added to dx; pre: (M, S, 2, C)
    fp32 partial (dgamma, dbeta) of the same LayerNorm from other rows; extras: up to 3 tensors
    (M, CE) whose column sums are wanted (bias gradients).

    Returns dx (M, C) in x.dtype and sums (2C + len(extras) * CE,) fp32 = dgamma | dbeta |
    colsum(extras[0]) | ... — reduced from per-program partials in a fixed order.
    """
    M, C = x.shape
    CE = extras[0].shape[1] if extras else 0
    width = 2 * C + len(extras) * CE
    dx = x.new_empty((M, C))
    if M == 0:
        return dx, x.new_zeros((width,), dtype=torch.float32)
    block_m, _, num_warps = _row_tiles(max(C, CE), 2048)  # rows of both tiles fit registers
    block_c = next_pow2(max(C, 16))
    P = triton.cdiv(M, block_m)
    part = x.new_empty((P, width), dtype=torch.float32)
    e = list(extras) + [None] * (3 - len(extras))
    es = [(t.stride(0), t.stride(1)) if t is not None else (0, 0) for t in e]
    _launch(
        _cls_norm_bwd_kernel, (P,), x.device,
        x, x.stride(0), x.stride(1), dy, dy.stride(0), dy.stride(1), weight, bias,
        res, *((res.stride(0), res.stride(1)) if res is not None else (0, 0)),
        pre, pre.shape[1] if pre is not None else 0,
        e[0], *es[0], e[1], *es[1], e[2], *es[2],
        dx, part, M, C, CE, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, GELU=gelu, HAS_RES=res is not None,
        HAS_PRE=pre is not None, NUM_E=len(extras), BLOCK_M=block_m, BLOCK_C=block_c,
        BLOCK_E=next_pow2(max(CE, 16)), num_warps=num_warps,
    )  # fmt: skip
    # P <= M / BLOCK_M rows: one small deterministic reduction for every LN / bias gradient
    return dx, part.sum(0)


def _head_view(t: Tensor, H: int) -> Tensor:
    """(B, C) -> (H, B, d) view, the batched-GEMM layout of per-head slabs."""
    return t.view(t.shape[0], H, t.shape[1] // H).transpose(0, 1)


# -- registered ops ---------------------------------------------------------------------------------


@register_op("crossvit_fast::cross_attention_fwd")
def _cross_attention_fwd(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out (B, C), and for backward: LN(cls) (B, C), q (B, C), k~ (H, B, C),
    u (B, H, C), u~ = u - beta (B, H, C) fp32, lse (B, 16) fp32 base 2, o (B, C)).

    Weights are in the compute dtype `wq.dtype`; cls / tokens / norm params may be any of
    fp32 / fp16 / bf16 (autocast: LayerNorm math in fp32). bk is unused: it cancels in the
    softmax (it is an input so that it gets its exactly-zero gradient)."""
    B, C = cls.shape
    H, d = num_heads, C // num_heads
    N = tokens.shape[1] - 1
    dt = wq.dtype
    # The (B x C)(C x C) GEMMs and per-head (B x d)(d x C) batched GEMMs go to cuBLAS: at these
    # sizes they run near its latency floor, and a fused Triton GEMM would have to re-read
    # every weight per batch tile while saving at most one launch each.
    n0, r = cls_norm_fwd(cls, norm_weight, norm_bias, eps, dt, gelu=False,
                         residual_base=residual and cls.dtype == dt, add=proj_bias)  # fmt: skip
    q = torch.addmm(bq, n0, wq.t()) if bq is not None else torch.mm(n0, wq.t())
    kt = torch.bmm(_head_view(q, H), wk.reshape(H, d, C))  # (H, B, C): k~_h = W_k,h^T q_h
    u = cls.new_empty((B, H, C), dtype=dt)
    ut = cls.new_empty((B, H, C), dtype=torch.float32)
    lse = cls.new_empty((B, _MAX_HEADS), dtype=torch.float32)
    if B > 0:
        block_n, block_c, num_warps = _token_tiles(C)
        S, rows = _split_plan(B, N, block_n, cls.device)
        single = S == 1
        part_m = part_l = part_acc = None
        if not single:
            part_m = cls.new_empty((B, S, _MAX_HEADS), dtype=torch.float32)
            part_l = torch.empty_like(part_m)
            part_acc = cls.new_empty((B, S, H, C), dtype=torch.float32)
        flags = dict(HAS_W=norm_weight is not None, HAS_B=norm_bias is not None,
                     BLOCK_C=block_c, BLOCK_H=_MAX_HEADS)  # fmt: skip
        _launch(
            _cross_attention_fwd_kernel, (B, S), cls.device,
            cls, cls.stride(0), cls.stride(1),
            tokens, tokens.stride(0), tokens.stride(1), tokens.stride(2),
            kt, kt.stride(0), kt.stride(1), norm_weight, norm_bias,
            u, ut, lse, part_m, part_l, part_acc, N, C, H, rows, eps, d**-0.5 * _LOG2E,
            SINGLE=single, BLOCK_N=block_n, num_warps=num_warps, **flags, **_dot_flags(dt),
            num_stages=1,  # the kernel prefetches itself; no Triton pipeline buffers
        )  # fmt: skip
        if not single:
            _launch(
                _cross_attention_merge_kernel, (B,), cls.device,
                part_m, part_l, part_acc, norm_bias, u, ut, lse, S, C, H,
                HAS_B=flags["HAS_B"], BLOCK_C=block_c, BLOCK_H=_MAX_HEADS, num_warps=num_warps,
            )  # fmt: skip
    o = cls.new_empty((B, C), dtype=dt)
    torch.bmm(u.transpose(0, 1), wv.reshape(H, d, C).transpose(1, 2), out=_head_view(o, H))
    if bv is not None:
        o += bv
    if r is not None:  # r = cls + b_o: the GEMM accumulates into it (one launch, no copy)
        out = r.addmm_(o, proj_weight.t())
    else:
        y = (
            torch.addmm(proj_bias, o, proj_weight.t())
            if proj_bias is not None
            else o @ proj_weight.t()
        )
        out = cls + y if residual else y
    return out, n0, q, kt, u, ut, lse, o


@register_op("crossvit_fast::cross_attention_bwd")
def _cross_attention_bwd(
    dout: Tensor,
    cls: Tensor,
    tokens: Tensor,
    norm_weight: Tensor | None,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    proj_weight: Tensor,
    n0: Tensor,
    q: Tensor,
    kt: Tensor,
    u: Tensor,
    ut: Tensor,
    lse: Tensor,
    o: Tensor,
    num_heads: int,
    eps: float,
    residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dcls, dtokens, dwq, dwk, dwv, dwo, sums) with sums (5C,) fp32 = dgamma | dbeta |
    db_o | db_v | db_q (db_k is exactly 0)."""
    B, C = cls.shape
    H, d = num_heads, C // num_heads
    N = tokens.shape[1] - 1
    dt = wq.dtype
    dy = dout.to(dt)  # the out-proj GEMM ran in dt; the residual gets dout as it is
    do = dy @ proj_weight
    dwo = dy.t() @ o
    du = torch.bmm(_head_view(do, H), wv.reshape(H, d, C))  # (H, B, C)
    dwv = cls.new_empty((C, C), dtype=dt)
    torch.bmm(_head_view(do, H).transpose(1, 2), u.transpose(0, 1), out=dwv.reshape(H, d, C))
    dtokens = tokens.new_empty((B, N + 1, C))
    dn0 = cls.new_empty((B, C), dtype=dt)
    block_n, block_c, num_warps = _token_tiles(C)
    S, rows = _split_plan(B, N, block_n, cls.device)
    # S == 1: the kernel writes dk~ in its final dtype; else fp32 partials, summed in split order
    dkt_part = cls.new_empty((S, H, B, C), dtype=dt if S == 1 else torch.float32)
    part = cls.new_empty((B, S, 2, C), dtype=torch.float32)
    if B > 0:
        _launch(
            _cross_attention_bwd_kernel, (B, S), cls.device,
            cls, cls.stride(0), cls.stride(1),
            tokens, tokens.stride(0), tokens.stride(1), tokens.stride(2),
            kt, kt.stride(0), kt.stride(1), du, du.stride(0), du.stride(1), ut, lse,
            norm_weight, dtokens, dtokens.stride(0), dtokens.stride(1), dn0,
            dkt_part, *dkt_part.stride()[:3], part,
            N, C, H, rows, eps, d**-0.5 * _LOG2E, d**-0.5,
            HAS_W=norm_weight is not None, ONE_KEY=N == 0, BLOCK_N=block_n, BLOCK_C=block_c,
            BLOCK_H=_MAX_HEADS, num_warps=num_warps, **_dot_flags(dt),
            num_stages=1,
        )  # fmt: skip
    dkt = dkt_part[0] if S == 1 else dkt_part.sum(0).to(dt)
    dq = cls.new_empty((B, C), dtype=dt)
    torch.bmm(dkt, wk.reshape(H, d, C).transpose(1, 2), out=_head_view(dq, H))  # dq_h = W_k,h dk~_h
    dwk = cls.new_empty((C, C), dtype=dt)
    torch.bmm(_head_view(q, H).transpose(1, 2), dkt, out=dwk.reshape(H, d, C))
    dwq = dq.t() @ n0
    dn0.addmm_(dq, wq)  # dL/dLN(cls): attention part + W_q^T dq
    dcls, sums = cls_norm_bwd(cls, dn0, norm_weight, None, eps, gelu=False,
                              res=dout if residual else None, pre=part, extras=(dy, do, dq))  # fmt: skip
    return dcls, dtokens, dwq, dwk, dwv, dwo, sums


def _setup_context(ctx, inputs, output) -> None:
    cls, tokens, nw, nb, wq, bq, wk, bk, wv, bv, wo, bo, num_heads, eps, residual = inputs
    _, n0, q, kt, u, ut, lse, o = output
    ctx.mark_non_differentiable(n0, q, kt, u, ut, lse, o)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(cls, tokens, nw, wq, wk, wv, wo, n0, q, kt, u, ut, lse, o)
    ctx.args = (num_heads, eps, residual)
    # dtypes of the optional inputs (None: absent, no gradient)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (nw, nb, bq, bk, bv, bo))


def _backward(ctx, dout, *_):
    cls, tokens, nw, wq, wk, wv, wo, n0, q, kt, u, ut, lse, o = ctx.saved_tensors
    C = cls.shape[1]
    if dout is None:
        return (None,) * 15
    dcls, dtok, dwq, dwk, dwv, dwo, sums = _cross_attention_bwd(
        dout, cls, tokens, nw, wq, wk, wv, wo, n0, q, kt, u, ut, lse, o, *ctx.args
    )
    dnw, dnb, dbo, dbv, dbq = (sums[i * C : (i + 1) * C] for i in range(5))
    dbk = sums.new_zeros(C)  # b_k shifts every logit of a head equally: exactly 0
    g_nw, g_nb, g_bq, g_bk, g_bv, g_bo = (
        None if t is None else g.to(t) for g, t in zip((dnw, dnb, dbq, dbk, dbv, dbo), ctx.dtypes)
    )
    return dcls, dtok, g_nw, g_nb, dwq, g_bq, dwk, g_bk, dwv, g_bv, dwo, g_bo, None, None, None


_cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# -- functional ---------------------------------------------------------------------------------


def _check_heads(C: int, num_heads: int) -> None:
    if not isinstance(num_heads, int) or not 1 <= num_heads <= _MAX_HEADS:
        raise ValueError(f"num_heads: expected an int in 1..{_MAX_HEADS}, got {num_heads!r}")
    if C % num_heads:
        raise ValueError(f"width C={C} is not divisible by num_heads={num_heads}")
    d = C // num_heads
    if not _HEAD_DIMS[0] <= d <= _HEAD_DIMS[1]:
        raise ValueError(
            f"head dim C / num_heads = {d}: expected {_HEAD_DIMS[0]}..{_HEAD_DIMS[1]} "
            f"(C={C}, num_heads={num_heads})"
        )


def compute_dtype(x: Tensor, named: dict) -> torch.dtype:
    """The GEMM dtype: the autocast dtype if autocast is on, else x.dtype; without autocast
    every tensor in `named` must share x's dtype (as the reference requires)."""
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        if dt not in KERNEL_DTYPES:
            raise ValueError(
                f"autocast dtype {dt} is not supported (expected one of {KERNEL_DTYPES})"
            )
        return dt
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(
                f"{name}: expected dtype {x.dtype} (as the input; no autocast), got {t.dtype}"
            )
    return x.dtype


def cast(t: Tensor | None, dt: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dt)


def cross_attention(
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
    residual: bool = True,
) -> Tensor:
    """CrossViT CrossAttentionBlock on the CLS query, K/V-free (see the module docstring).

    cls: (B, C); tokens: (B, 1 + N, C), N >= 0, rows 1.. attended (row 0 ignored, zero grad);
    any strides. fp32 / fp16 / bf16 (fp64: ValueError), fp32 accumulation. Weights (C, C),
    biases / norm params (C,) or None. num_heads 1..16, head dim C / num_heads in 8..128; on the
    GPU C <= 1024 (shared memory).
    Under autocast the GEMMs run in the autocast dtype and LayerNorm / softmax in fp32, and the
    output dtype is the reference's (cls + y promoted). Returns (B, C).
    """
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
            f"width C={C}: the GPU kernels keep (16 x C) tiles in shared memory and support "
            f"C <= {_GPU_MAX_WIDTH} (CrossViT's widths are <= 768)"
        )
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("bq", bq), ("bk", bk),
                    ("bv", bv), ("proj_bias", proj_bias)):  # fmt: skip
        check_tensor(name, t, shape=(C,), like=cls, optional=True)
    for name, t in (("wq", wq), ("wk", wk), ("wv", wv), ("proj_weight", proj_weight)):
        check_tensor(name, t, shape=(C, C), like=cls)
    # As the reference: timm's block sees cat(cls, tokens), which promotes a low-precision CLS
    # (autocast) to the tokens' dtype, and its residual is that promoted CLS.
    if cls.dtype != tokens.dtype:  # (no op at all in the common case: no launch, no graph node)
        cls = cls.to(torch.promote_types(cls.dtype, tokens.dtype))
    dt = compute_dtype(cls, {"tokens": tokens, "norm_weight": norm_weight, "norm_bias": norm_bias,
                             "wq": wq, "bq": bq, "wk": wk, "bk": bk, "wv": wv, "bv": bv,
                             "proj_weight": proj_weight, "proj_bias": proj_bias})  # fmt: skip
    return _cross_attention_fwd(
        cls, tokens, norm_weight, norm_bias, cast(wq, dt), cast(bq, dt), cast(wk, dt),
        cast(bk, dt), cast(wv, dt), cast(bv, dt), cast(proj_weight, dt), cast(proj_bias, dt),
        num_heads, float(eps), bool(residual),
    )[0]  # fmt: skip


OPS = {"cross_attention": cross_attention}
