"""The fused `mlp` op (ViT block MLP half) at CrossViT's real shapes: Triton vs the reference
eager vs the reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_mlp.py --benchmark-only -s` (`-k crossvit_18` for one model).
Each case times forward and forward + backward of all three implementations in the same run (CUDA
events, median with p20 / p80), prints a table row per implementation and appends it to
the extra_info and the end-of-session table through `harness.record` (benchmarks/op_bench.py;
a results file only when CROSSVIT_BENCH_RESULTS names one). pytest-
benchmark's own table shows the Triton forward + backward.

FLOPs (M = batch * tokens rows, C = width, Hd = hidden): forward 4*M*C*Hd (fc1 + fc2); backward
2x forward (dgrad + wgrad per GEMM).
Goal (H100, bf16, crossvit_18 batch 256): forward + backward >= 1.25x the reference eager and
>= 1.05x the compiled reference.
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, TOKENS, bench, block_params, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_mlp(benchmark, model, branch, batch):
    widths, ratio = MODELS[model][:2], MODELS[model][2]
    C, N = widths[branch], TOKENS[branch]
    Hd = C * ratio
    M = batch * N
    x = param(batch, N, C)
    params = block_params(C, Hd, Hd)
    fwd = 4 * M * C * Hd
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C, "hidden": Hd}
    bench(
        benchmark,
        "mlp",
        case,
        [x, *params, EPS],
        [x, *params],
        {"fwd": fwd, "fwd+bwd": 3 * fwd},
        None,
    )
