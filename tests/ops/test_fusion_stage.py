"""`fusion_stage` (crossvit_fast.ops.triton.fusion_stage: every fusion step of a stage and the
token re-assembly under one autograd node) against the reference op, forward and every gradient;
bitwise against the Triton ops composed by autograd (fp32); the autograd plumbing it removes.

CPU: Triton's interpreter at tiny widths; GPU tier: crossvit_18's stage shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from crossvit_fast import backends
from crossvit_fast.backends import fusion_params
from crossvit_fast.ops import reference
from crossvit_fast.ops.triton.cross_fusion import cross_fusion as triton_cross_fusion
from crossvit_fast.ops.triton.fusion_stage import fusion_stage as triton_fusion_stage

from ..conftest import DEVICE
from ..numerics import assert_2x_rule
from . import KERNEL_BACKENDS, gpu_tier, served
from .test_cls_proj import EPS, run
from .test_cross_fusion import FUSION, fusion_inputs


def stage_inputs(B, Ns, Cs, *, seed=0) -> dict:
    """ys y0.. (B, 1 + N_i, C_i) and fusion i's 18 parameters as f{i}_<FUSION name>, fusion i
    taking branch i's CLS (width C_i) to branch j = i + 1's width and back."""
    nb, t = len(Cs), {}
    for i in range(nb):
        j = (i + 1) % nb
        f = fusion_inputs(B, Ns[j], Cs[i], Cs[j], seed=seed + i)
        t.update({f"f{i}_{k}": v for k, v in f.items() if k not in ("cls", "tokens")})
    g = torch.Generator().manual_seed(seed + 100)
    for i, (n, c) in enumerate(zip(Ns, Cs)):
        y = torch.randn(B, n + 1, c, generator=g, dtype=torch.float64) * (1 + torch.rand(c))
        t[f"y{i}"] = y.to(DEVICE)
    return t


def names(nb: int) -> tuple:
    return (*(f"y{i}" for i in range(nb)), *(f"f{i}_{k}" for i in range(nb) for k in FUSION[2:]))


def flat(impl, nb: int, heads, cls_only=False):
    """impl (the table's signature) over flat leaves, the outputs as one (B, ...) tensor."""

    def fn(*leaves):
        ys, ps = leaves[:nb], leaves[nb:]
        params = [fusion_params(ps[i * 18 : (i + 1) * 18]) for i in range(nb)]
        outs = impl(list(ys), params, list(heads), EPS, cls_only)
        return torch.cat([o.flatten(1) for o in outs], dim=1)

    return fn


def composed(ys, params, heads, eps, cls_only=False):
    """The stage as the model ran it before the op: Triton cross_fusion per branch + cat."""
    return reference.fusion_stage(ys, params, heads, eps, cls_only, fuse=triton_cross_fusion)


# (B, Ns, Cs, heads): heads[i] is fusion i's, the attended branch (i + 1)'s head count
CASES = [
    (3, (12, 5), (32, 64), (4, 2)),  # crossvit's two branches, widening then narrowing
    (2, (7,), (32,), (2,)),  # one branch: it fuses with itself
    (2, (4, 9, 3), (16, 32, 48), (2, 3, 2)),  # three branches, a ring of fusions
]


def _check(impl, B, Ns, Cs, heads, dtype, cls_only, autocast=False):
    nb = len(Cs)
    inputs = stage_inputs(B, Ns, Cs)
    out_shape = (B, sum(c * (1 if cls_only else n + 1) for n, c in zip(Ns, Cs)))
    grad_out = torch.randn(*out_shape, dtype=torch.float64, device=DEVICE)
    ref, ours = flat(reference.fusion_stage, nb, heads, cls_only), flat(impl, nb, heads, cls_only)
    out64, g64 = run(ref, names(nb), inputs, torch.float64, grad_out)
    out_t, g_t = run(ref, names(nb), inputs, dtype, grad_out, autocast=autocast)
    out, grads = run(ours, names(nb), inputs, dtype, grad_out, autocast=autocast)
    assert out.dtype == out_t.dtype and out.shape == out64.shape
    floor = 8e-3 if autocast else None  # None: the dtype's default floor (tests/numerics.py)
    assert_2x_rule(out, out_t, out64, "out", floor=floor)
    assert grads.keys() == g64.keys()
    top = max(g.abs().max().item() for g in g64.values())
    for k, g in grads.items():
        assert g.dtype == dtype and g.shape == inputs[k].shape, k
        assert_2x_rule(g, g_t[k], g64[k], f"d{k}", floor=floor, scale=top)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("cls_only", [False, True])
@pytest.mark.parametrize("B,Ns,Cs,heads", CASES)
def test_fusion_stage_fp32(backend, B, Ns, Cs, heads, cls_only):
    _check(served(backend, "fusion_stage"), B, Ns, Cs, heads, torch.float32, cls_only)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fusion_stage_half_precision(dtype):
    _check(triton_fusion_stage, 2, (6, 3), (32, 64), (4, 2), dtype, False)


@pytest.mark.parametrize("cls_only", [False, True])
def test_fusion_stage_autocast(cls_only):
    _check(triton_fusion_stage, 2, (6, 3), (32, 64), (4, 2), torch.float32, cls_only, True)


@pytest.mark.parametrize("cls_only", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_fusion_stage_equals_composed_ops(cls_only, autocast):
    # Same kernels in the same order; the token gradient's parts are summed by the kernel
    # instead of autograd's adds, the same fp32 additions: bitwise equal.
    B, Ns, Cs, heads = CASES[0]
    inputs = stage_inputs(B, Ns, Cs, seed=3)
    out_shape = (B, sum(c * (1 if cls_only else n + 1) for n, c in zip(Ns, Cs)))
    grad_out = torch.randn(*out_shape, dtype=torch.float64, device=DEVICE)
    a = run(flat(triton_fusion_stage, 2, heads, cls_only), names(2), inputs, torch.float32,
            grad_out, autocast=autocast)  # fmt: skip
    b = run(flat(composed, 2, heads, cls_only), names(2), inputs, torch.float32, grad_out,
            autocast=autocast)  # fmt: skip
    assert torch.equal(a[0], b[0])
    for k in b[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def test_fusion_stage_no_token_gradient_plumbing():
    # The composed ops make each branch's token gradient from a select_backward (memset), a
    # slice_backward and two adds of (B, 1 + N, C) tensors; the stage op writes it once.
    B, Ns, Cs, heads = CASES[0]
    inputs = stage_inputs(B, Ns, Cs)
    plumbing = ("aten::select_backward", "aten::slice_backward", "aten::add")

    def backward_ops(impl):
        leaves = [inputs[k].float().requires_grad_() for k in names(2)]
        out = flat(impl, 2, heads)(*leaves)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out.backward(torch.ones_like(out))
        token_shapes = {(B, n + 1, c) for n, c in zip(Ns, Cs)}
        return [
            e.name
            for e in prof.events()
            if e.name in plumbing and any(tuple(s) in token_shapes for s in e.input_shapes if s)
        ]

    assert backward_ops(composed)  # the check can fail: the composed ops do have them
    assert backward_ops(triton_fusion_stage) == []


def test_fusion_stage_errors():
    B, Ns, Cs, _ = CASES[0]
    inputs = stage_inputs(B, Ns, Cs)
    ys = [inputs["y0"].float(), inputs["y1"].float()]
    params = [fusion_params([inputs[f"f0_{k}"] for k in FUSION[2:]])]
    for impl in (triton_fusion_stage, reference.fusion_stage):
        with pytest.raises(ValueError, match="one params group and one head count per branch"):
            impl(ys, params, [4], EPS)
    with pytest.raises(ValueError, match=r"expected \(B, 1 \+ N, C\) tensors of one batch size"):
        triton_fusion_stage([ys[0], ys[1][:2]], params * 2, [4, 2], EPS)


def test_fusion_stage_compile_fullgraph():
    B, Ns, Cs, heads = CASES[0]
    inputs = stage_inputs(B, Ns, Cs)
    grad_out = torch.randn(B, sum(c * (n + 1) for n, c in zip(Ns, Cs)), dtype=torch.float64)
    fn = flat(triton_fusion_stage, 2, heads)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_c, g_c = run(compiled, names(2), inputs, torch.float32, grad_out.to(DEVICE))
    out_e, g_e = run(fn, names(2), inputs, torch.float32, grad_out.to(DEVICE))
    torch.testing.assert_close(out_c, out_e)
    for k in g_e:
        torch.testing.assert_close(g_c[k], g_e[k])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_step_through_the_stage_op(checkpointing):
    # Two stages: the first's fusion_stage re-assembles the token tensors, the last's returns
    # the CLS rows; with grad checkpointing the stage op is recomputed in backward. Output and
    # every gradient as the reference backend's model with the same weights.
    from crossvit_fast import CrossViT

    from ..conftest import SMALL_KWARGS, tiny_config

    cfg = tiny_config(**SMALL_KWARGS).replace(depth=((1, 1, 0), (1, 1, 0)), num_classes=5)
    torch.manual_seed(0)
    models = [CrossViT(cfg, backend=b).train() for b in ("reference", "triton")]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(2, 3, 48, 48)
    results = []
    for m in models:
        m.set_grad_checkpointing(checkpointing)
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in m.parameters()]))
    (o0, gx0, gp0), (o1, gx1, gp1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-6)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_backend_table_serves_fusion_stage():
    ops = backends.resolve("triton", torch.device(DEVICE).type)
    assert ops.sources["fusion_stage"] == "triton"


# -- GPU tier ---------------------------------------------------------------------------------------


@gpu_tier([torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B", [64, 1])
def test_gpu_fusion_stage_real_shapes(backend, B, dtype):
    # crossvit_18_240's stage: branches (401 tokens, 224 wide), (197, 448); 7 heads each
    _check(served(backend, "fusion_stage"), B, (400, 196), (224, 448), (7, 7), dtype, False)
