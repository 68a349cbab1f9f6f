"""ViT-block ops at CrossViT's real shapes: the fused `mlp`, `self_attention` and the final
`layer_norm`, Triton vs the reference eager vs the reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_mlp.py --benchmark-only -s` (`-k crossvit_18` for one
model). Each case times forward and forward + backward of all three implementations in the same
run (CUDA events, median with p20 / p80), prints a table row per implementation and appends it to
the extra_info and the end-of-session table through `harness.record` (a results file only when
CROSSVIT_BENCH_RESULTS names one). pytest-benchmark's own table shows the
Triton forward + backward.

FLOP formulas (M = batch * tokens rows, C = width, Hd = hidden, N = tokens, B = batch):
  mlp            forward 4*M*C*Hd (fc1 + fc2); backward 2x forward (dgrad + wgrad per GEMM).
  self_attention forward 8*M*C^2 (qkv 6*M*C^2 + proj 2*M*C^2) + 4*B*N^2*C (QK^T and PV);
                 backward 2x the GEMM FLOPs + 2.5x the attention FLOPs (flash backward).
  layer_norm     memory bound: forward reads x and writes y (2*M*C elements), backward reads x,
                 dy and writes dx (3*M*C elements); reported as GB/s.
Goal (issue 4, H100, bf16, crossvit_18 batch 256): mlp forward + backward >= 1.25x the reference
eager and >= 1.05x the compiled reference.
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
TOKENS = (401, 197)  # branch 0 (240 px, patch 12) and branch 1 (224 px, patch 16), CLS included
BATCHES = (64, 256)
DTYPE = torch.bfloat16
EPS = 1e-6
CASES = [
    pytest.param(m, br, b, id=f"{m}-branch{br}-b{b}")
    for m, br, b in itertools.product(MODELS, (0, 1), BATCHES)
]


def _impls(op: str) -> dict:
    """reference eager, reference under torch.compile, and the Triton backend's op (from the
    backend table, so the benchmark times exactly what the model runs)."""
    from crossvit_fast.ops import reference
    from crossvit_fast.ops import triton as triton_backend

    ref = getattr(reference, op)
    return {
        "reference": ref,
        "reference_compiled": torch.compile(ref, fullgraph=True, dynamic=False),
        "triton": triton_backend.ops()[op],
    }


def _time_pass(fn, args, grad_inputs, backward: bool) -> dict:
    if not backward:

        def run():
            with torch.no_grad():
                fn(*args)
    else:
        grad = torch.randn_like(fn(*args))

        def run():
            torch.autograd.grad(fn(*args), grad_inputs, grad)

    return harness.time_ms(run, "cuda"), run


def _bench(benchmark, op: str, case: dict, args: list, grad_inputs: list, flops: dict | None,
           bytes_: dict | None) -> None:  # fmt: skip
    peaks = harness.device_peaks()
    rows = {}
    triton_run = None
    for name, fn in _impls(op).items():
        for pass_ in ("fwd", "fwd+bwd"):
            t, run = _time_pass(fn, args, grad_inputs, backward=pass_ == "fwd+bwd")
            row = {"op": op, **case, "dtype": str(DTYPE).replace("torch.", ""), "pass": pass_,
                   "impl": name, **t}  # fmt: skip
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
        print(f"{op:15s} {case} {pass_:8s} {name:19s} {row['median_ms']:8.3f} ms "
              f"[{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] {rate} "
              f"x{row['speedup_vs_eager']:.2f} eager x{row['speedup_vs_compiled']:.2f} compiled")  # fmt: skip
    benchmark.pedantic(lambda: (triton_run(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


def _param(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(DTYPE).requires_grad_()


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_mlp(benchmark, model, branch, batch):
    widths, ratio = MODELS[model][:2], MODELS[model][2]
    C, N = widths[branch], TOKENS[branch]
    Hd = C * ratio
    M = batch * N
    x = _param(batch, N, C)
    params = [_param(C, scale=0.1) + 1, _param(C, scale=0.1), _param(Hd, C, scale=C**-0.5), _param(Hd, scale=0.1),
              _param(C, Hd, scale=Hd**-0.5), _param(C, scale=0.1)]  # fmt: skip
    params = [p.detach().requires_grad_() for p in params]
    fwd = 4 * M * C * Hd
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C, "hidden": Hd}
    _bench(
        benchmark,
        "mlp",
        case,
        [x, *params, EPS],
        [x, *params],
        {"fwd": fwd, "fwd+bwd": 3 * fwd},
        None,
    )


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_self_attention(benchmark, model, branch, batch):
    widths, heads = MODELS[model][:2], MODELS[model][3]
    C, N = widths[branch], TOKENS[branch]
    M = batch * N
    x = _param(batch, N, C)
    params = [_param(C, scale=0.1) + 1, _param(C, scale=0.1), _param(3 * C, C, scale=C**-0.5), _param(3 * C, scale=0.1),
              _param(C, C, scale=C**-0.5), _param(C, scale=0.1)]  # fmt: skip
    params = [p.detach().requires_grad_() for p in params]
    gemm, attn = 8 * M * C * C, 4 * batch * N * N * C
    flops = {"fwd": gemm + attn, "fwd+bwd": 3 * gemm + 3.5 * attn}
    case = {
        "model": model,
        "branch": branch,
        "batch": batch,
        "tokens": N,
        "width": C,
        "heads": heads,
    }
    _bench(benchmark, "self_attention", case, [x, *params, heads, EPS], [x, *params], flops, None)


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_layer_norm(benchmark, model, branch, batch):
    C, N = MODELS[model][branch], TOKENS[branch]
    M = batch * N
    x = _param(batch, N, C)
    w, b = (_param(C, scale=0.1) + 1).detach().requires_grad_(), _param(C, scale=0.1)
    e = torch.finfo(DTYPE).bits // 8
    bytes_ = {"fwd": 2 * M * C * e, "fwd+bwd": 5 * M * C * e}
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C}
    _bench(benchmark, "layer_norm", case, [x, w, b, EPS], [x, w, b], None, bytes_)
