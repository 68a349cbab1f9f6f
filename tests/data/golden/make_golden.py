"""Regenerate the golden vectors in this folder from timm (format: README.md here).

Needs timm and torch (any recent pair; the committed files came from the versions in their
`meta`). It never imports crossvit_fast: everything here is timm's own computation.

    python tests/data/golden/make_golden.py            # rewrite every case + variants.json
    python tests/data/golden/make_golden.py plain      # one case

Each case is a small `timm.models.crossvit.CrossVit` (widths 12..32, so all cases together stay
well under 5 MB) with every parameter randomised, so LayerNorm affines, biases, CLS and position
tokens are all non-trivial. Values are computed in float64; timm's own float32 error against them
is stored beside them (the float32 tests allow 2x of it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from timm.models.crossvit import CrossVit

HERE = Path(__file__).resolve().parent


# name -> (timm CrossVit kwargs, input (B, C, H, W), what the case is there for); the table is
# data, in cases.json (JSON lists become the tuples timm's kwargs are written with).
def _tuples(v):
    return tuple(_tuples(e) for e in v) if isinstance(v, list) else v


CASES: dict[str, tuple[dict, tuple, str]] = {
    name: (
        {k: _tuples(v) for k, v in case["timm_kwargs"].items()},
        tuple(case["input_shape"]),
        case["purpose"],
    )
    for name, case in json.loads((HERE / "cases.json").read_text()).items()
}


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn at a scale that keeps activations O(1): weights ~ N(0, 1/fan_in),
    LayerNorm weights 1 + N(0, 0.3), biases N(0, 0.2), CLS / position tokens N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.startswith(("cls_token", "pos_embed")):
                p.copy_(0.5 * r)
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * r)
            elif p.ndim == 1:
                p.copy_(0.2 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


def evaluate(model: torch.nn.Module, x: torch.Tensor, probe: torch.Tensor) -> dict:
    """Eval-mode logits; train-mode gradients of (model(x) * probe).sum() (all rates are 0)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    (model(x) * probe).sum().backward()
    return {
        "logits": logits,
        "input_grad": x.grad,
        "param_grads": {k: p.grad for k, p in model.named_parameters()},
    }


def rel_err(a: torch.Tensor, b: torch.Tensor, denom: float | None = None) -> float:
    d = b.abs().max().item() if denom is None else denom
    return (a.double() - b.double()).abs().max().item() / max(d, 1e-30)


def errors(got: dict, want: dict) -> dict:
    """The three errors the tests measure (tests/golden.py), same definitions."""
    gmax = max(v.abs().max().item() for v in want["param_grads"].values())
    pe = max(
        rel_err(got["param_grads"][k], v, max(v.abs().max().item(), 1e-3 * gmax))
        for k, v in want["param_grads"].items()
        if v.abs().max().item() > 1e-12 * gmax  # the zero gradients: tests/golden.py ZERO_GRAD
    )
    return {
        "logits": rel_err(got["logits"], want["logits"]),
        "input_grad": rel_err(got["input_grad"], want["input_grad"]),
        "param_grads": pe,
    }


def make_case(name: str, seed: int) -> dict:
    kwargs, shape, why = CASES[name]
    model = CrossVit(**kwargs).double()
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    out_dim = kwargs["num_classes"] or sum(kwargs["embed_dim"])
    probe = torch.randn(shape[0], out_dim, generator=g, dtype=torch.float64)
    gold = evaluate(model, x, probe)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # timm's own float32 run from the float32-rounded weights and input.
    m32 = CrossVit(**kwargs)
    m32.load_state_dict(state)
    e32 = errors(evaluate(m32, x.float(), probe.float()), gold)
    return {
        "meta": {
            "timm_kwargs": kwargs,
            "purpose": why,
            "timm_version": timm.__version__,
            "torch_version": str(torch.__version__),
            "seed": seed,
        },
        "img_size_scaled": [list(s) for s in model.img_size_scaled],
        "state_dict": state,
        "input": x,
        "probe": probe,
        **gold,
        "timm_fp32_err": e32,
    }


def variants() -> dict:
    """timm's registered CrossViT variants: state_dict keys and shapes in order, MLP hidden
    widths, and the pretrained weights' hub repo (built on the meta device: no memory, no init)."""
    out = {}
    for name in sorted(timm.list_models("crossvit_*")):
        m = timm.create_model(name, pretrained=False, device="meta")
        out[name] = {
            "hf_hub_id": m.pretrained_cfg.get("hf_hub_id"),
            "img_size_scaled": [list(s) for s in m.img_size_scaled],
            "num_params": sum(p.numel() for p in m.parameters()),
            "state_dict": [[k, list(v.shape)] for k, v in m.state_dict().items()],
        }
    return {"timm_version": timm.__version__, "variants": out}


def dump_variants(v: dict) -> str:
    """JSON with one state_dict entry per line (reviewable diffs, ~160 kB)."""
    rows = []
    for name, d in v["variants"].items():
        head = {k: d[k] for k in d if k != "state_dict"}
        sd = ",\n".join("   " + json.dumps(e, separators=(",", ":")) for e in d["state_dict"])
        rows.append(f' {json.dumps(name)}: {json.dumps(head)[:-1]}, "state_dict": [\n{sd}\n ]}}')
    return (
        f'{{"timm_version": {json.dumps(v["timm_version"])}, "variants": {{\n'
        + ",\n".join(rows)
        + "\n}}\n"
    )


def main(argv: list[str]) -> None:
    names = argv or list(CASES)
    table = []
    for seed, name in enumerate(CASES):
        if name not in names:
            continue
        case = make_case(name, seed)
        torch.save(case, HERE / f"{name}.pt")
        e = case["timm_fp32_err"]
        table.append(
            f"| {name} | {e['logits']:.1e} | {e['input_grad']:.1e} | {e['param_grads']:.1e} |"
        )
    if not argv:
        (HERE / "variants.json").write_text(dump_variants(variants()))
    print("| case | logits | input grad | parameter grads |\n|---|---|---|---|")
    print("\n".join(table))
    for f in sorted(HERE.glob("*.pt")):
        print(f"{f.name}: {f.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
