"""`torch.compile(model, fullgraph=True)`: one graph (no graph break) for every backend, training
forward + backward equal to eager.

On CPU the compiler backend is "aot_eager": Dynamo traces the whole model (fullgraph=True raises on
any graph break) and AOTAutograd builds the joint forward / backward graph, exactly what inductor
receives; only inductor's C++ code generation is skipped, which takes minutes on a 2-core CPU and
says nothing about graph breaks. The GPU tier compiles with inductor for real.
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast import CrossViT, create_model

from .conftest import DEVICE, available_backend_names, tiny_config

TINY = tiny_config()


pytestmark = pytest.mark.usefixtures("one_thread")


_available = available_backend_names


def _counter():
    """A compiler backend that counts the graphs Dynamo hands it, then runs aot_eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    return CompileCounterWithBackend("aot_eager")


def _fwd_bwd(model, x, run=None):
    """Output and gradients of `run` (default: the model itself; or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = (model if run is None else run)(x)
    (
        out.float() * torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    ).sum().backward()
    return out.detach(), {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def _compare(model, compiled, x, **tol):
    out0, g0 = _fwd_bwd(model, x)
    out1, g1 = _fwd_bwd(model, x, run=compiled)
    assert out1.dtype == out0.dtype
    torch.testing.assert_close(out1, out0, **tol)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k, **tol)


@pytest.mark.parametrize("backend", _available("cpu"))
def test_fullgraph_one_graph_and_eager_equal(backend):
    torch._dynamo.reset()
    model = CrossViT(TINY, backend=backend).train()
    counter = _counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    _compare(model, compiled, torch.randn(2, 3, 32, 32))
    assert counter.frame_count == 1


def test_fullgraph_with_grad_checkpointing_drop_path_and_autocast():
    """The model's other paths under one compile: checkpointed blocks and fusions, drop-path
    (the residual=False + mask route), bf16 autocast (the input-dtype check reads autocast state)."""
    torch._dynamo.reset()
    model = CrossViT(TINY.replace(drop_path_rate=0.2), backend="reference").train()
    model.set_grad_checkpointing(True)
    counter = _counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        ref = model(x)
    assert counter.frame_count == 1
    assert out.dtype == ref.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()  # eval: drop-path off -> deterministic; a new graph for the new mode, still one
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 2


def test_invalid_input_still_raises_under_compile():
    """The input checks are static (shape / dtype / device), so they cost nothing in the graph;
    a bad input still gets our message: as the ValueError itself (default compile), or inside
    Dynamo's error under fullgraph=True (which refuses to leave the graph to raise)."""
    torch._dynamo.reset()
    model = CrossViT(TINY, backend="reference")
    bad = torch.randn(2, 1, 32, 32)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        torch.compile(model, backend="aot_eager")(bad)
    with pytest.raises(Exception, match="expected 3 input channels"):
        torch.compile(model, fullgraph=True, backend="aot_eager")(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _available("cuda") if DEVICE == "cuda" else ["reference"])
def test_inductor_fullgraph_on_gpu(backend):
    torch._dynamo.reset()
    model = create_model("crossvit_9_240", backend=backend, num_classes=10).cuda().train()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 240, 240, device="cuda")
    # Inductor reorders fp32 reductions and uses TF32-free but fused kernels: fp32 tolerances.
    _compare(model, compiled, x, rtol=1e-3, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.gpu
def test_train_command_with_compile_on_gpu(tmp_path):
    pytest.importorskip("sklearn")
    from crossvit_fast.train import main

    metrics = tmp_path / "m.json"
    args = [
        "--compile",
        "--steps",
        "30",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
        "--metrics-json",
        str(metrics),
    ]
    assert main(args) == 0
    import json

    m = json.loads(metrics.read_text())
    assert m["steps"] == 30 and m["img_per_s"] > 0
