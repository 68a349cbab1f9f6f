"""Mixed precision: under `torch.autocast` every backend gives each stage of the model the dtype
the reference (timm's op-for-op twin) gives it, and fp16 training with a GradScaler stays finite
on the golden configurations.

timm's dtype flow under autocast, which the reference reproduces: the patch conv runs in the
autocast dtype, but `cat(cls_token, patches) + pos_embed` promotes to float32, so the residual
stream (every stage's token tensors) stays float32 while each Linear / matmul inside a block runs
in the autocast dtype; the heads are Linear layers, so the logits come out in the autocast dtype.
CPU autocast supports both bf16 and fp16 in torch >= 2.3 (checked below), so both run here.
"""

from __future__ import annotations

import json

import pytest
import torch

from crossvit_fast import CrossViT

from . import golden
from .conftest import DEVICE, available_backend_names, tiny_config

TINY = tiny_config(depth=((1, 1, 0), (1, 1, 0)))
AMP_DTYPES = (torch.bfloat16, torch.float16)


pytestmark = pytest.mark.usefixtures("one_thread")


_available = available_backend_names


def stage_dtypes(model: CrossViT, x: torch.Tensor, dtype: torch.dtype) -> dict[str, list]:
    """Output dtype of each stage (stems, each MultiScaleBlock, final norms, logits) under
    autocast, plus the logits themselves (float32 copy)."""
    seen: dict[str, list] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: seen.setdefault(name, []).extend(
                [o.dtype for o in (out if isinstance(out, list) else [out])]
            )
        )
        for name, m in [
            *((f"patch_embed.{i}", pe) for i, pe in enumerate(model.patch_embed)),
            *((f"blocks.{s}", st) for s, st in enumerate(model.blocks)),
        ]
    ]
    try:
        with torch.autocast(x.device.type, dtype=dtype):
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
    finally:
        for h in hooks:
            h.remove()
    seen["norm"] = [f.dtype for f in feats]
    seen["logits"] = [logits.dtype]
    seen["_values"] = logits.float()
    return seen


def test_cpu_autocast_has_both_dtypes():
    x = torch.randn(4, 8)
    for dt in AMP_DTYPES:
        with torch.autocast("cpu", dtype=dt):
            assert torch.nn.functional.linear(x, torch.randn(8, 8)).dtype == dt


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_reference_follows_timms_dtype_flow(dtype):
    model = CrossViT(TINY, backend="reference").to(DEVICE).eval()
    with torch.no_grad():
        d = stage_dtypes(model, torch.randn(2, 3, 32, 32, device=DEVICE), dtype)
    assert d["patch_embed.0"] == d["patch_embed.1"] == [torch.float32]  # + pos_embed promotes
    assert d["blocks.0"] == d["blocks.1"] == [torch.float32, torch.float32]  # residual stream
    assert d["logits"] == [dtype]  # the heads are Linear


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", _available(DEVICE))
def test_every_backend_gives_each_stage_the_reference_dtype(backend, dtype):
    torch.manual_seed(0)
    ref = CrossViT(TINY, backend="reference").to(DEVICE).eval()
    model = CrossViT(TINY, backend=backend).to(DEVICE).eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        want = stage_dtypes(ref, x, dtype)
        got = stage_dtypes(model, x, dtype)
        exact = model.float()(x)
    vals_want, vals_got = want.pop("_values"), got.pop("_values")
    assert got == want
    # Same autocast, same model: the logits agree to the low-precision format's rounding
    # (the per-op 2x-of-PyTorch bounds are the kernel tests' business; this catches a stage
    # run in the wrong precision, which is off by far more).
    assert torch.isfinite(vals_got).all()
    scale = exact.abs().max().item()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (vals_got - exact).abs().max().item() <= tol * scale
    assert (vals_want - exact).abs().max().item() <= tol * scale


