"""Triton K/V-free CLS cross-attention (crossvit_fast.ops.triton.cross_attention) against the
reference op, forward and every gradient.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
tiny but keep what breaks kernels: N = 0 (the CLS attends only to itself), 1, 2, 197, 400 rows;
head dims 8..128; 1, 3, 7, 16 heads; widths that are multiples of 32 but not 64; batch 0 and 1;
strided views. The GPU tier repeats the checks at CrossViT's real shapes.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast.backends import CrossAttentionParams, flat_args
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton import cross_attention as ca
from crossvit_fast.ops.triton import cross_attention_rows as rows_mod

from ..conftest import DEVICE
from ..numerics import assert_2x_rule
from . import KERNEL_BACKENDS, gpu_tier, served

triton_cross_attention = flat_args("cross_attention", ca.cross_attention)
ref_cross_attention = flat_args("cross_attention", reference.cross_attention)

EPS = 1e-6
# the op's arguments, in order: cls, tokens, then its parameter group's fields
NAMES = ("cls", "tokens", *CrossAttentionParams._fields)


def make_inputs(B, N, C, H, *, bias=True, affine=True, seed=0) -> dict:
    """float64 inputs on DEVICE. Tokens get per-channel offsets and scales (a nonzero mean, as
    real ViT tokens) and the q/k weights are large enough for a peaked, non-uniform softmax."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)

    t = {
        "cls": r(B, C) + r(C),
        "tokens": r(B, N + 1, C) * (0.5 + r(C).abs()) + r(C),
        "norm_weight": 1 + 0.3 * r(C) if affine else None,
        "norm_bias": 0.3 * r(C) if affine else None,
    }
    for w, b, s in (
        ("wq", "bq", 2.0),
        ("wk", "bk", 2.0),
        ("wv", "bv", 1.0),
        ("proj_weight", "proj_bias", 1.0),
    ):
        t[w] = r(C, C, scale=s * C**-0.5)
        t[b] = 0.3 * r(C) if bias else None
    return t


