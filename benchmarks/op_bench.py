"""Shared by the per-op benchmarks (bench_mlp.py, bench_self_attention.py, bench_layer_norm.py,
bench_patch_embed.py, bench_token_assemble.py, bench_cross_attention.py, bench_cls_proj.py,
bench_fusion_stage.py): CrossViT's shapes, the three implementations
timed (reference eager, reference compiled, the Triton op from the backend table), one table row
per (implementation, pass). Not a benchmark module itself (pytest collects bench_*.py only).
"""

from __future__ import annotations

import itertools

import harness
import pytest
import torch

# CrossViT variants: (width of branch 0, width of branch 1, mlp_ratio, heads).
MODELS = {
    "crossvit_9": (128, 256, 3, 4),
    "crossvit_15": (192, 384, 3, 6),
    "crossvit_18": (224, 448, 3, 7),
    "crossvit_base": (384, 768, 4, 12),
}
BRANCHES = ((240, 12), (224, 16))  # (image size, patch) of branch 0 and 1
TOKENS = (401, 197)  # branch 0 (240 px, patch 12) and branch 1 (224 px, patch 16), CLS included
BATCHES = (64, 256)
DTYPE = torch.bfloat16
EPS = 1e-6
CASES = [
    pytest.param(m, br, b, id=f"{m}-branch{br}-b{b}")
    for m, br, b in itertools.product(MODELS, (0, 1), BATCHES)
]


def impls(op: str, flat=None) -> dict:
    """reference eager, reference under torch.compile, and the Triton backend's op (from the
    backend table, so the benchmark times exactly what the model runs). `flat(op_fn)`: how the
    case's flat arguments reach the op (default `flat_args`)."""
    from crossvit_fast.backends import flat_args
    from crossvit_fast.ops import reference
    from crossvit_fast.ops import triton as triton_backend

    ref = getattr(reference, op)
    impls = {
        "reference": ref,
        "reference_compiled": torch.compile(ref, fullgraph=True, dynamic=False),
        "triton": triton_backend.ops()[op],
    }
    # the cases list an op's parameters flat (grad_inputs are those same leaves)
    flat = (lambda fn: flat_args(op, fn)) if flat is None else flat
    return {name: flat(fn) for name, fn in impls.items()}


def time_pass(fn, args, grad_inputs, backward: bool) -> dict:
    if not backward:

        def run():
            with torch.no_grad():
                fn(*args)
    else:
        grad = torch.randn_like(fn(*args))

        def run():
            torch.autograd.grad(fn(*args), grad_inputs, grad)

    return harness.time_ms(run, "cuda"), run


def bench(
    benchmark,
    op: str,
    case: dict,
    args: list,
    grad_inputs: list,
    flops: dict | None,
    bytes_: dict | None,
    flat=None,
) -> None:
    peaks = harness.device_peaks()
    rows = {}
    triton_run = None
    for name, fn in impls(op, flat).items():
        for pass_ in ("fwd", "fwd+bwd"):
            t, run = time_pass(fn, args, grad_inputs, backward=pass_ == "fwd+bwd")
            row = {
                "op": op,
                **case,
                "dtype": str(DTYPE).replace("torch.", ""),
                "pass": pass_,
                "impl": name,
                **t,
            }
            sec = t["median_ms"] * 1e-3
            if flops is not None:
                row["tflops"] = flops[pass_] / sec / 1e12
                if peaks:
                    row["pct_bf16_peak"] = 100 * row["tflops"] / peaks["bf16_tflops"]
            if bytes_ is not None:
                row["gbs"] = bytes_[pass_] / sec / 1e9
                if peaks:
                    row["pct_hbm_peak"] = 100 * row["gbs"] / peaks["hbm_gbs"]
            rows[(name, pass_)] = row
            if name == "triton" and pass_ == "fwd+bwd":
                triton_run = run
    harness.add_speedups(rows)
    for (name, pass_), row in rows.items():
        harness.record(op, row)
        rate = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else f"{row['gbs']:7.0f} GB/s"
        print(
            f"{op:15s} {case} {pass_:8s} {name:19s} {row['median_ms']:8.3f} ms "
            f"[{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] {rate} "
            f"x{row['speedup_vs_eager']:.2f} eager x{row['speedup_vs_compiled']:.2f} compiled"
        )
    benchmark.pedantic(lambda: (triton_run(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


def param(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_()


def block_params(C: int, h1: int, h2: int) -> list:
    """A ViT block half's weights, as leaf tensors: a LayerNorm's affine (C,), a Linear C -> h1
    and a Linear h2 -> C with biases (mlp: h1 = h2 = hidden; self_attention: h1 = 3C, h2 = C)."""
    params = [param(C, scale=0.1) + 1, param(C, scale=0.1)]
    params += [param(h1, C, scale=C**-0.5), param(h1, scale=0.1)]
    params += [param(C, h2, scale=h2**-0.5), param(C, scale=0.1)]
    return [p.detach().requires_grad_() for p in params]
