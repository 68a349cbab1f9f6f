"""Against an installed timm (skips without it; CI need not have timm, the golden vectors in
tests/data/golden carry timm's numbers there): from_timm carries every rate and MLP width,
configs timm cannot build are refused as timm refuses them, reset_classifier initialises as timm
does, and under autocast every stage boundary has timm's dtype and timm's values."""

from __future__ import annotations

import pytest
import torch

import crossvit_fast
from crossvit_fast import CrossViT, CrossViTConfig

from .conftest import TIMM_RATES

timm = pytest.importorskip("timm")
from timm.models.crossvit import CrossVit  # noqa: E402

pytestmark = [pytest.mark.timm, pytest.mark.usefixtures("one_thread")]

SMALL = dict(
    img_size=32,
    img_scale=(1.0, 0.5),
    patch_size=(8, 8),
    embed_dim=(24, 48),
    depth=((1, 2, 0),),
    num_heads=(3, 3),
    mlp_ratio=(2.0, 2.0, 1.0),
    num_classes=5,
)


def test_from_timm_carries_every_rate():
    t = CrossVit(**{**SMALL, "depth": ((1, 2, 0), (1, 1, 1))}, **TIMM_RATES)
    ours = crossvit_fast.from_timm(t, backend="reference")
    for k, v in TIMM_RATES.items():
        assert getattr(ours.config, k) == v, k
    # and the rebuilt schedule is timm's, module by module
    assert ours.config.replace() == CrossViTConfig.from_timm(
        **{**SMALL, "depth": ((1, 2, 0), (1, 1, 1))}, **TIMM_RATES
    )


@pytest.mark.parametrize("dim, ratio", [(152, 0.7), (304, 8 / 3), (232, 2.2), (39, 2.2)])
def test_from_timm_rebuilds_mlp_widths_that_hidden_over_dim_would_not(dim, ratio):
    t = CrossVit(
        img_size=16,
        img_scale=(1.0, 1.0),
        patch_size=(8, 16),
        embed_dim=(dim, 8),
        depth=((1, 1, 0),),
        num_heads=(1, 1),
        mlp_ratio=(ratio, 2.0, 1.0),
        num_classes=3,
    )
    hidden = t.blocks[0].blocks[0][0].mlp.fc1.out_features
    assert hidden == int(dim * ratio) and int(dim * (hidden / dim)) != hidden
    ours = crossvit_fast.from_timm(t, backend="reference")  # loads strictly
    assert ours.config.mlp_hidden[0] == hidden and ours.config.mlp_ratio[0] == ratio


@pytest.mark.parametrize("depth", [((2, 1, 0),), ((1, 1, 0), (2, 1, 0)), ((1, 2, 0), (3, 1, 0))])
def test_configs_timm_cannot_build_are_refused_up_front(depth):
    with pytest.raises(IndexError):
        CrossVit(**{**SMALL, "depth": depth})
    with pytest.raises(ValueError, match=r"depth\[\d\]: .* cannot be built"):
        CrossViTConfig.from_timm(**{**SMALL, "depth": depth})


@pytest.mark.parametrize("depth", [((2, 1, 1),), ((2, 3, 0), (1, 2, 0))])
def test_configs_timm_builds_with_deeper_early_branches_are_accepted(depth):
    t = CrossVit(**{**SMALL, "depth": depth}, drop_path_rate=0.2)
    ours = crossvit_fast.from_timm(t, backend="reference")
    assert ours.config == CrossViTConfig.from_timm(**{**SMALL, "depth": depth}, drop_path_rate=0.2)


def test_reset_classifier_initialises_as_timm():
    t = CrossVit(**SMALL)
    ours = crossvit_fast.from_timm(t, backend="reference")
    torch.manual_seed(3)
    t.reset_classifier(9, "avg")
    torch.manual_seed(3)
    ours.reset_classifier(9, "avg")
    assert ours.config.num_classes == 9 and ours.config.global_pool == "avg"
    for k, v in t.head.state_dict().items():
        torch.testing.assert_close(ours.head.state_dict()[k], v, rtol=0, atol=0)
    CrossViT(ours.config).load_state_dict(ours.state_dict())  # the config is true again


def _stage_outputs(model, x, dtype):
    """Output of every stage boundary: stems (+ CLS + pos), each stage, final norms, logits."""
    seen = {}

    def keep(name):
        return lambda mod, inp, out: seen.__setitem__(name, out)

    hooks = [s.register_forward_hook(keep(f"blocks.{i}")) for i, s in enumerate(model.blocks)]
    try:
        with torch.autocast("cpu", dtype=dtype), torch.no_grad():
            feats = model.forward_features(x)
            seen["logits"] = model.forward_head(feats)
    finally:
        for h in hooks:
            h.remove()
    seen["norm"] = feats
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fusion_depth", [0, 2])
def test_autocast_every_stage_has_timms_dtype_and_values(dtype, fusion_depth):
    t = CrossVit(**{**SMALL, "depth": ((1, 2, fusion_depth), (1, 1, fusion_depth))}).eval()
    ours = crossvit_fast.from_timm(t, backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    want, got = _stage_outputs(t, x, dtype), _stage_outputs(ours, x, dtype)
    assert list(got) == list(want)
    for name, w in want.items():
        ws, gs = (w, got[name]) if isinstance(w, list) else ([w], [got[name]])
        for i, (a, b) in enumerate(zip(gs, ws)):
            assert a.dtype == b.dtype, (name, i, a.dtype, b.dtype)
            # the reference runs timm's ops in timm's order: the same bits
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}[{i}]")


def test_pretrained_repo_names_timms_default_cfg():
    for name in crossvit_fast.list_models():
        cfg = timm.models.get_pretrained_cfg(name + ".in1k")
        assert cfg.hf_hub_id == crossvit_fast.registry.pretrained_repo(name), name
