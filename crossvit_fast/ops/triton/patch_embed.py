"""Patch embedding in Triton: the `patch_embed` op (conv with kernel = stride = p, + bias, CLS
row and position embedding, in one kernel).

Ladder: `_patch_embed_fwd_kernel` / `_patch_embed_bwd_kernel` (weight gradient) /
`_patch_embed_bwd_input_kernel` (image gradient) -> launchers -> ops
`crossvit_fast::patch_embed` / `crossvit_fast::patch_embed_backward` -> functional `patch_embed`.

Patch convolution as an implicit GEMM: with kernel = stride = p the patches do not overlap, so
out[b, 1 + t, :] = A[m] @ W^T with m = (b, t), t = (ph, pw) and A[m, k], k = (c, i, j), read
straight from the image at x[b, c, ph*p + i, pw*p + j] — an address that splits into a row part
(b, ph, pw) and a column part (c, i, j), so no unfold / im2col copy exists. The epilogue adds the
bias and pos_embed[1 + t] and writes the final token row; the tiles holding a first patch (t = 0)
also write that image's CLS row, cls_token + pos_embed[0]. The image comes from DRAM once (the
column tiles of a patch block run back to back, GROUP_M ordering, so re-reads hit L2) and the
token tensor is written once (eager: conv output, cat's transposing copy, the position add).
Each patch row is padded from p to a power of two in the K ordering (`_patch_cols`) so that the
image loads vectorise (16-byte loads for p = 8 / 16, 8-byte for p = 12; checked in the sm_90
PTX).

Backward: one pass over d_out (`token_grads`, the `token_assemble` op's backward kernel) reduces
over the batch into fp32 partial rows: d_pos_embed, and from it d_cls (row 0) and d_bias (sum of rows 1..); the weight gradient is an implicit GEMM over
all patches (split over M for parallelism, fp32 partials, deterministic), reading the image
directly again; the image gradient (only when the image requires grad) is the transposed
implicit GEMM scattering straight into the image layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..common import cast, check_tensor, compute_dtype
from .token_assemble import check_tokens, token_grads
from .utils import (
    dot_flags,
    empty,
    gemm_configs,
    gemm_tile,
    launch,
    mma,
    next_pow2,
    program_slots,
    prune_by_dtype,
    register_op,
    round_to,
)

__all__ = ["OPS", "patch_embed"]


# -- kernels -------------------------------------------------------------------------------------


@triton.jit
def _patch_rows(offs_m, Np, Wp, P, sxb, sxh, sxw):
    """Row part of the implicit-GEMM address of patch m = (b, t): x[b, :, ph*P, pw*P]; and t."""
    b = offs_m // Np
    t = offs_m % Np
    ph = t // Wp
    pw = t % Wp
    return b.to(tl.int64) * sxb + (ph * P).to(tl.int64) * sxh + (pw * P).to(tl.int64) * sxw, b, t


@triton.jit
def _patch_cols(ks, P: tl.constexpr, PP: tl.constexpr, sxc, sxh, sxw):
    """Column part of the implicit-GEMM address of the padded k = (c, i, j), j < PP: x[:, c, i, j],
    and whether j < P. Each patch row is padded from P to PP = next_pow2(P) pixels so that a run
    of PP consecutive k is one contiguous pixel row: with constexpr P / PP the compiler sees the
    contiguity and vectorises the image loads (P = 12 pays 33% more MMA work for it; 8, 16 none)."""
    c = ks // (P * PP)
    r = ks % (P * PP)
    j = r % PP
    off = c.to(tl.int64) * sxc + (r // PP).to(tl.int64) * sxh + j.to(tl.int64) * sxw
    return off, j < P


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, cls_ptr, pos_ptr, out_ptr,
    M, N, K, Np, Wp,
    sxb, sxc, sxh, sxw, swn, swk, spt, spn, sob, sot,
    P: tl.constexpr, PP: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[b, 1 + t, n] = sum_k x_patch[m, k] w[n, k] + bias[n] + pos[1 + t, n], m = b*Np + t,
    and out[b, 0, n] = cls[n] + pos[0, n] (written by the tile holding patch t = 0 of b).
    K = C_in * P * PP (padded patch rows, see `_patch_cols`); w (N, K) is zero in the padding."""
    _, _, offs_m, offs_n, m_mask, n_mask = gemm_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_off, b, t = _patch_rows(offs_m, Np, Wp, P, sxb, sxh, sxw)
    cdt = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        col_off, in_row = _patch_cols(ks, P, PP, sxc, sxh, sxw)
        k_mask = ks < K
        a = tl.load(
            x_ptr + row_off[:, None] + col_off[None, :],
            mask=m_mask[:, None] & (k_mask & in_row)[None, :],
            other=0.0,
        )
        if a.dtype != cdt:  # e.g. an fp32 image under bf16 autocast: the conv's input cast
            a = round_to(a.to(tl.float32), cdt, EMULATE)
        w = tl.load(
            w_ptr + offs_n[None, :] * swn + ks[:, None] * swk,
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc = mma(a, w, acc, EMULATE, PRECISION)

    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(
        pos_ptr + (1 + t)[:, None] * spt + offs_n[None, :] * spn, mask=mask, other=0.0
    ).to(tl.float32)
    out_rows = out_ptr + b.to(tl.int64)[:, None] * sob
    out = round_to(acc, out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_rows + (1 + t)[:, None] * sot + offs_n[None, :], out, mask=mask)
    # CLS rows: cls + pos[0], broadcast over the tile's rows, stored where t == 0.
    cls = tl.load(cls_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    cls += tl.load(pos_ptr + offs_n * spn, mask=n_mask, other=0.0).to(tl.float32)
    cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + cls[None, :]
    cls_tile = round_to(cls_tile, out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_rows + offs_n[None, :], cls_tile, mask=mask & (t == 0)[:, None])


@triton.jit
def _patch_embed_bwd_kernel(
    x_ptr, g_ptr, w_ptr, part_ptr,
    M, N, K, Np, Wp, rows_per_split,
    sxb, sxc, sxh, sxw, sgb, sgt, sgn,
    P: tl.constexpr, PP: tl.constexpr, EMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Weight gradient, split over M: part[s, n, k] = sum over the split's patches m of
    d_out[b, 1 + t, n] * x_patch[m, k], operands rounded to the compute dtype (w's; w is not
    read otherwise). k is the padded index of `_patch_cols`: padding columns come out zero."""
    # (n, k) tiles in row-major order (GROUP_M = 1: no swizzle, each program reads its own rows)
    _, _, offs_n, offs_k, n_mask, k_mask = gemm_tile(N, K, BLOCK_N, BLOCK_K, 1)
    split = tl.program_id(1)
    col_off, in_row = _patch_cols(offs_k, P, PP, sxc, sxh, sxw)
    cdt = w_ptr.dtype.element_ty
    m_start = split * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        row_off, b, t = _patch_rows(offs_m, Np, Wp, P, sxb, sxh, sxw)
        g_ptrs = (
            g_ptr + b.to(tl.int64)[:, None] * sgb + (1 + t)[:, None] * sgt + offs_n[None, :] * sgn
        )
        g = tl.load(g_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        a = tl.load(
            x_ptr + row_off[:, None] + col_off[None, :],
            mask=m_mask[:, None] & (k_mask & in_row)[None, :],
            other=0.0,
        )
        g = round_to(g.to(tl.float32), cdt, EMULATE)
        a = round_to(a.to(tl.float32), cdt, EMULATE)
        acc = mma(tl.trans(g), a, acc, EMULATE, PRECISION)
    part = part_ptr + split.to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(part, acc, mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _patch_embed_bwd_input_kernel(
    g_ptr, w_ptr, dx_ptr,
    M, N, K, Np, Wp,
    sgb, sgt, sgn, swn, swk, sdb, sdc, sdh, sdw,
    P: tl.constexpr, PP: tl.constexpr, EMULATE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Image gradient: dx_patch[m, k] = sum_n d_out[b, 1 + t, n] w[n, k], stored straight into
    the image layout (patches do not overlap: every pixel is written exactly once)."""
    _, _, offs_m, offs_k, m_mask, k_mask = gemm_tile(M, K, BLOCK_M, BLOCK_K, 1)  # row-major
    offs_n = tl.arange(0, BLOCK_N)
    b = offs_m // Np
    t = offs_m % Np
    g_rows = g_ptr + b.to(tl.int64)[:, None] * sgb + (1 + t)[:, None] * sgt
    cdt = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + offs_n
        n_mask = ns < N
        g = tl.load(g_rows + ns[None, :] * sgn, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        g = round_to(g.to(tl.float32), cdt, EMULATE)
        w = tl.load(
            w_ptr + ns[:, None] * swn + offs_k[None, :] * swk,
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = mma(g, w, acc, EMULATE, PRECISION)
    row_off, _, _ = _patch_rows(offs_m, Np, Wp, P, sdb, sdh, sdw)
    col_off, in_row = _patch_cols(offs_k, P, PP, sdc, sdh, sdw)
    dx = round_to(acc, dx_ptr.dtype.element_ty, EMULATE)
    tl.store(
        dx_ptr + row_off[:, None] + col_off[None, :],
        dx,
        mask=m_mask[:, None] & (k_mask & in_row)[None, :],
    )


# -- configs -------------------------------------------------------------------------------------

# 16-bit weights: Hopper wgmma tiles. An fp32 image cast in-kernel (AMP) holds the fp32 A tile as
# well: 128x64 / 64x128 with 4 warps spilled 8-40 bytes (sm_90 toolchain tier), so that case runs
# them with 8 warps. fp32 weights: IEEE products, smaller tiles.
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_CONFIGS_16 = gemm_configs((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))
_CONFIGS_16_FP32_IMAGE = gemm_configs(
    (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 8, 4)
)
_CONFIGS_32 = gemm_configs((64, 64, 32, 4, 3))

_prune = prune_by_dtype(
    _CONFIGS_32,
    _CONFIGS_16,
    _CONFIGS_16_FP32_IMAGE,
    lambda named, meta: named["x_ptr"].element_size() >= 4,
)


_patch_embed_fwd_tuned = triton.autotune(
    configs=_CONFIGS_16 + _CONFIGS_16_FP32_IMAGE + _CONFIGS_32,
    key=["N", "K", "P"],
    prune_configs_by={"early_config_prune": _prune},
)(_patch_embed_fwd_kernel)


# -- launchers -----------------------------------------------------------------------------------


def _padded_weight(weight: Tensor) -> tuple[Tensor, int]:
    """(D, C_in * p * pp) weight with each patch row zero-padded from p to pp = next_pow2(p)
    (see `_patch_cols`); a view when p is a power of two. Returns it and pp."""
    D, Cin, _, p = weight.shape
    pp = next_pow2(p)
    if pp != p:  # a (D x C_in*p*pp) copy: tiny next to the image
        weight = F.pad(weight, (0, pp - p))
    return weight.reshape(D, Cin * p * pp), pp


# -- registered ops ------------------------------------------------------------------------------


@register_op("crossvit_fast::patch_embed")
def _patch_embed_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    cls_token: Tensor,
    pos_embed: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """x (B, C_in, H, W) any strides / float dtype; weight (D, C_in, p, p) in the compute dtype.
    Returns the token tensor (B, 1 + N, D) in out_dtype."""
    B, _, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    Hp, Wp = H // p, W // p
    Np = Hp * Wp
    out = x.new_empty((B, 1 + Np, D), dtype=out_dtype)
    M = B * Np
    if B == 0:
        return out
    w2, pp = _padded_weight(weight)
    K = w2.shape[1]
    pos = pos_embed.reshape(1 + Np, D)
    args = (x, w2, bias, cls_token.reshape(D), pos, out, M, D, K, Np, Wp,
            *x.stride(), w2.stride(0), w2.stride(1), pos.stride(0), pos.stride(1),
            out.stride(0), out.stride(1))  # fmt: skip
    flags = dict(P=p, PP=pp, HAS_BIAS=bias is not None, **dot_flags(weight.dtype))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_N"]),)
    launch(_patch_embed_fwd_tuned, grid, *args, **flags)
    return out


def patch_embed_bwd(dout: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool):
    """(dx or None, dweight or None, d_pos (fp32 (1 + N, D))) for dout (B, 1 + N, D)."""
    B, Cin, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    Wp = W // p
    Np, pp = (H // p) * Wp, next_pow2(p)
    K = Cin * p * pp  # padded patch rows, see `_patch_cols`
    M = B * Np
    cdt = weight.dtype
    dpos = token_grads(dout, None)
    dw = dx = None
    dots = dot_flags(cdt)
    if need_dw:
        if cdt == torch.float32:
            bn, bk, bm, warps, stages = 64, 64, 32, 4, 3
        else:  # Hopper: 128x128 output tiles, 64-row K steps, two warpgroups. The fp32 d_out
            # is re-read once per K tile (the image once per D tile): 128-wide K tiles issue
            # 2 / 3 of what 64-wide did (cost ledger; crossvit_18: 2.89 -> ~1.97 GB)
            bn, bk, bm, warps, stages = 128, 128, 64, 8, 3
        tiles = triton.cdiv(D, bn) * triton.cdiv(K, bk)
        # Split the long reduction over patches: about 2 programs per SM in all.
        splits = max(1, min(triton.cdiv(max(M, 1), 4 * bm), program_slots(x.device) // (2 * tiles)))
        rows = bm * triton.cdiv(triton.cdiv(max(M, 1), splits), bm)
        splits = triton.cdiv(M, rows)
        part = x.new_empty((splits, D, K), dtype=torch.float32)
        if M > 0:
            launch(
                _patch_embed_bwd_kernel, (tiles, splits),
                x, dout, weight, part, M, D, K, Np, Wp, rows, *x.stride(), *dout.stride(),
                P=p, PP=pp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                num_stages=stages, **dots,
            )  # fmt: skip
        dw = part.sum(0).view(D, Cin, p, pp)[..., :p].to(cdt).contiguous()
    if need_dx:
        dx = torch.empty_like(x)  # keeps x's memory format; fully overwritten
        w2, _ = _padded_weight(weight)
        bm, bn, bk, warps = (64, 32, 64, 4) if cdt == torch.float32 else (128, 64, 64, 8)
        if M > 0:
            launch(
                _patch_embed_bwd_input_kernel, (triton.cdiv(M, bm) * triton.cdiv(K, bk),),
                dout, w2, dx, M, D, K, Np, Wp, *dout.stride(), w2.stride(0), w2.stride(1),
                *dx.stride(), P=p, PP=pp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                num_warps=warps, **dots,
            )  # fmt: skip
    return dx, dw, dpos


@register_op("crossvit_fast::patch_embed_backward")
def _patch_embed_backward_op(
    dout: Tensor, x: Tensor, weight: Tensor, needs: list[bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dcls (D,), dpos (1 + N, D)) in fp32 for the last three;
    `needs` = [dx, dweight]; an unneeded gradient comes back empty."""
    need_dx, need_dw = needs
    dx, dw, dpos = patch_embed_bwd(dout, x, weight, need_dx, need_dw)
    return (
        dx if dx is not None else empty(x),
        dw if dw is not None else empty(x),
        dpos[1:].sum(0),
        dpos[0].clone(),
        dpos,
    )


def _patch_embed_setup(ctx, inputs, output):
    x, weight, bias, cls_token, pos_embed, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.dtypes = (bias.dtype if bias is not None else None, cls_token.dtype, pos_embed.dtype)


def _patch_embed_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db, dcls, dpos = torch.ops.crossvit_fast.patch_embed_backward(
        dout, x, weight, [need[0], need[1]]
    )
    b_dt, c_dt, p_dt = ctx.dtypes
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        db.to(b_dt) if need[2] and b_dt is not None else None,
        dcls.view(1, 1, -1).to(c_dt) if need[3] else None,
        dpos.unsqueeze(0).to(p_dt) if need[4] else None,
        None,
    )


_patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


# -- functionals ---------------------------------------------------------------------------------


def patch_embed(
    x: Tensor, weight: Tensor, bias: Tensor | None, cls_token: Tensor, pos_embed: Tensor
) -> Tensor:
    """Plain patch embedding: conv (kernel = stride = p) + bias, CLS row, position embedding.

    x: (B, C_in, H, W), fp32 / fp16 / bf16, any strides, H and W divisible by p;
    weight: (D, C_in, p, p); bias: (D,) or None; cls_token: (1, 1, D); pos_embed:
    (1, 1 + (H/p)(W/p), D). Returns (B, 1 + N, D), patches row-major. Output dtype as the
    reference: promote(conv dtype, cls, pos), the conv dtype being the autocast dtype under
    autocast, else x's (weight and bias must then match x)."""
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4, like=x)
    D, Cin, ph, pw = weight.shape
    if ph != pw:
        raise ValueError(
            f"weight: expected a square patch kernel (D, C_in, p, p), got {tuple(weight.shape)}"
        )
    p = pw
    _, C, H, W = x.shape
    if Cin != C:
        raise ValueError(
            f"x: expected {Cin} channels (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}"
        )
    if H % p or W % p:
        raise ValueError(f"x: image size ({H}, {W}) is not divisible by the patch size {p}")
    check_tensor("bias", bias, shape=(D,), like=x, optional=True)
    check_tokens(D, (H // p) * (W // p), cls_token, pos_embed, x)
    cdt = compute_dtype(x, weight=weight, bias=bias)
    out_dtype = torch.promote_types(torch.promote_types(cdt, cls_token.dtype), pos_embed.dtype)
    weight, bias = weight.to(cdt), cast(bias, cdt)  # autocast's cast
    return torch.ops.crossvit_fast.patch_embed(x, weight, bias, cls_token, pos_embed, out_dtype)


OPS = {"patch_embed": patch_embed}


# -- cost formulas (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` --------


from .utils import cdiv, esize, register_cost  # noqa: E402


def _pixels_per_patch(a: dict, meta: dict) -> int:
    """Real (unpadded) k of the padded patch row index: C_in * P * P of K = C_in * P * PP."""
    return a["K"] // meta["PP"] * meta["P"]


# Each returns (bytes issued, FLOPs, DRAM bytes): the GEMM operands' repeats across tiles (issued)
# are served by L2 (grouped tile order / small operands), so DRAM counts each operand once.


def _patch_embed_fwd_bytes(a: dict, meta: dict, tm: int, tn: int) -> int:
    M, N, K, B = a["M"], a["N"], a["K"], a["M"] // a["Np"]
    eo, ep = esize(a["out_ptr"]), esize(a["pos_ptr"])
    b = M * _pixels_per_patch(a, meta) * tn * esize(a["x_ptr"]) + N * K * tm * esize(a["w_ptr"])
    b += tm * N * (esize(a["bias_ptr"]) * meta["HAS_BIAS"] + esize(a["cls_ptr"]) + ep)
    return b + M * N * (ep + eo) + B * N * eo  # pos + tokens; the CLS rows


@register_cost("_patch_embed_fwd_kernel")
def _cost_patch_embed_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    tm, tn = cdiv(a["M"], meta["BLOCK_M"]), cdiv(a["N"], meta["BLOCK_N"])
    flops = 2 * a["M"] * a["N"] * a["K"]
    return _patch_embed_fwd_bytes(a, meta, tm, tn), flops, _patch_embed_fwd_bytes(a, meta, 1, 1)


def _patch_embed_bwd_bytes(a: dict, meta: dict, tn: int, tk: int, splits: int) -> int:
    M, N, K = a["M"], a["N"], a["K"]
    b = M * N * tk * esize(a["g_ptr"]) + M * _pixels_per_patch(a, meta) * tn * esize(a["x_ptr"])
    return b + splits * N * K * 4  # + fp32 partials per split


@register_cost("_patch_embed_bwd_kernel")
def _cost_patch_embed_bwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    M, N, K = a["M"], a["N"], a["K"]
    tn, tk = cdiv(N, meta["BLOCK_N"]), cdiv(K, meta["BLOCK_K"])
    issued = _patch_embed_bwd_bytes(a, meta, tn, tk, grid[1])
    return issued, 2 * M * N * K, _patch_embed_bwd_bytes(a, meta, 1, 1, grid[1])


def _patch_embed_bwd_input_bytes(a: dict, meta: dict, tm: int, tk: int) -> int:
    M, N, K = a["M"], a["N"], a["K"]
    b = M * N * tk * esize(a["g_ptr"]) + N * K * tm * esize(a["w_ptr"])
    return b + M * _pixels_per_patch(a, meta) * esize(a["dx_ptr"])


@register_cost("_patch_embed_bwd_input_kernel")
def _cost_patch_embed_bwd_input(a: dict, meta: dict, grid: tuple) -> tuple[int, int, int]:
    M, N, K = a["M"], a["N"], a["K"]
    tm, tk = cdiv(M, meta["BLOCK_M"]), cdiv(K, meta["BLOCK_K"])
    issued = _patch_embed_bwd_input_bytes(a, meta, tm, tk)
    return issued, 2 * M * N * K, _patch_embed_bwd_input_bytes(a, meta, 1, 1)
