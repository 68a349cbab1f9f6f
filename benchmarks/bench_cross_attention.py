"""The `cross_attention` op alone (CrossViT's fusion block at depth 0: the projected CLS of
branch i attends over itself and branch j's patch tokens, + residual) at the real shapes: Triton
(K/V-free, linear in the tokens) vs the reference eager vs the reference under torch.compile
(bf16). `bench_cross_fusion.py` times the whole fusion step around it (cls_proj on both sides).

Run on a GPU: `pytest benchmarks/bench_cross_attention.py --benchmark-only -s` (`-k crossvit_18`
for one model). Rows go to benchmarks/results/<device>.json via `harness.record`; see
op_bench.py for the table format.

Memory bound by the other branch's token tensor, T = B * (1 + N_j) * C_j * 2 bytes: the forward
reads it once (T), the backward reads it again and writes d tokens (forward + backward 3T).
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, TOKENS, bench, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_cross_attention(benchmark, model, branch, batch):
    # `branch` names the token branch j (width C, its heads): fusion[1 - j]'s cross-attention.
    widths, heads = MODELS[model][:2], MODELS[model][3]
    C, N1 = widths[branch], TOKENS[branch]
    cls, tokens = param(batch, C), param(batch, N1, C)
    params = [(param(C, scale=0.1) + 1).detach().requires_grad_(), param(C, scale=0.1)]
    for _ in range(4):  # wq, wk, wv, proj: (C, C) and bias
        params += [param(C, C, scale=C**-0.5), param(C, scale=0.1)]
    T = batch * N1 * C * 2
    case = {"model": model, "branch": branch, "batch": batch, "tokens": N1, "width": C}
    args = [cls, tokens, *params, heads, EPS]
    bytes_ = {"fwd": T, "fwd+bwd": 3 * T}
    bench(benchmark, "cross_attention", case, args, [cls, tokens, *params], None, bytes_)
