"""One CrossViT fusion step (`cross_fusion` = cls_proj -> CLS cross-attention -> cls_proj) at the
real shapes: Triton (K/V-free) vs the reference eager vs the reference under torch.compile, bf16.

Run on a GPU: `pytest benchmarks/bench_cross_fusion.py --benchmark-only -s` (`-k crossvit_18`
for one model). Each case times the forward, the backward alone (repeated on one retained
graph) and forward + backward of all three implementations in the same run (CUDA events, median
with p20 / p80), prints one row per (implementation, pass) and appends it to
the extra_info and the end-of-session table through `harness.record` (a results file only when
CROSSVIT_BENCH_RESULTS names one). pytest-benchmark's own table shows the
Triton forward + backward.

Roofline: the step is bound by the token tensor of the other branch (B, 1 + N, C). Reading it once
is bytes = B * N * C * elem_size; the forward needs that once, the backward reads it once more
and writes d tokens once (2x), forward + backward 3x. Reported as GB/s and % of the device's HBM
bandwidth (harness.PEAKS).

Goals (H100, bf16, crossvit_18, batch 256, both fusion directions): forward + backward
>= 8x the reference eager and >= 3x the compiled reference; forward >= 60% of HBM bandwidth.
"""

from __future__ import annotations

import itertools

import harness
import pytest
import torch

from crossvit_fast.backends import fusion_params

# CrossViT variants: (width, heads) of branch 0 and branch 1, and (N0, N1) patch tokens.
_240 = (400, 196)  # 240 px with patch 12 -> 20 x 20; 224 px with patch 16 -> 14 x 14
_408 = (1156, 576)  # 408 px / 12 -> 34 x 34; 384 px / 16 -> 24 x 24
MODELS = {
    "crossvit_9": ((128, 4), (256, 4), _240),
    "crossvit_15": ((192, 6), (384, 6), _240),
    "crossvit_18": ((224, 7), (448, 7), _240),
    "crossvit_base": ((384, 12), (768, 12), _240),
    "crossvit_15_dagger_408": ((192, 6), (384, 6), _408),
    "crossvit_18_dagger_408": ((224, 7), (448, 7), _408),
}
BATCHES = (1, 64, 256)
DTYPE = torch.bfloat16
EPS = 1e-6
# fusion[i]: branch i's CLS attends over branch j = 1 - i's tokens (width, heads of branch j)
CASES = [
    pytest.param(m, i, b, id=f"{m}-fusion{i}-b{b}")
    for m, i, b in itertools.product(MODELS, (0, 1), BATCHES)
]
PASSES = ("fwd", "bwd", "fwd+bwd")
TOKEN_PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}  # token-tensor traffic in units of B*N*C


def _impls() -> dict:
    """reference eager, reference under torch.compile, and the Triton backend's cross_fusion
    (from the backend table: exactly what the model runs)."""
    from crossvit_fast.ops import reference
    from crossvit_fast.ops import triton as triton_backend

    return {
        "reference": reference.cross_fusion,
        "reference_compiled": torch.compile(reference.cross_fusion, fullgraph=True, dynamic=False),
        "triton": triton_backend.ops()["cross_fusion"],
    }


def _param(*shape, scale=1.0, offset=0.0):
    return (torch.randn(*shape, device="cuda") * scale + offset).to(DTYPE).requires_grad_()


