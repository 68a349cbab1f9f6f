"""CrossViTConfig validation, timm kwargs, and timm's drop-path schedule."""

from __future__ import annotations

import pytest

from crossvit_fast import CrossViTConfig, model_config


def test_defaults_are_crossvit_tiny():
    c = CrossViTConfig()
    assert c.img_size == ((240, 240), (224, 224))
    assert c.num_patches == (400, 196)
    assert c.num_features == 96 + 192


def test_from_timm_matches_registered_sizes():
    c = CrossViTConfig.from_timm(
        img_size=408,
        img_scale=(1.0, 384 / 408),
        patch_size=(12, 16),
        embed_dim=(192, 384),
        depth=((1, 5, 0),) * 3,
        num_heads=(6, 6),
        mlp_ratio=(3.0, 3.0, 1.0),
        multi_conv=True,
    )
    assert c.img_size == ((408, 408), (384, 384))
    assert c.mlp_ratio == (3.0, 3.0)  # timm's unused third entry dropped
    assert c.num_patches == (1156, 576)


def test_from_timm_defaults_and_unknown_kwargs():
    c = CrossViTConfig.from_timm(img_size=224, img_scale=(1.0, 1.0), patch_size=(8, 16))
    assert c.embed_dim == (192, 384) and c.depth == ((1, 3, 1),) * 3  # timm's class defaults
    with pytest.raises(ValueError, match="unknown timm CrossVit argument"):
        CrossViTConfig.from_timm(img_sz=240)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=(96, 190)), r"embed_dim\[1\]=190 is not divisible by num_heads\[1\]=3"),
        (
            dict(img_size=(240, 225)),
            r"img_size\[1\]: \(225, 225\) is not divisible by patch_size\[1\]=16",
        ),
        (dict(num_heads=(3, 3, 3)), r"num_heads: expected 2 per-branch values"),
        (dict(mlp_ratio=(4.0, 4.0, 1.0)), r"mlp_ratio: expected 2 per-branch values.*from_timm"),
        (dict(depth=((1, 4),)), r"depth\[0\]: expected 3 ints"),
        (dict(depth=((0, 4, 0),)), r"depth\[0\]: branch depths must be >= 1"),
        (
            dict(
                patch_size=(12,), img_size=(240,), embed_dim=(96,), num_heads=(3,), mlp_ratio=(4.0,)
            ),
            ">= 2 branches",
        ),
        (dict(multi_conv=True, patch_size=(8, 16), img_size=(240, 224)), "patch sizes 12 and 16"),
        (dict(drop_path_rate=1.0), r"drop_path_rate: expected a probability"),
        (dict(global_pool="max"), "global_pool: expected 'token' or 'avg'"),
        (dict(num_classes=-1), "num_classes"),
        (dict(in_chans=0), "in_chans"),
        (dict(embed_dim=96), r"embed_dim: expected a tuple"),
    ],
)
def test_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossViTConfig(**kwargs)


def test_three_branches_validate():
    c = CrossViTConfig(
        img_size=(48, 32, 32),
        patch_size=(12, 16, 8),
        embed_dim=(32, 64, 48),
        depth=((1, 1, 1, 0),),
        num_heads=(2, 2, 3),
        mlp_ratio=(2.0, 2.0, 2.0),
    )
    assert c.num_branches == 3 and c.num_patches == (16, 4, 16)


def test_drop_path_schedule_is_timms():
    # crossvit_15_240 at rate 0.1: 15 slots; values from the spec (§5), verified against timm.
    sched = model_config("crossvit_15_240", drop_path_rate=0.1).drop_path_rates()
    (b0, f0), (b1, f1), (b2, f2) = sched
    assert len(b0) == 5 and b0[0] == 0.0
    assert b0[1] == pytest.approx(0.1 / 14) and f0 == pytest.approx(0.0286, abs=1e-4)
    assert b1[0] == pytest.approx(0.0357, abs=1e-4) and f1 == pytest.approx(0.0643, abs=1e-4)
    assert b2[0] == pytest.approx(0.0714, abs=1e-4) and f2 == pytest.approx(0.1, abs=1e-7)


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown CrossViTConfig field"):
        CrossViTConfig().replace(bogus=1)
