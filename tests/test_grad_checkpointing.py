"""`model.set_grad_checkpointing(True)`: the same gradients with far fewer saved activations.

Peak activation memory on CPU is measured by what autograd keeps for backward: every tensor
packed through `torch.autograd.graph.saved_tensors_hooks` during the forward, counted once per
storage, parameters excluded. Measured here (fp32, batch 2, reference backend):

    crossvit_tiny_240 (240 px)   86.2 MB without, 10.2 MB with checkpointing (11.8 %)
    SMALL below (48 px)           0.43 MB without, 0.13 MB with checkpointing (29.7 %)

With checkpointing a ViT block keeps only its input token tensor, a fusion step only its two
inputs; the rest is the stem (input image), the final norms and heads. On a GPU the same shows in
`torch.cuda.max_memory_allocated` (gpu test).
"""

from __future__ import annotations

import pytest
import torch

from crossvit_fast import CrossViT, create_model

from .conftest import DEVICE, SMALL_KWARGS, available_backend_names, tiny_config

SMALL = tiny_config(**SMALL_KWARGS).replace(depth=((1, 2, 0), (1, 2, 0)), num_classes=10)

TINY = tiny_config(depth=((1, 2, 0),))


pytestmark = pytest.mark.usefixtures("one_thread")


_available = available_backend_names


def saved_activation_bytes(model: CrossViT, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one forward (distinct storages, no parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().sum().backward()
    return sum(seen.values())


def _grads(model: CrossViT, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # drop-path / dropout draws
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def test_same_gradients_with_drop_path_and_dropout():
    """Stochastic depth and dropout active (train mode): checkpointing replays the same random
    draws (the RNG state is saved and restored), so outputs and every gradient are identical."""
    cfg = SMALL.replace(drop_path_rate=0.3, attn_drop_rate=0.1, proj_drop_rate=0.1)
    model = CrossViT(cfg, backend="reference").train()
    x = torch.randn(3, 3, 48, 48)
    out0, g0 = _grads(model, x, seed=7)
    model.set_grad_checkpointing(True)
    out1, g1 = _grads(model, x, seed=7)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-7, msg=k)
    # And the draws matter: another seed gives other gradients (the test could fail).
    _, g2 = _grads(model, x, seed=8)
    assert not torch.allclose(g2["input"], g0["input"])


@pytest.mark.parametrize("backend", _available("cpu"))
def test_same_gradients_every_backend(backend):
    model = CrossViT(TINY, backend=backend).train()
    x = torch.randn(2, 3, 32, 32)
    out0, g0 = _grads(model, x, seed=0)
    model.set_grad_checkpointing(True)
    out1, g1 = _grads(model, x, seed=0)
    torch.testing.assert_close(out1, out0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], msg=k)


@pytest.mark.parametrize(
    "build, size, max_ratio",
    [
        (lambda: CrossViT(SMALL, backend="reference"), 48, 0.4),
        # Full-size widths and token counts, timm's tiny variant (the documented numbers).
        (lambda: create_model("crossvit_tiny_240", backend="reference", num_classes=10), 240, 0.2),
    ],
    ids=["small", "crossvit_tiny_240"],
)
def test_saved_activations_shrink(build, size, max_ratio):
    model = build().train()
    x = torch.randn(2, 3, size, size)
    full = saved_activation_bytes(model, x)
    model.set_grad_checkpointing(True)
    ckpt = saved_activation_bytes(model, x)
    print(f"saved activations: {full / 1e6:.2f} MB -> {ckpt / 1e6:.2f} MB ({ckpt / full:.1%})")
    assert ckpt < max_ratio * full
    model.set_grad_checkpointing(False)
    assert saved_activation_bytes(model, x) == full  # switching off restores the plain graph


def test_no_checkpointing_without_grad():
    """Under no_grad (eval) nothing is recomputed; the output is the plain forward's."""
    model = CrossViT(SMALL, backend="reference").eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _available("cuda") if DEVICE == "cuda" else ["reference"])
def test_gpu_peak_memory_drops_and_gradients_match(backend):
    model = create_model("crossvit_tiny_240", backend=backend, num_classes=10).cuda().train()
    x = torch.randn(16, 3, 240, 240, device="cuda")

    def peak() -> tuple[int, dict]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(x).square().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, {
            n: p.grad.clone() for n, p in model.named_parameters()
        }

    full, g0 = peak()
    model.set_grad_checkpointing(True)
    ckpt, g1 = peak()
    print(f"{backend}: peak {full / 2**20:.0f} MiB -> {ckpt / 2**20:.0f} MiB")
    assert ckpt < 0.6 * full
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5, msg=k)