def _inputs(c_i: int, n_i: int, c_j: int, n_j: int, batch: int) -> tuple[list, list]:
    """(args after num_heads / eps are appended, tensors to differentiate). The CLS is passed
    as the model does: y_i[:, 0], a strided view of branch i's token tensor."""
    y_i = _param(batch, 1 + n_i, c_i)
    tokens = _param(batch, 1 + n_j, c_j)
    params = []
    for c_in, c_out in ((c_i, c_j), (None, None), (c_j, c_i)):
        if c_in is None:  # the cross-attention block at width c_j
            params += [_param(c_j, scale=0.1, offset=1.0), _param(c_j, scale=0.1)]
            for _ in range(4):  # wq, wk, wv, proj
                params += [_param(c_j, c_j, scale=c_j**-0.5), _param(c_j, scale=0.1)]
        else:  # projs / revert_projs: LayerNorm, Linear
            params += [
                _param(c_in, scale=0.1, offset=1.0),
                _param(c_in, scale=0.1),
                _param(c_out, c_in, scale=c_in**-0.5),
                _param(c_out, scale=0.1),
            ]
    return [y_i[:, 0], tokens, fusion_params(params)], [y_i, tokens, *params]


def _runner(fn, args: list, grad_inputs: list, pass_: str):
    if pass_ == "fwd":

        def run():
            with torch.no_grad():
                fn(*args)

        return run
    out = fn(*args)
    grad = torch.randn_like(out)
    if pass_ == "bwd":  # backward alone, repeated on one retained graph
        return lambda: torch.autograd.grad(out, grad_inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*args), grad_inputs, grad)


@pytest.mark.parametrize("model, fusion, batch", CASES)
def test_bench_cross_fusion(benchmark, model, fusion, batch):
    (c0, h0), (c1, h1), (n0, n1) = MODELS[model]
    widths, heads, tokens = (c0, c1), (h0, h1), (n0, n1)
    i, j = fusion, 1 - fusion
    c_i, c_j, n_i, n_j = widths[i], widths[j], tokens[i], tokens[j]
    args, grad_inputs = _inputs(c_i, n_i, c_j, n_j, batch)
    args += [heads[j], EPS]
    token_bytes = batch * n_j * c_j * torch.finfo(DTYPE).bits // 8
    case = {
        "model": model,
        "fusion": fusion,
        "batch": batch,
        "cls_width": c_i,
        "width": c_j,
        "tokens": n_j + 1,
        "heads": heads[j],
    }
    hbm = harness.device_peaks().get("hbm_gbs")
    rows, triton_run = {}, None
    for name, fn in _impls().items():
        for pass_ in PASSES:
            run = _runner(fn, args, grad_inputs, pass_)
            t = harness.time_ms(run, "cuda")
            gbs = TOKEN_PASSES[pass_] * token_bytes / (t["median_ms"] * 1e-3) / 1e9
            row = {
                "op": "cross_fusion",
                **case,
                "dtype": str(DTYPE).replace("torch.", ""),
                "pass": pass_,
                "impl": name,
                **t,
                "gbs": gbs,
            }
            if hbm:
                row["pct_hbm_peak"] = 100 * gbs / hbm
            rows[(name, pass_)] = row
            if name == "triton" and pass_ == "fwd+bwd":
                triton_run = run
    harness.add_speedups(rows)
    for (name, pass_), row in rows.items():
        harness.record("cross_fusion", row)
        pct = f" ({row['pct_hbm_peak']:5.1f}% HBM)" if hbm else ""
        print(
            f"cross_fusion {model} fusion{fusion} b{batch} {pass_:8s} {name:19s} "
            f"{row['median_ms']:8.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] "
            f"{row['gbs']:7.0f} GB/s{pct} x{row['speedup_vs_eager']:.2f} eager "
            f"x{row['speedup_vs_compiled']:.2f} compiled"
        )
    if model == "crossvit_18" and batch == 256:
        fb, fwd = rows[("triton", "fwd+bwd")], rows[("triton", "fwd")]
        print(
            f"goals crossvit_18 b256 fusion{fusion}: fwd+bwd x{fb['speedup_vs_eager']:.2f} eager "
            f"(>= 8), x{fb['speedup_vs_compiled']:.2f} compiled (>= 3), forward "
            f"{fwd.get('pct_hbm_peak', float('nan')):.0f}% of HBM (>= 60)"
        )
    benchmark.pedantic(lambda: (triton_run(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
