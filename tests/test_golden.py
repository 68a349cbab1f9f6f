"""Every backend reproduces timm's golden vectors (tests/data/golden, made by timm: its README).

* reference, float64: logits within 1e-10 relative, input and parameter gradients within 1e-9.
* reference, float32: within 2x of the error timm's own float32 run makes (stored in each case)
  plus a 1e-5 floor. timm's error was measured on the machine that made the case files, and the
  float32 rounding of the same computation differs between CPUs (MKL / oneDNN choose their
  kernels, and so their summation order, by instruction set): on one 2-core CI machine the
  reference's dagger parameter-gradient error came out at 2.0000000028x the stored one. So the
  floor adds to the 2x (the numerics rule's "2x plus a stated floor"), where the same-machine
  comparison below keeps max(2x, floor).
* every other available backend (triton runs here in the CPU interpreter), float32: within 2x of
  the reference backend's own float32 error on the same case (1e-5 floor), and within 2x of
  timm's plus the floor.
"""

from __future__ import annotations

import pytest
import torch

import crossvit_fast

from . import golden

KINDS = golden.KINDS


@pytest.fixture(scope="module")
def cases():
    return {c: golden.load(c) for c in golden.CASES}


@pytest.fixture(scope="module")
def reference_fp32_errors(cases):
    return {
        c: golden.run(g, golden.build(g, "reference", torch.float32), torch.float32)
        for c, g in cases.items()
    }


@pytest.mark.parametrize("case", golden.CASES)
def test_reference_float64_matches_timm(cases, case):
    g = cases[case]
    err = golden.run(g, golden.build(g, "reference", torch.float64), torch.float64)
    assert err["logits"] <= 1e-10, err
    assert err["input_grad"] <= 1e-9, err
    assert err["param_grads"] <= 1e-9, err
    assert err["zero_grads"] <= golden.ZERO_GRAD_NOISE[torch.float64], err


@pytest.mark.parametrize("case", golden.CASES)
def test_reference_float32_within_2x_of_timm(reference_fp32_errors, case):
    err = reference_fp32_errors[case]
    for kind, timm_err in zip(KINDS, golden.TIMM_FP32_ERR[case]):
        assert err[kind] <= 2 * timm_err + 1e-5, (kind, err[kind], timm_err)
    assert err["zero_grads"] <= golden.ZERO_GRAD_NOISE[torch.float32], err


def _fast_backends_here() -> list[str]:
    return [
        n
        for n in crossvit_fast.BACKENDS
        if n != "reference"
        and crossvit_fast.backends.backend_availability(
            n, "cuda" if torch.cuda.is_available() else "cpu"
        )[0]
    ]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", golden.CASES)
def test_backend_float32_within_2x_of_reference(cases, reference_fp32_errors, backend, case):
    if backend not in _fast_backends_here():
        reason = crossvit_fast.available_backends()[backend][1]
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    g = cases[case]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = golden.build(g, backend, torch.float32).to(device)
    g_dev = {**g, "input": g["input"].to(device), "probe": g["probe"].to(device)}
    g_dev["logits"], g_dev["input_grad"] = g["logits"].to(device), g["input_grad"].to(device)
    g_dev["param_grads"] = {k: v.to(device) for k, v in g["param_grads"].items()}
    err = golden.run(g_dev, model, torch.float32)
    ref = reference_fp32_errors[case]
    for kind, timm_err in zip(KINDS, golden.TIMM_FP32_ERR[case]):
        assert err[kind] <= max(2 * ref[kind], 1e-5), (kind, err[kind], ref[kind])
        assert err[kind] <= 2 * timm_err + 1e-5, (kind, err[kind], timm_err)
    assert err["zero_grads"] <= golden.ZERO_GRAD_NOISE[torch.float32], err


def test_golden_files_are_in_the_repository():
    """A fresh clone has every case (a missing file fails here, and in every test that uses it)."""
    assert golden.available()
    assert golden.GOLDEN_DIR.is_relative_to(golden.Path(__file__).resolve().parent)
    size = sum(f.stat().st_size for f in golden.GOLDEN_DIR.iterdir())
    assert size <= 5e6, f"golden data is {size / 1e6:.1f} MB (budget 5 MB)"


@pytest.mark.parametrize("name", crossvit_fast.list_models())
def test_registered_variants_equal_timms(name):
    """Every registered name builds timm's architecture: keys in order, shapes, parameter count
    (tests/data/golden/variants.json, recorded from timm), and names timm's weights repo."""
    want = golden.variants()[name]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = crossvit_fast.create_model(name)
    assert [[k, list(v.shape)] for k, v in m.state_dict().items()] == want["state_dict"]
    assert sum(p.numel() for p in m.parameters()) == want["num_params"]
    assert [list(s) for s in m.img_size_scaled] == want["img_size_scaled"]
    assert crossvit_fast.registry.pretrained_repo(name) == want["hf_hub_id"]


def test_every_timm_variant_is_registered():
    assert sorted(crossvit_fast.list_models()) == sorted(golden.variants())


@pytest.mark.timm
def test_against_installed_timm():
    """When timm is importable, compare with it directly (CI need not have timm)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    t = timm.create_model("crossvit_9_240", pretrained=False, num_classes=7).eval()
    ours = crossvit_fast.from_timm(t, backend="reference").eval()
    assert list(ours.state_dict()) == list(t.state_dict())
    x = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        assert torch.allclose(ours(x), t(x), atol=1e-5, rtol=1e-5)
        fo, ft = ours.forward_features(x), t.forward_features(x)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(fo, ft))
