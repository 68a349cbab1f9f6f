"""The `token_assemble` op in Triton (dagger stems): flatten the cuDNN stem's output, prepend the
CLS row and add the position embedding, in one pass.

Spec: `crossvit_fast.ops.reference.token_assemble`.

Ladder: `_token_assemble_fwd_kernel` / `_token_assemble_bwd_kernel` -> launchers
`token_assemble_fwd` / `token_grads` -> ops `crossvit_fast::token_assemble` /
`crossvit_fast::token_assemble_backward` -> functional `token_assemble`.

Memory plan. Forward: feat is read once (along whichever axis it is contiguous in: NCHW and
channels_last are read in place) and the token tensor written once. Backward: one pass over
d_out reduces over the batch into fp32 partial rows of d_pos_embed (split over images for
parallelism, summed in split order: deterministic) and, when feat needs a gradient, scatters
d_out[:, 1:] back into feat's layout in the same pass. `patch_embed`'s backward reuses
`token_grads` for its d_pos_embed / d_cls / d_bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..common import check_tensor
from .utils import dot_in_fp32, empty, launch, next_pow2, program_slots, register_op, round_to

__all__ = ["OPS", "check_tokens", "token_assemble", "token_grads"]


# -- kernels -------------------------------------------------------------------------------------


@triton.jit
def _token_assemble_fwd_kernel(
    f_ptr, cls_ptr, pos_ptr, out_ptr,
    T, D, sfb, sfd, sft, spt, spd, sob, sot,
    EMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[b, r, d] = (cls[d] if r == 0 else feat[b, d, r - 1]) + pos[r, d], r < T = 1 + h*w.
    feat's (h, w) are one flat token axis with stride sft (checked by the launcher)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    mask = (rows < T)[:, None] & d_mask[None, :]
    is_patch = rows >= 1
    # The (BLOCK_T, BLOCK_D) tile is read along whichever axis feat is contiguous in (tokens for
    # NCHW, channels for channels_last) and written along D: Triton transposes through shared
    # memory in between.
    f = tl.load(f_ptr + b * sfb + offs_d[None, :] * sfd + (rows - 1)[:, None] * sft,
                mask=mask & is_patch[:, None], other=0.0).to(tl.float32)  # fmt: skip
    cls = tl.load(cls_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    val = tl.where(is_patch[:, None], f, cls[None, :])
    val += tl.load(pos_ptr + rows[:, None] * spt + offs_d[None, :] * spd, mask=mask, other=0.0).to(
        tl.float32
    )
    val = round_to(val, out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_ptr + b * sob + rows[:, None] * sot + offs_d[None, :], val, mask=mask)


@triton.jit
def _token_assemble_bwd_kernel(
    g_ptr, df_ptr, part_ptr,
    B, T, D, batch_per_split, sgb, sgt, sgd, sfb, sfd, sft,
    HAS_DFEAT: tl.constexpr, EMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One pass over d_out: part[s, r, d] = sum over the split's images of d_out[b, r, d]
    (d_pos_embed partials), and with HAS_DFEAT d_feat[b, d, r - 1] = d_out[b, r, d]."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    b_start = split * batch_per_split
    n_b = tl.minimum(batch_per_split, B - b_start)
    # int64 image offsets; the loop then steps the pointers one image at a time.
    g_ptrs = g_ptr + b_start.to(tl.int64) * sgb + rows[:, None] * sgt + offs_d[None, :] * sgd
    if HAS_DFEAT:
        df_ptrs = (
            df_ptr + b_start.to(tl.int64) * sfb + offs_d[None, :] * sfd + (rows - 1)[:, None] * sft
        )
    for _ in range(0, n_b):
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc += g
        if HAS_DFEAT:
            df = round_to(g, df_ptr.dtype.element_ty, EMULATE)
            tl.store(df_ptrs, df, mask=mask & (rows >= 1)[:, None])
            df_ptrs += sfb
        g_ptrs += sgb
    part = part_ptr + split.to(tl.int64) * T * D + rows[:, None] * D + offs_d[None, :]
    tl.store(part, acc, mask=mask)


# -- launchers -----------------------------------------------------------------------------------


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(n)))


def _token_tile(T: int, D: int) -> tuple[int, int]:
    return 32, _clamp_pow2(D, 16, 128)


def _flat_tokens(feat: Tensor) -> Tensor:
    """feat with (h, w) mergeable into one token axis (true for NCHW and channels_last);
    a contiguous copy otherwise."""
    _, _, h, w = feat.shape
    if h > 1 and w > 1 and feat.stride(2) != w * feat.stride(3):
        return feat.contiguous()
    return feat


def _token_stride(feat: Tensor) -> int:
    # Stride between consecutive (row-major) tokens once (h, w) are merged.
    return feat.stride(3) if feat.shape[3] > 1 else feat.stride(2)


def token_assemble_fwd(
    feat: Tensor, cls_token: Tensor, pos_embed: Tensor, out_dtype: torch.dtype
) -> Tensor:
    B, D, h, w = feat.shape
    T = 1 + h * w
    out = feat.new_empty((B, T, D), dtype=out_dtype)
    if B == 0:
        return out
    feat = _flat_tokens(feat)
    pos = pos_embed.reshape(T, D)
    block_t, block_d = _token_tile(T, D)
    launch(
        _token_assemble_fwd_kernel, (triton.cdiv(T, block_t), triton.cdiv(D, block_d), B),
        feat, cls_token.reshape(D), pos, out, T, D, feat.stride(0), feat.stride(1),
        _token_stride(feat), pos.stride(0), pos.stride(1), out.stride(0), out.stride(1),
        EMULATE=dot_in_fp32(), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def token_grads(dout: Tensor, dfeat: Tensor | None) -> Tensor:
    """d_pos_embed as an fp32 (1 + N, D) sum over the batch of dout (B, 1 + N, D); with dfeat
    (B, D, h, w), also scatters dout[:, 1:] into it (any memory format with mergeable h, w)."""
    B, T, D = dout.shape
    block_t, block_d = _token_tile(T, D)
    tiles = triton.cdiv(T, block_t) * triton.cdiv(D, block_d)
    splits = max(1, min(B, program_slots(dout.device) // max(tiles, 1)))
    per_split = triton.cdiv(max(B, 1), splits)
    splits = triton.cdiv(B, per_split) if B > 0 else 0
    part = dout.new_empty((splits, T, D), dtype=torch.float32)  # every split writes its row
    if splits > 0:
        fs = (
            (dfeat.stride(0), dfeat.stride(1), _token_stride(dfeat))
            if dfeat is not None
            else (0, 0, 0)
        )
        launch(
            _token_assemble_bwd_kernel,
            (triton.cdiv(T, block_t), triton.cdiv(D, block_d), splits),
            dout, dfeat, part, B, T, D, per_split, *dout.stride(), *fs,
            HAS_DFEAT=dfeat is not None, EMULATE=dot_in_fp32(), BLOCK_T=block_t,
            BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return part.sum(0)


# -- registered ops ------------------------------------------------------------------------------


@register_op("crossvit_fast::token_assemble")
def _token_assemble_op(
    feat: Tensor, cls_token: Tensor, pos_embed: Tensor, out_dtype: torch.dtype
) -> Tensor:
    return token_assemble_fwd(feat, cls_token, pos_embed, out_dtype)


@register_op("crossvit_fast::token_assemble_backward")
def _token_assemble_backward_op(
    dout: Tensor,
    feat_shape: list[int],
    feat_dtype: torch.dtype,
    channels_last: bool,
    need_dfeat: bool,
) -> tuple[Tensor, Tensor]:
    """(dfeat (B, D, h, w) in feat's dtype and memory format, or empty; dpos fp32 (1 + N, D))."""
    dfeat = None
    if need_dfeat:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dfeat = dout.new_empty(feat_shape, dtype=feat_dtype).contiguous(memory_format=fmt)
    dpos = token_grads(dout, dfeat)
    return dfeat if dfeat is not None else empty(dout), dpos


def _token_assemble_setup(ctx, inputs, output):
    feat, cls_token, pos_embed, _ = inputs
    ctx.feat_shape = list(feat.shape)
    ctx.feat_dtype = feat.dtype
    # The stem's output layout (channels_last when the convolutions run channels_last): the
    # gradient goes back in the same layout, so cuDNN's backward reads it without a copy.
    ctx.channels_last = (
        feat.dim() == 4
        and feat.is_contiguous(memory_format=torch.channels_last)
        and not feat.is_contiguous()
    )
    ctx.dtypes = (cls_token.dtype, pos_embed.dtype)


def _token_assemble_backward(ctx, dout):
    need = ctx.needs_input_grad
    dfeat, dpos = torch.ops.crossvit_fast.token_assemble_backward(
        dout, ctx.feat_shape, ctx.feat_dtype, ctx.channels_last, need[0]
    )
    c_dt, p_dt = ctx.dtypes
    return (
        dfeat if need[0] else None,
        dpos[0].view(1, 1, -1).to(c_dt) if need[1] else None,
        dpos.unsqueeze(0).to(p_dt) if need[2] else None,
        None,
    )


_token_assemble_op.register_autograd(_token_assemble_backward, setup_context=_token_assemble_setup)


# -- functional ----------------------------------------------------------------------------------


def check_tokens(D: int, Np: int, cls_token: Tensor, pos_embed: Tensor, like: Tensor) -> None:
    check_tensor("cls_token", cls_token, shape=(1, 1, D), like=like)
    check_tensor("pos_embed", pos_embed, shape=(1, 1 + Np, D), like=like)


def token_assemble(feat: Tensor, cls_token: Tensor, pos_embed: Tensor) -> Tensor:
    """`cat(cls_token, flatten(feat)) + pos_embed` in one pass.

    feat: (B, D, h, w), fp32 / fp16 / bf16, any strides (NCHW and channels_last read in place);
    cls_token: (1, 1, D); pos_embed: (1, 1 + h*w, D). Returns (B, 1 + h*w, D) in
    promote(feat, cls, pos) (cat and add are not autocast ops)."""
    check_tensor("feat", feat, ndim=4)
    _, D, h, w = feat.shape
    check_tokens(D, h * w, cls_token, pos_embed, feat)
    out_dtype = torch.promote_types(
        torch.promote_types(feat.dtype, cls_token.dtype), pos_embed.dtype
    )
    return torch.ops.crossvit_fast.token_assemble(feat, cls_token, pos_embed, out_dtype)


OPS = {"token_assemble": token_assemble}


# -- cost formulas (bytes loaded + stored by the programs, FLOPs) for `crossvit_fast.cost` --------


from .utils import esize, register_cost  # noqa: E402


@register_cost("_token_assemble_fwd_kernel")
def _cost_token_assemble_fwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    T, D, B = a["T"], a["D"], grid[2]
    b = B * (T - 1) * D * esize(a["f_ptr"]) + grid[0] * B * D * esize(a["cls_ptr"])
    return b + B * T * D * (esize(a["pos_ptr"]) + esize(a["out_ptr"])), 0


@register_cost("_token_assemble_bwd_kernel")
def _cost_token_assemble_bwd(a: dict, meta: dict, grid: tuple) -> tuple[int, int]:
    B, T, D = a["B"], a["T"], a["D"]
    b = B * T * D * esize(a["g_ptr"]) + grid[2] * T * D * 4
    if meta["HAS_DFEAT"]:
        b += B * (T - 1) * D * esize(a["df_ptr"])
    return b, 0
