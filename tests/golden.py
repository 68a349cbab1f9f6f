"""Loading and scoring the timm golden vectors in shared/golden (format: its README)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.torch_version import TorchVersion

import crossvit_fast
from crossvit_fast import CrossViT, CrossViTConfig

GOLDEN_DIR = Path(
    os.environ.get(
        "CROSSVIT_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"
    )
)
CASES = ("tiny2b", "dagger", "fusion2", "avgpool", "crossvit_tiny_240")

# timm's own float32 error against the float64 golden values (golden/README.md), per case:
# (logits, input grad, parameter grads). A float32 backend must stay within 2x of these, 1e-5 floor.
TIMM_FP32_ERR = {
    "tiny2b": (2.6e-7, 6.8e-7, 1.2e-5),
    "dagger": (2.7e-7, 7.6e-7, 1.1e-4),
    "fusion2": (2.0e-7, 8.0e-7, 3.0e-6),
    "avgpool": (6.0e-8, 8.7e-7, 1.0e-6),
    "crossvit_tiny_240": (4.0e-7, 1.0e-5, 1.7e-5),
}


def available() -> bool:
    return all((GOLDEN_DIR / f"{c}.pt").exists() for c in CASES)


def load(case: str) -> dict:
    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(GOLDEN_DIR / f"{case}.pt", weights_only=True)


def build(g: dict, backend: str = "reference", dtype=torch.float64) -> CrossViT:
    meta = g["meta"]
    if "timm_name" in meta:
        model = crossvit_fast.create_model(meta["timm_name"], backend=backend)
    else:
        model = CrossViT(CrossViTConfig.from_timm(**meta["timm_kwargs"]), backend=backend)
    # Convert first, then load: loading float64 weights into a float32 model would round them.
    model.to(dtype).load_state_dict(g["state_dict"], strict=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor, denom: float | None = None) -> float:
    """max |a - b| / max |b| (or / denom)."""
    d = denom if denom is not None else b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(d, 1e-30)


def run(g: dict, model: CrossViT, dtype=torch.float64) -> dict:
    """Eval logits, then train-mode grads of (model(x) * probe).sum(). Returns errors vs golden:
    {"logits": e, "input_grad": e, "param_grads": e} (param denominator as the README says)."""
    x = g["input"].to(dtype)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    x = x.clone().requires_grad_(True)
    (model(x) * g["probe"].to(dtype)).sum().backward()
    params = dict(model.named_parameters())
    gmax = max(v.abs().max().item() for v in g["param_grads"].values())
    pe = 0.0
    for k, ref in g["param_grads"].items():
        got = params[k].grad
        assert got is not None, f"no gradient for {k}"
        pe = max(
            pe, (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3 * gmax)
        )
    return {
        "logits": rel_err(logits, g["logits"]),
        "input_grad": rel_err(x.grad, g["input_grad"]),
        "param_grads": pe,
    }
