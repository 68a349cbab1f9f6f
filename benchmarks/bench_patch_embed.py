"""Patch embedding at CrossViT's real shapes: the fused `patch_embed` (implicit-GEMM patch conv +
bias + CLS + position embedding), Triton vs the reference eager vs the reference under
torch.compile (bf16 image).

Run on a GPU: `pytest benchmarks/bench_patch_embed.py --benchmark-only -s`. Rows go to the
extra_info and the end-of-session table via `harness.record`; see op_bench.py for the table format.

Formulas (B = batch, N = patches, D = width, K = 3 * p * p, e = bytes per element):
  patch_embed     forward 2*B*N*K*D FLOPs; forward + backward (weight gradient, the image does
                  not require grad) 4*B*N*K*D. Bytes: forward reads the image and writes the
                  tokens; backward reads d_tokens twice (batch reduction for d_pos / d_cls /
                  d_bias, weight-gradient GEMM) and the image once: 2*image + 3*tokens in all.
Goal (H100, bf16): patch_embed forward + backward >= 2x the reference eager.
"""

from __future__ import annotations

import pytest
import torch
from op_bench import BRANCHES, CASES, DTYPE, MODELS, bench


@pytest.mark.parametrize("model, branch, batch", CASES)
def test_bench_patch_embed(benchmark, model, branch, batch):
    D = MODELS[model][branch]
    img, p = BRANCHES[branch]
    N, K = (img // p) ** 2, 3 * p * p
    x = torch.randn(batch, 3, img, img, device="cuda", dtype=DTYPE)
    params = [
        torch.randn(D, 3, p, p, device="cuda") * K**-0.5,
        torch.randn(D, device="cuda") * 0.1,
        torch.randn(1, 1, D, device="cuda") * 0.02,
        torch.randn(1, 1 + N, D, device="cuda") * 0.02,
    ]
    params = [t.to(DTYPE).requires_grad_() for t in params]
    e = torch.finfo(DTYPE).bits // 8
    image, tokens = batch * 3 * img * img * e, batch * (1 + N) * D * e
    flops = {"fwd": 2 * batch * N * K * D, "fwd+bwd": 4 * batch * N * K * D}
    bytes_ = {"fwd": image + tokens, "fwd+bwd": 2 * image + 3 * tokens}
    case = {"model": model, "branch": branch, "batch": batch, "image": img, "patch": p, "width": D}
    bench(benchmark, "patch_embed", case, [x, *params], params, flops, bytes_)
