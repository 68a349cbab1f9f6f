"""Every autotune config of every op, forced one at a time, against the reference.

On the GPU the autotuner may pick any config its pruning keeps, so each must be correct, not only
the one the interpreter would run by default (the first). `utils.force_configs` chooses the
config of each autotuned kernel (under the interpreter; see the list of interpreter differences
in crossvit_fast/ops/triton/utils.py); the op then runs forward and backward, and the output and
every gradient must pass the 2x rule (tests/numerics.py) in fp32, bf16, fp16 and AMP (fp32
inputs under bf16 autocast). On a GPU this module is skipped: the GPU tier autotunes for real.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import block, gemm, mlp, patch_embed, self_attention, utils

from .conftest import HAS_GPU
from .numerics import check_against_reference

pytestmark = pytest.mark.skipif(HAS_GPU, reason="on a GPU the autotuner runs every config itself")

EPS = 1e-6


def flat_eps(op: str, fn, *rest):
    """`fn` (table op `op`) on flat inputs, then `*rest` and EPS."""
    f = flat_args(op, fn)
    return lambda *a: f(*a, *rest, EPS)


DTYPES = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "amp": (torch.float32, torch.bfloat16),
}


def _r(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


def _norm(C):
    """A LayerNorm's affine: weight and bias (C,)."""
    return [_r(C, scale=0.3) + 1, _r(C, scale=0.1)]


def _linear(n_out, n_in):
    """A Linear's weight (n_out, n_in) at scale n_in**-0.5 and its bias (n_out,)."""
    return [_r(n_out, n_in, scale=n_in**-0.5), _r(n_out, scale=0.1)]


def _mlp_case():
    # 3 x 7 = 21 rows (a partial M tile in every config), width 96 (a partial 64-wide K step)
    C, Hd = 96, 192
    inputs = [_r(3, 7, C, scale=2) + 0.5, *_norm(C), *_linear(Hd, C), *_linear(C, Hd)]
    return (flat_eps("mlp", mlp.mlp), flat_eps("mlp", reference.mlp), inputs)


def _mlp_resident_case():
    # 2 x 260 = 520 rows: enough 128-row blocks for the resident plan on the interpreter's 4
    # pretend SMs (16-bit and AMP; fp32 runs the tiled kernel), fc1 and fc2's dgrad through it
    C, Hd = 96, 200
    inputs = [_r(2, 260, C, scale=2) + 0.5, *_norm(C), *_linear(Hd, C), *_linear(C, Hd)]
    return (flat_eps("mlp", mlp.mlp), flat_eps("mlp", reference.mlp), inputs)


def _block_resident_case():
    # a whole block at 520 rows: the resident proj dgrad also finishes the MLP's LayerNorm
    # backward in its prologue (DNORM), besides fc1 and fc2's dgrad
    C, Hd = 96, 200
    attn = [*_norm(C), *_linear(3 * C, C), *_linear(C, C)]
    inputs = [_r(2, 260, C, scale=2) + 0.5, *attn, *_norm(C), *_linear(Hd, C), *_linear(C, Hd)]
    return (flat_eps("block", block.block, 3), flat_eps("block", reference.block, 3), inputs)


def _attention_case():
    C = 96  # 3 heads of 32
    inputs = [_r(2, 9, C, scale=2) + 0.5, *_norm(C), *_linear(3 * C, C), *_linear(C, C)]
    return (
        flat_eps("self_attention", self_attention.self_attention, 3),
        flat_eps("self_attention", reference.self_attention, 3),
        inputs,
    )


def _patch_embed_case():
    D, p = 96, 12  # patch 12: the zero-padded patch rows
    n = (24 // p) * (36 // p)
    inputs = [
        _r(2, 3, 24, 36),
        _r(D, 3, p, p, scale=(3 * p * p) ** -0.5),
        _r(D, scale=0.1),
        _r(1, 1, D, scale=0.02),
        _r(1, 1 + n, D, scale=0.02),
    ]
    return (patch_embed.patch_embed, reference.patch_embed, inputs)


# op -> (its autotuned kernel, case builder)
OPS = {
    "mlp": (gemm._fused_linear_tuned, _mlp_case),
    "self_attention": (gemm._fused_linear_tuned, _attention_case),
    "mlp_resident": (gemm._resident_linear_tuned, _mlp_resident_case),
    "block_resident": (gemm._resident_linear_tuned, _block_resident_case),
    "patch_embed": (patch_embed._patch_embed_fwd_tuned, _patch_embed_case),
}


def _n_configs(kernel, dtype: torch.dtype, **meta) -> int:
    """How many configs the kernel's pruning keeps for `dtype` weights (fp32 or 16-bit)."""
    w = torch.empty(1, dtype=dtype)
    if kernel.early_config_prune is None:
        return len(kernel.configs)
    return len(kernel.early_config_prune(kernel.configs, {"w_ptr": w, "x_ptr": w}, **meta))


def _cases():
    for op, (kernel, _) in OPS.items():
        for name, (dtype, amp) in DTYPES.items():
            if kernel is gemm._resident_linear_tuned and (amp or dtype) == torch.float32:
                continue  # 16-bit compute only: fp32 runs the tiled kernel
            for i in range(_n_configs(kernel, amp or dtype)):
                yield pytest.param(op, name, i, id=f"{op}-{name}-config{i}")


@pytest.mark.parametrize("op, dtype_name, index", list(_cases()))
def test_every_autotune_config_matches_the_reference(op, dtype_name, index, one_thread):
    kernel, build = OPS[op]
    ours, ref, inputs = build()
    dtype, amp = DTYPES[dtype_name]
    with (
        utils.force_configs({kernel.fn.__name__: index}),
        torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None),
    ):
        check_against_reference(ours, ref, inputs, dtype, name=f"{op} config {index}")


def test_forcing_a_config_that_does_not_exist_fails():
    ours, _ref, inputs = _mlp_case()
    x = [t.float() if isinstance(t, torch.Tensor) else t for t in inputs]
    with (
        utils.force_configs({"_fused_linear_kernel": 99}),
        pytest.raises(IndexError, match="config 99"),
    ):
        ours(*x)