def _fusion_args(B: int, n: int, c_i: int, c_j: int, heads: int) -> tuple:
    """(cls_i (B, c_i), tokens_j (B, 1 + n, c_j), the 18 fusion parameters), fp32."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(DEVICE)

    ln = lambda c: (r(c, scale=0.3, shift=1.0), r(c, scale=0.2))
    lin = lambda o, i: (r(o, i, scale=i**-0.5), r(o, scale=0.2))
    params = (
        *ln(c_i),
        *lin(c_j, c_i),
        *ln(c_j),
        *lin(c_j, c_j),
        *lin(c_j, c_j),
        *lin(c_j, c_j),
        *lin(c_j, c_j),
        *ln(c_j),
        *lin(c_i, c_j),
    )
    return r(B, c_i, scale=2.0), r(B, 1 + n, c_j, scale=2.0, shift=0.5), params


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", _available(DEVICE))
def test_fusion_boundaries_have_timms_dtypes(backend, dtype):
    """timm's fusion step under autocast, boundary by boundary (its rules, no timm needed):
    projs[i] -> autocast dtype (a Linear); cat(CLS, tokens_j) -> fp32 (cat promotes); the
    cross-attention block, x[:, 0:1] + attn(...) -> fp32 (the residual base is the promoted
    CLS: the sum is never rounded to the autocast dtype); revert_projs[i] -> autocast dtype."""
    from crossvit_fast.backends import fusion_params, resolve

    ops = resolve(backend, DEVICE)
    cls, tokens, p = _fusion_args(3, 7, 32, 48, 3)
    proj, attn, revert = fusion_params(p)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        c = ops.cls_proj(cls, proj, 1e-6)
        f = ops.cross_attention(c, tokens, attn, 3, 1e-6)
        y = ops.cross_attention(c, tokens, attn, 3, 1e-6, residual=False)
        r = ops.cls_proj(f, revert, 1e-6)
        fused = ops.cross_fusion(cls, tokens, fusion_params(p), 3, 1e-6)
    assert (c.dtype, y.dtype, f.dtype, r.dtype, fused.dtype) == (
        dtype,
        dtype,
        torch.float32,
        dtype,
        dtype,
    )
    # The residual sum in fp32: c + y rounded to bf16 / fp16 would be off by up to half an ulp of
    # that format (2e-3 / 5e-4 relative), far above fp32 rounding.
    exact = c.double() + y.double()
    assert (f.double() - exact).abs().max().item() <= 1e-6 * exact.abs().max().item()
    # The whole step as one op equals its three parts (to the format's rounding of the output).
    torch.testing.assert_close(fused.float(), r.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["bf16", "fp16"])
def test_stacked_fusion_blocks_keep_fp32_between_them(dtype):
    """Fusion depth 2 (the model composes CrossAttentionBlocks itself): each block's output,
    the next block's input, is fp32 under autocast, as timm's Sequential of blocks gives it."""
    model = CrossViT(tiny_config(depth=((1, 1, 2),)), backend="reference").to(DEVICE).eval()
    seen = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        for seq in model.blocks[0].fusion
        for blk in seq
    ]
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=dtype):
        model(torch.randn(2, 3, 32, 32, device=DEVICE))
    for h in hooks:
        h.remove()
    assert seen == [torch.float32] * 4


def _fp16_steps(model: CrossViT, x: torch.Tensor, steps: int = 3) -> list[float]:
    """A few fp16-autocast AdamW steps with a GradScaler on (x, fixed labels); the losses."""
    dev = x.device.type
    if model.num_classes == 0:  # a features-only golden case: give it a head to train
        model.reset_classifier(3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(dev)
    assert scaler.is_enabled()
    y = torch.arange(x.shape[0], device=x.device) % model.num_classes
    losses = []
    for _ in range(steps):
        with torch.autocast(dev, dtype=torch.float16):
            logits = model(x)
        assert logits.dtype == torch.float16
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return losses


@pytest.mark.parametrize("case", golden.CASES)
def test_fp16_gradscaler_training_has_no_nan_on_golden_configs(case):
    """The golden models carry randomised (large) LayerNorm affines, biases and tokens: a harsh
    start for fp16. Losses and weights stay finite, and the scaler lets steps through."""
    g = golden.load(case)
    model = golden.build(g, backend="reference", dtype=torch.float32).to(DEVICE).train()
    losses = _fp16_steps(model, g["input"].float().to(DEVICE))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]  # it learns: steps were taken, not all skipped


@pytest.mark.parametrize("backend", [b for b in _available("cpu") if b != "reference"])
def test_fp16_gradscaler_training_fast_backends_cpu(backend):
    """The fast backends (Triton's interpreter here) on the smallest golden config."""
    g = golden.load("plain")
    model = golden.build(g, backend=backend, dtype=torch.float32).train()
    losses = _fp16_steps(model, g["input"].float(), steps=2)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("case", golden.CASES)
@pytest.mark.parametrize("backend", _available("cuda") if DEVICE == "cuda" else ["reference"])
def test_fp16_gradscaler_training_on_gpu(case, backend):
    g = golden.load(case)
    model = golden.build(g, backend=backend, dtype=torch.float32).cuda().train()
    losses = _fp16_steps(model, g["input"].float().cuda())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_command_amp(tmp_path, amp):
    pytest.importorskip("sklearn")
    from crossvit_fast.train import main
    from crossvit_fast.train.state import load

    cfg = tmp_path / "tiny.json"
    small = {"img_size": [[16, 16], [12, 12]], "patch_size": [4, 6], "num_classes": 10}
    cfg.write_text(json.dumps({**TINY.to_dict(), **small}))
    metrics = tmp_path / "m.json"
    sizes = ["--train-samples", "32", "--val-samples", "16", "--batch-size", "8"]
    outputs = ["--out", str(tmp_path / "run"), "--metrics-json", str(metrics), "--no-progress"]
    assert main(["--model", str(cfg), "--amp", amp, "--steps", "3", *sizes, *outputs]) == 0
    m = json.loads(metrics.read_text())
    assert m["amp"] == str({"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
    assert m["loss"] == m["loss"] and m["train_loss"] == m["train_loss"]  # not NaN
    scaler = load(tmp_path / "run" / "checkpoint.pt")["scaler"]
    assert bool(scaler) == (amp == "fp16")  # fp16 trains with (and saves) a GradScaler
