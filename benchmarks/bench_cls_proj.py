"""The `cls_proj` op (CrossViT's `projs[i]` / `revert_projs[i]` on the CLS rows: LayerNorm ->
GELU -> Linear, C_in -> C_out) at the real shapes: Triton vs the reference eager vs the
reference under torch.compile (bf16).

Run on a GPU: `pytest benchmarks/bench_cls_proj.py --benchmark-only -s`. Rows go to
benchmarks/results/<device>.json via `harness.record`; see op_bench.py for the table format.

A few hundred rows: bound by the weight, W = C_out * C_in * 2 bytes, and by launches. Bytes
counted: forward W + B * (C_in + C_out) * 2; forward + backward 3W + 3 B * (C_in + C_out) * 2
(the backward reads W and the rows again and writes dW and d rows).
"""

from __future__ import annotations

import pytest
from op_bench import CASES, EPS, MODELS, bench, param


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_cls_proj(benchmark, model, branch, batch):
    # `branch` names the input side: projs[branch] maps C_branch -> C_other
    widths = MODELS[model][:2]
    c_in, c_out = widths[branch], widths[1 - branch]
    x = param(batch, c_in)
    params = [(param(c_in, scale=0.1) + 1).detach().requires_grad_(), param(c_in, scale=0.1)]
    params += [param(c_out, c_in, scale=c_in**-0.5), param(c_out, scale=0.1)]
    W, rows = c_out * c_in * 2, batch * (c_in + c_out) * 2
    case = {"model": model, "branch": branch, "batch": batch, "width": c_in, "out": c_out}
    bytes_ = {"fwd": W + rows, "fwd+bwd": 3 * (W + rows)}
    bench(benchmark, "cls_proj", case, [x, *params, EPS], [x, *params], None, bytes_)
