"""Loading and scoring the timm golden vectors in tests/data/golden (format: its README.md).

The files are part of the repository: a missing or unreadable one is a test failure (the error
names the file and how to regenerate it), never a skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

import torch

from crossvit_fast import CrossViT, CrossViTConfig

GOLDEN_DIR = Path(__file__).resolve().parent / "data" / "golden"
CASES = ("plain", "dagger", "fusion1_crop", "fusion2_avg", "features")
KINDS = ("logits", "input_grad", "param_grads")
# A golden parameter gradient at most this x the model's largest is zero in exact arithmetic (the
# cross-attention key biases: softmax cancels them; fusion2_avg's unused CLS projections): what a
# run gives there is rounding noise, scored apart as `zero_grads` (below), not as a relative error.
ZERO_GRAD = 1e-12
# The bound on that noise, x the largest gradient: two ulps of it in float32 (2 * 2**-23; the
# reference measured <= 6.6e-8, the Triton backend exactly 0), and in float64 (2**-52 ~ 2.2e-16).
ZERO_GRAD_NOISE = {torch.float32: 2 * 2**-23, torch.float64: 1e-13}
REGENERATE = "python tests/data/golden/make_golden.py (needs timm)"


def _path(name: str) -> Path:
    p = GOLDEN_DIR / name
    if not p.is_file():
        raise FileNotFoundError(
            f"golden file {p} is missing: it is part of the repository (git checkout it, or "
            f"regenerate with {REGENERATE})"
        )
    return p


def available() -> bool:
    """True; raises FileNotFoundError naming the first missing golden file (never skip)."""
    for c in CASES:
        _path(f"{c}.pt")
    _path("variants.json")
    return True


@cache
def load(case: str) -> dict:
    """One case (cached: treat it as read-only)."""
    return torch.load(_path(f"{case}.pt"), weights_only=True)


@cache
def variants() -> dict:
    """timm's registered variants: {name: {hf_hub_id, img_size_scaled, num_params, state_dict}},
    state_dict an ordered list of [key, shape]."""
    return json.loads(_path("variants.json").read_text())["variants"]


class _TimmFp32Err(Mapping):
    """case -> (logits, input grad, param grads): timm's own float32 error against the float64
    golden values, as stored in each case file (read on first use)."""

    def __getitem__(self, case: str) -> tuple[float, float, float]:
        e = load(case)["timm_fp32_err"]
        return tuple(e[k] for k in KINDS)

    def __iter__(self) -> Iterator[str]:
        return iter(CASES)

    def __len__(self) -> int:
        return len(CASES)


TIMM_FP32_ERR = _TimmFp32Err()


def build(g: dict, backend: str = "reference", dtype=torch.float64) -> CrossViT:
    model = CrossViT(CrossViTConfig.from_timm(**g["meta"]["timm_kwargs"]), backend=backend)
    # Convert first, then load: loading float64 weights into a float32 model would round them.
    model.to(dtype).load_state_dict(g["state_dict"], strict=True)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor, denom: float | None = None) -> float:
    """max |a - b| / max |b| (or / denom)."""
    d = denom if denom is not None else b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / max(d, 1e-30)


def run(g: dict, model: CrossViT, dtype=torch.float64) -> dict:
    """Eval logits, then train-mode grads of (model(x) * probe).sum(). Returns errors vs golden:
    {"logits": e, "input_grad": e, "param_grads": e (denominator as the README says), "zero_grads":
    max |grad| / largest golden gradient over the gradients that are zero (ZERO_GRAD)}."""
    x = g["input"].to(dtype)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    x = x.clone().requires_grad_(True)
    (model(x) * g["probe"].to(dtype)).sum().backward()
    params = dict(model.named_parameters())
    assert set(params) == set(g["param_grads"]), "parameter names differ from the golden case"
    gmax = max(v.abs().max().item() for v in g["param_grads"].values())
    pe = ze = 0.0
    for k, ref in g["param_grads"].items():
        got = params[k].grad
        assert got is not None, f"no gradient for {k}"
        r = ref.abs().max().item()
        if r <= ZERO_GRAD * gmax:
            ze = max(ze, got.double().abs().max().item() / gmax)
        else:
            pe = max(pe, (got.double() - ref).abs().max().item() / max(r, 1e-3 * gmax))
    return {
        "logits": rel_err(logits, g["logits"]),
        "input_grad": rel_err(x.grad, g["input_grad"]),
        "param_grads": pe,
        "zero_grads": ze,
    }
