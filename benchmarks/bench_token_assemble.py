"""The `token_assemble` op (dagger stems: flatten the stem output + CLS + position embedding) at
CrossViT's real shapes, Triton vs the reference eager vs the reference under torch.compile (bf16
stem output, channels_last as cuDNN produces it).

Run on a GPU: `pytest benchmarks/bench_token_assemble.py --benchmark-only -s`. Rows go to
benchmarks/results/<device>.json via `harness.record`; see op_bench.py for the table format.

Memory bound: forward reads feat and writes the tokens (2*tokens bytes); backward reads d_tokens
and writes d_feat (2*tokens more).
"""

from __future__ import annotations

import pytest
import torch
from op_bench import BRANCHES, CASES, DTYPE, MODELS, bench


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_token_assemble(benchmark, model, branch, batch):
    D = MODELS[model][branch]
    img, p = BRANCHES[branch]
    h = img // p
    # The dagger stem's last conv output, channels_last as cuDNN produces it for channels_last input.
    feat = torch.randn(batch, D, h, h, device="cuda", dtype=DTYPE).contiguous(
        memory_format=torch.channels_last
    )
    feat.requires_grad_()
    cls = (torch.randn(1, 1, D, device="cuda") * 0.02).to(DTYPE).requires_grad_()
    pos = (torch.randn(1, 1 + h * h, D, device="cuda") * 0.02).to(DTYPE).requires_grad_()
    tokens = batch * (1 + h * h) * D * (torch.finfo(DTYPE).bits // 8)
    bytes_ = {"fwd": 2 * tokens, "fwd+bwd": 4 * tokens}
    case = {"model": model, "branch": branch, "batch": batch, "tokens": 1 + h * h, "width": D}
    bench(benchmark, "token_assemble", case, [feat, cls, pos], [feat, cls, pos], None, bytes_)
