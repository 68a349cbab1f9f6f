"""The `blocks` op (a branch's six blocks of one crossvit_18 stage under one autograd node) at
CrossViT's real shapes: Triton vs the reference eager vs the reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_blocks.py --benchmark-only -s` (`-k crossvit_18` for one
model). Timing, printing and recording as bench_block.py (benchmarks/op_bench.py).

FLOPs: `DEPTH` times bench_block.py's. What to read off it against `DEPTH` x bench_block: the
LayerNorm gradients between blocks are finished inside the fc2 dgrads (DEPTH - 1 launches and
(M, C) fp32 reads fewer).
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, TOKENS, bench, block_params, param

from crossvit_fast.backends import block_params as group

DEPTH = 6  # crossvit_18's large branch: blocks per stage


def _grouped(fn):
    """The case's flat arguments (x, 12 per block, heads, eps) -> blocks(x, [BlockParams], ...)."""

    def run(x, *rest):
        flat, (heads, eps) = rest[:-2], rest[-2:]
        params = [group(flat[i : i + 12]) for i in range(0, len(flat), 12)]
        return fn(x, params, heads, eps)

    return run


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_blocks(benchmark, model, branch, batch):
    widths, ratio, heads = MODELS[model][:2], MODELS[model][2], MODELS[model][3]
    C, N = widths[branch], TOKENS[branch]
    Hd, M = C * ratio, batch * N
    x = param(batch, N, C)
    params = [p for _ in range(DEPTH) for p in block_params(C, 3 * C, C) + block_params(C, Hd, Hd)]
    gemm, attn = 8 * M * C * C + 4 * M * C * Hd, 4 * batch * N * N * C
    flops = {"fwd": DEPTH * (gemm + attn), "fwd+bwd": DEPTH * (3 * gemm + 3.5 * attn)}
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C,
            "hidden": Hd, "heads": heads, "depth": DEPTH}  # fmt: skip
    args = [x, *params, heads, EPS]
    bench(benchmark, "blocks", case, args, [x, *params], flops, None, flat=_grouped)
