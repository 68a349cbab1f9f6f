"""The `block` op (a whole ViT block: attention half, then MLP half) at CrossViT's real shapes:
Triton vs the reference eager vs the reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_block.py --benchmark-only -s` (`-k crossvit_18` for one model).
Each case times forward and forward + backward of all three implementations in the same run (CUDA
events, median with p20 / p80), prints a table row per implementation and appends it through
`harness.record` (benchmarks/op_bench.py). pytest-benchmark's own table shows the Triton forward
+ backward.

FLOPs (M = batch * tokens rows, C = width, Hd = hidden, N = tokens, B = batch): the two halves'
(bench_self_attention.py, bench_mlp.py): forward 8*M*C^2 + 4*B*N^2*C + 4*M*C*Hd; backward 2x the
GEMM FLOPs + 2.5x the attention FLOPs.
What to read off it against bench_self_attention + bench_mlp: the block's backward finishes the
MLP's LayerNorm gradient in the proj dgrad (one launch and one (M, C) fp32 read fewer).
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, TOKENS, bench, block_params, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_block(benchmark, model, branch, batch):
    widths, ratio, heads = MODELS[model][:2], MODELS[model][2], MODELS[model][3]
    C, N = widths[branch], TOKENS[branch]
    Hd, M = C * ratio, batch * N
    x = param(batch, N, C)
    params = block_params(C, 3 * C, C) + block_params(C, Hd, Hd)
    gemm, attn = 8 * M * C * C + 4 * M * C * Hd, 4 * batch * N * N * C
    flops = {"fwd": gemm + attn, "fwd+bwd": 3 * gemm + 3.5 * attn}
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C,
            "hidden": Hd, "heads": heads}  # fmt: skip
    bench(benchmark, "block", case, [x, *params, heads, EPS], [x, *params], flops, None)
