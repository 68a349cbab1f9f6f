"""CUDA graphs with the fast backends (GPU tier): a captured inference forward and a captured
training step (forward, loss, backward, AdamW) replay to what eager gives, and
`torch.compile(mode="reduce-overhead")` (cudagraph trees) runs the model.

What capture needs from the ops, and where it comes from: no host synchronisation inside a
forward or backward (the launchers size grids from shapes; no `.item()` / `.cpu()`), allocations
that are the same every call (every buffer's size is a function of the input shapes, so the
graph's private pool serves them), launches on the current stream (`utils.launch` launches on
the tensor's device and its current stream), and Triton's autotuning finished before capture
(the warm-up iterations below, on a side stream as torch.cuda.graphs requires). B=1 inference,
where launch overhead is the whole cost, is what graphs are for.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from crossvit_fast import CrossViT, model_config

pytestmark = pytest.mark.gpu

# crossvit_18's widths, heads and token counts at a depth that keeps the test short.
_CFG = model_config("crossvit_18_240", depth=((1, 2, 0),), num_classes=10)


def _model(backend: str) -> CrossViT:
    torch.manual_seed(0)
    return CrossViT(_CFG, backend=backend).cuda()


def _warm(fn, n: int = 3) -> None:
    """Run `fn` on a side stream (autotuning, lazy init, allocator warm-up happen here)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("batch", [1, 8])
def test_captured_inference_replays_eager(backend, batch):
    model = _model(backend).eval()
    static_x = torch.randn(batch, 3, 240, 240, device="cuda")

    def forward():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(static_x)

    _warm(forward)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward()
    for _ in range(2):  # new inputs copied into the captured buffer, then replayed
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_out, forward(), rtol=0, atol=0)


def test_captured_training_step_replays_eager():
    model = _model("triton").train()
    twin = copy.deepcopy(model)  # the same step, eager, for comparison
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    static_x = torch.randn(4, 3, 240, 240, device="cuda")
    static_y = torch.randint(0, 10, (4,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(static_x).float(), static_y)
        loss.backward()
        opt.step()
        return loss

    _warm(step)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for _ in range(2):
        static_x.copy_(torch.randn_like(static_x))
        static_y.copy_(torch.randint(0, 10, (4,), device="cuda"))
        twin.load_state_dict(model.state_dict())  # the parameters the replay starts from
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = F.cross_entropy(twin(static_x).float(), static_y)
        before = [p.detach().clone() for p in model.parameters()]
        graph.replay()
        torch.testing.assert_close(static_loss, want, rtol=1e-5, atol=1e-5)
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reduce_overhead_compile_runs_the_triton_ops():
    model = _model("triton").eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(1, 3, 240, 240, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):  # record, then replays (cudagraph trees)
            out = compiled(x)
        want = model(x)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
