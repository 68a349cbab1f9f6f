"""The `fusion_stage` op (every fusion step of a CrossViT stage and the re-assembly of its token
tensors, one autograd node) at the real shapes: Triton vs the reference eager vs the reference
under torch.compile (bf16). `bench_cross_fusion.py` times one fusion step alone.

Run on a GPU: `pytest benchmarks/bench_fusion_stage.py --benchmark-only -s`. Rows go to
benchmarks/results/<device>.json via `harness.record`; see op_bench.py for the table format.

Memory bound by the two branches' token tensors, T = B * sum_i (1 + N_i) * C_i * 2 bytes: the
forward reads each once for the other fusion and copies it into the stage output (3T), the
backward reads them again, reads the output gradient and writes the token gradient (4T): 7T.
"""

from __future__ import annotations

import pytest
import torch
from op_bench import BATCHES, EPS, MODELS, TOKENS, bench, param

from crossvit_fast.backends import fusion_params


def _flat(fn):
    """fn (the table's signature) over (y0, y1, 36 flat parameters, heads, eps): its outputs as
    one tensor, for the timing helpers."""

    def run(y0, y1, *rest):
        params, (heads, eps) = rest[:-2], rest[-2:]
        groups = [fusion_params(params[:18]), fusion_params(params[18:])]
        return torch.cat([o.flatten(1) for o in fn([y0, y1], groups, heads, eps)], dim=1)

    return run


def _fusion(c_i: int, c_j: int) -> list:
    """projs (C_i -> C_j), the cross-attention block at C_j, revert_projs (C_j -> C_i)."""
    ps = []
    for c_in, c_out in ((c_i, c_j), (None, None), (c_j, c_i)):
        if c_in is None:
            ps += [(param(c_j, scale=0.1) + 1).detach().requires_grad_(), param(c_j, scale=0.1)]
            for _ in range(4):  # wq, wk, wv, proj
                ps += [param(c_j, c_j, scale=c_j**-0.5), param(c_j, scale=0.1)]
        else:
            ps += [(param(c_in, scale=0.1) + 1).detach().requires_grad_(), param(c_in, scale=0.1)]
            ps += [param(c_out, c_in, scale=c_in**-0.5), param(c_out, scale=0.1)]
    return ps


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_fusion_stage(benchmark, model, batch):
    c0, c1, _, heads = MODELS[model]
    y0, y1 = param(batch, TOKENS[0], c0), param(batch, TOKENS[1], c1)
    params = _fusion(c0, c1) + _fusion(c1, c0)
    T = batch * (TOKENS[0] * c0 + TOKENS[1] * c1) * 2
    case = {"model": model, "batch": batch, "tokens": list(TOKENS), "width": [c0, c1]}
    args = [y0, y1, *params, [heads, heads], EPS]
    bytes_ = {"fwd": 3 * T, "fwd+bwd": 7 * T}
    bench(benchmark, "fusion_stage", case, args, [y0, y1, *params], None, bytes_, _flat)