def run(fn, inputs: dict, dtype, grad_out, num_heads, **kw):
    """fn(inputs in dtype) -> (output, {name: grad}) for every tensor input."""
    leaves = {
        k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()
    }
    out = fn(*(leaves[k] for k in NAMES), num_heads, EPS, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def check_against_reference(inputs, H, dtype, impl=triton_cross_attention, **kw):
    """Our op in `dtype` vs the float64 reference, by the 2x-of-PyTorch-in-`dtype` rule, for the
    output and every gradient (db_k must be exactly 0)."""
    B, C = inputs["cls"].shape
    grad_out = torch.randn(B, C, dtype=torch.float64, device=DEVICE)
    out64, g64 = run(ref_cross_attention, inputs, torch.float64, grad_out, H, **kw)
    out_t, g_t = run(ref_cross_attention, inputs, dtype, grad_out, H, **kw)
    out, grads = run(impl, inputs, dtype, grad_out, H, **kw)
    assert out.dtype == dtype
    assert_2x_rule(out, out_t, out64, "out")
    assert grads.keys() == g64.keys()
    # The dtype floor is taken relative to the op's largest gradient: a small gradient (dW_q,
    # say) is a difference of large terms (dz = a (da - sum a da)) and inherits their rounding.
    top = max(g.abs().max().item() for g in g64.values())
    for k, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[k].shape, k
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", scale=top)
    if "bk" in grads:
        assert (grads["bk"] == 0).all()
    return grads


SHAPES = [  # (B, N, C, H)
    (2, 0, 32, 4),  # N = 0: the CLS attends only to itself (stacked fusion blocks)
    (1, 1, 24, 3),  # one token; 3 heads of the minimum head dim 8
    (2, 2, 96, 3),  # width a multiple of 32 but not 64, head dim 32
    (1, 197, 32, 4),  # batch 1: the tokens are split over programs and merged (flash-decoding)
    (3, 400, 16, 2),  # 401 rows as CrossViT's branch 0, split path, non-power-of-2 row blocks
    (5, 33, 56, 7),  # 7 heads; batch >= the interpreter's pretend SM count: one program/sample
    (2, 5, 128, 1),  # a single head of the maximum head dim 128
    (4, 3, 256, 16),  # the maximum 16 heads: no padded head slot left
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("B,N,C,H", SHAPES)
def test_fp32_forward_backward(backend, B, N, C, H):
    impl = flat_args("cross_attention", served(backend, "cross_attention"))
    check_against_reference(make_inputs(B, N, C, H), H, torch.float32, impl=impl)


@pytest.mark.parametrize(
    "bias,affine,residual",
    [(False, True, True), (True, False, True), (True, True, False), (False, False, False)],
)
def test_fp32_optional_parts(bias, affine, residual):
    # biases / LayerNorm affine may be None (no gradient returned), residual=False for drop-path
    inputs = make_inputs(3, 9, 32, 2, bias=bias, affine=affine)
    grads = check_against_reference(inputs, 2, torch.float32, residual=residual)
    assert ("bq" in grads) == bias and ("norm_weight" in grads) == affine


def test_fp32_strided_views():
    # cls = seq[:, 0] (row stride 3C, as the model's y_i[:, 0]) and tokens with a non-unit
    # column stride: both read in place; gradients flow back through the views
    B, N, C, H = 2, 21, 32, 4
    inputs = make_inputs(B, N, C, H)
    grad_out = torch.randn(B, C, dtype=torch.float64, device=DEVICE)

    def run_strided(fn, dtype):
        seq = torch.randn(B, 3, C, dtype=dtype, device=DEVICE)
        seq[:, 0] = inputs["cls"]
        tok_t = inputs["tokens"].transpose(1, 2).to(dtype).contiguous()  # (B, C, 1 + N)
        seq.requires_grad_()
        tok_t.requires_grad_()
        params = [None if inputs[k] is None else inputs[k].to(dtype) for k in NAMES[2:]]
        cls, tokens = seq[:, 0], tok_t.transpose(1, 2)
        assert not cls.is_contiguous() and tokens.stride(2) == N + 1
        out = fn(cls, tokens, *params, H, EPS)
        out.backward(grad_out.to(dtype))
        assert (seq.grad[:, 1:] == 0).all()
        return out.detach(), (seq.grad[:, 0], tok_t.grad.transpose(1, 2))

    out64, g64 = run_strided(ref_cross_attention, torch.float64)
    out_t, g_t = run_strided(ref_cross_attention, torch.float32)
    out, g = run_strided(triton_cross_attention, torch.float32)
    assert_2x_rule(out, out_t, out64, "out")
    for name, a, t, r in zip(("dcls", "dtokens"), g, g_t, g64):
        assert_2x_rule(a, t, r, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,N,C,H", [(3, 37, 64, 4), (1, 197, 32, 2)])
def test_half_precision_2x_rule(backend, B, N, C, H, dtype):
    impl = flat_args("cross_attention", served(backend, "cross_attention"))
    check_against_reference(make_inputs(B, N, C, H, seed=1), H, dtype, impl=impl)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("cls_dtype", [torch.float32, torch.bfloat16])
def test_autocast(backend, cls_dtype):
    # Under autocast the GEMMs run in bf16, LayerNorm/softmax in fp32; the output dtype is the
    # reference's (timm's): the residual is the CLS as cat(cls, tokens) promotes it, so a bf16
    # cls (cls_proj's output, as cross_fusion passes it) with fp32 tokens gives an fp32 output.
    impl = flat_args("cross_attention", served(backend, "cross_attention"))
    dev = torch.device(DEVICE).type
    B, N, C, H = 3, 20, 32, 4
    inputs = make_inputs(B, N, C, H, seed=2)
    grad_out = torch.randn(B, C, dtype=torch.float64, device=DEVICE)
    out64, g64 = run(ref_cross_attention, inputs, torch.float64, grad_out, H)

    def run_autocast(fn):
        leaves = {k: None if v is None else v.float().requires_grad_() for k, v in inputs.items()}
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = fn(leaves["cls"].to(cls_dtype), *(leaves[k] for k in NAMES[1:]), H, EPS)
        out.backward(grad_out.to(out.dtype))
        return out.detach(), {k: v.grad for k, v in leaves.items() if v is not None}

    out_t, g_t = run_autocast(ref_cross_attention)
    out, grads = run_autocast(impl)
    assert out.dtype == out_t.dtype == torch.float32
    assert_2x_rule(out.float(), out_t.float(), out64, "out", floor=8e-3)
    for k, g in grads.items():
        assert g.dtype == torch.float32, k
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", floor=8e-3)


@pytest.mark.parametrize("B,N", [(1, 197), (4, 50)])
def test_backward_deterministic(B, N):
    # split partials (B = 1) and per-sample partials (B = 4) are reduced in a fixed order
    inputs = make_inputs(B, N, 32, 4, seed=3)
    grad_out = torch.randn(B, 32, dtype=torch.float64, device=DEVICE)
    _, g1 = run(triton_cross_attention, inputs, torch.float32, grad_out, 4)
    _, g2 = run(triton_cross_attention, inputs, torch.float32, grad_out, 4)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_batch_zero():
    inputs = make_inputs(0, 5, 32, 4)
    out, grads = run(
        triton_cross_attention,
        inputs,
        torch.float32,
        torch.zeros(0, 32, dtype=torch.float64, device=DEVICE),
        4,
    )
    assert out.shape == (0, 32)
    assert grads["tokens"].shape == (0, 6, 32)
    for k in NAMES[2:]:
        assert grads[k].shape == inputs[k].shape and (grads[k] == 0).all(), k


@pytest.mark.parametrize(
    "C,changes,match",
    [
        (32, {"cls": torch.randn(2, 32, dtype=torch.float64)}, "dtype"),
        (32, {"num_heads": 3}, "not divisible"),
        (32, {"num_heads": 8}, "head dim"),  # d = 4 < 8
        (256, {"num_heads": 1}, "head dim"),  # d = 256 > 128
        (136, {"num_heads": 17}, "num_heads"),  # d = 8 but 17 > 16 heads
        (32, {"cls": torch.randn(2, 1, 32)}, "cls: expected 2 dims"),
        (32, {"tokens": torch.randn(2, 4, 16)}, "tokens: expected shape"),
        (32, {"tokens": torch.randn(2, 0, 32)}, "tokens: expected shape"),
        (32, {"tokens": torch.randn(3, 4, 32)}, "tokens: expected shape"),
        (32, {"wq": torch.randn(32, 16)}, "wq: expected shape"),
        (32, {"norm_bias": torch.randn(16)}, "norm_bias: expected shape"),
        (32, {"wv": None}, "wv: expected a tensor"),
        (32, {"tokens": torch.randn(2, 4, 32, dtype=torch.bfloat16)}, "tokens: expected dtype"),
    ],
)
def test_errors(C, changes, match):
    inputs = {k: None if v is None else v.float() for k, v in make_inputs(2, 3, C, 4).items()}
    heads = changes.pop("num_heads", 4)
    inputs.update({k: v.to(DEVICE) if v is not None else v for k, v in changes.items()})
    with pytest.raises(ValueError, match=match):
        triton_cross_attention(*(inputs[k] for k in NAMES), heads, EPS)


def test_opcheck():
    inputs = make_inputs(2, 3, 16, 2)
    args = [None if inputs[k] is None else inputs[k].float().requires_grad_() for k in NAMES]
    torch.library.opcheck(torch.ops.crossvit_fast.cross_attention.default, (*args, 2, EPS, True))
    # the backward op on its own (inputs that need no grad)
    outs = torch.ops.crossvit_fast.cross_attention(*(a.detach() for a in args), 2, EPS, True)
    d = [a.detach() for a in args]
    torch.library.opcheck(
        torch.ops.crossvit_fast.cross_attention_backward.default,
        (
            torch.randn(2, 16, device=DEVICE),
            d[0],
            d[1],
            d[2],
            d[4],
            d[6],
            d[8],
            d[10],
            *outs[1:],
            2,
            EPS,
            True,
        ),
    )


def test_torch_compile_fullgraph():
    # On CPU the interpreted op is opaque to the compiler (see register_op); fullgraph=True
    # proves there is no graph break. The GPU test below lets Inductor see the kernels.
    inputs = make_inputs(3, 10, 32, 4)
    grad_out = torch.randn(3, 32, dtype=torch.float64, device=DEVICE)
    compiled = torch.compile(triton_cross_attention, fullgraph=True, backend="aot_eager")
    out_c, g_c = run(compiled, inputs, torch.float32, grad_out, 4)
    out_e, g_e = run(triton_cross_attention, inputs, torch.float32, grad_out, 4)
    torch.testing.assert_close(out_c, out_e)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k])


def test_split_plan_h100(monkeypatch):
    # The H100 has 132 SMs: batch >= 132 gives one program per sample; smaller batches split
    # each sample's 1 + N rows (the CLS row and the tokens) so that ~2 programs per SM run;
    # every split is non-empty.
    monkeypatch.setattr(rows_mod, "sm_count", lambda device: 132)
    dev = torch.device("cuda")
    assert rows_mod.split_plan(256, 197, 16, dev) == (1, 208)
    for B, N in ((1, 196), (1, 8192), (64, 400), (8, 1156), (131, 196), (1, 0), (2, 1)):
        S, rows = rows_mod.split_plan(B, 1 + N, 16, dev)
        assert rows % 16 == 0 and S * rows >= 1 + N > (S - 1) * rows, (B, N)
        assert max(1, 2 * 132 // B + 1) >= S and (N < 64 or B >= 132 or S > 1), (B, N, S)


# -- GPU tier: the real shapes of CrossViT's fusion blocks, tensor-core dtypes, Inductor -----------

GPU_SHAPES = [  # (B, N, C, H)
    (8, 196, 448, 7),  # crossvit_18 fusion[0]: branch 1's tokens, head dim 64
    (2, 400, 224, 7),  # crossvit_18 fusion[1]: branch 0's tokens, head dim 32, split path
    (3, 576, 768, 12),  # crossvit_base-like width at the 408 models' 577 tokens
    (1, 1156, 192, 6),  # crossvit_15_dagger_408 fusion[1], batch 1
    (200, 196, 384, 6),  # batch > #SMs: one program per sample
]


@gpu_tier()
@pytest.mark.parametrize("B,N,C,H", GPU_SHAPES)
def test_gpu_real_shapes(backend, B, N, C, H, dtype):
    impl = flat_args("cross_attention", served(backend, "cross_attention"))
    check_against_reference(make_inputs(B, N, C, H, seed=4), H, dtype, impl=impl)


@pytest.mark.gpu
def test_gpu_inductor_sees_kernels():
    inputs = make_inputs(4, 196, 448, 7)
    grad_out = torch.randn(4, 448, dtype=torch.float64, device=DEVICE)
    compiled = torch.compile(triton_cross_attention, fullgraph=True)
    out_c, g_c = run(compiled, inputs, torch.bfloat16, grad_out, 7)
    out_e, g_e = run(triton_cross_attention, inputs, torch.bfloat16, grad_out, 7)
    torch.testing.assert_close(out_c, out_e, rtol=2e-2, atol=2e-2)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k], rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
def test_gpu_width_limit():
    C = 1152  # 16 heads of 72: valid head shape, but over the GPU kernels' shared-memory budget
    inputs = make_inputs(1, 2, C, 16)
    with pytest.raises(ValueError, match="C <= 1024"):
        triton_cross_attention(
            *(None if inputs[k] is None else inputs[k].float() for k in NAMES), 16, EPS
        )


@pytest.mark.gpu
def test_gpu_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    inputs = {
        k: None if v is None else v.to("cuda:1") for k, v in make_inputs(2, 50, 64, 4).items()
    }
    out = triton_cross_attention(
        *(None if inputs[k] is None else inputs[k].float() for k in NAMES), 4, EPS
    )
    ref = ref_cross_attention(*(inputs[k] for k in NAMES), 4, EPS)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
