"""The `self_attention` op (ViT block attention half) at CrossViT's real shapes: Triton vs the
reference eager vs the reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_self_attention.py --benchmark-only -s` (`-k crossvit_18` for one model).
Each case times forward and forward + backward of all three implementations in the same run (CUDA
events, median with p20 / p80), prints a table row per implementation and appends it to
benchmarks/results/<device>.json through `harness.record` (benchmarks/op_bench.py). pytest-
benchmark's own table shows the Triton forward + backward.

FLOPs (M = batch * tokens rows, C = width, N = tokens, B = batch): forward 8*M*C^2 (qkv 6*M*C^2
+ proj 2*M*C^2) + 4*B*N^2*C (QK^T and PV); backward 2x the GEMM FLOPs + 2.5x the attention
FLOPs (flash backward).
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, TOKENS, bench, block_params, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_self_attention(benchmark, model, branch, batch):
    widths, heads = MODELS[model][:2], MODELS[model][3]
    C, N = widths[branch], TOKENS[branch]
    M = batch * N
    x = param(batch, N, C)
    params = block_params(C, 3 * C, C)
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
    bench(benchmark, "self_attention", case, [x, *params, heads, EPS], [x, *params], flops, None)
