"""The final `layer_norm` at CrossViT's real shapes: Triton vs the reference eager vs the
reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_layer_norm.py --benchmark-only -s` (`-k crossvit_18` for one model).
Each case times forward and forward + backward of all three implementations in the same run (CUDA
events, median with p20 / p80), prints a table row per implementation and appends it to
benchmarks/results/<device>.json through `harness.record` (benchmarks/op_bench.py). pytest-
benchmark's own table shows the Triton forward + backward.

Memory bound: forward reads x and writes y (2*M*C elements, M = batch * tokens rows, C = width),
backward reads x, dy and writes dx (3*M*C elements); reported as GB/s.
"""

from __future__ import annotations

import pytest
import torch
from op_bench import CASES, DTYPE, EPS, MODELS, TOKENS, bench, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_layer_norm(benchmark, model, branch, batch):
    C, N = MODELS[model][branch], TOKENS[branch]
    M = batch * N
    x = param(batch, N, C)
    w, b = (param(C, scale=0.1) + 1).detach().requires_grad_(), param(C, scale=0.1)
    e = torch.finfo(DTYPE).bits // 8
    bytes_ = {"fwd": 2 * M * C * e, "fwd+bwd": 5 * M * C * e}
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N, "width": C}
    bench(benchmark, "layer_norm", case, [x, w, b, EPS], [x, w, b], None, bytes_)
