"""CrossViTConfig validation, timm kwargs, and timm's drop-path schedule."""

from __future__ import annotations

import pytest

from crossvit_fast import CrossViTConfig, model_config

from .conftest import THREE_BRANCHES


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
    c = CrossViTConfig(**THREE_BRANCHES)
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


# -- every field validated, nothing coerced ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=(4.5, 8)), r"patch_size\[0\]: expected an int, got 4\.5"),
        (dict(patch_size=(12.0, 16)), r"patch_size\[0\]: expected an int, got 12\.0"),
        (dict(embed_dim=(24.7, 192)), r"embed_dim\[0\]: expected an int, got 24\.7"),
        (dict(embed_dim=("96", 192)), r"embed_dim\[0\]: expected an int, got '96'"),
        (dict(num_heads=(3, True)), r"num_heads\[1\]: expected an int, got True"),
        (dict(img_size=((240, "240"), 224)), r"img_size\[0\]\[1\]: expected an int"),
        (dict(img_size=(240.0, 224)), r"img_size\[0\]: expected an int or an \(H, W\) pair"),
        (dict(depth=((1, 4.0, 0),)), r"depth\[0\]: expected ints, got \(1, 4\.0, 0\)"),
        (dict(depth=((1, 4, False),)), r"depth\[0\]: expected ints"),
        (dict(num_classes=True), r"num_classes: expected an int, got True"),
        (dict(num_classes=10.0), r"num_classes: expected an int, got 10\.0"),
        (dict(in_chans="3"), r"in_chans: expected an int, got '3'"),
        (dict(mlp_ratio=(float("nan"), 4.0)), r"mlp_ratio\[0\]: expected a finite number"),
        (dict(mlp_ratio=(4.0, float("inf"))), r"mlp_ratio\[1\]: expected a finite number"),
        (dict(mlp_ratio=("4", 4.0)), r"mlp_ratio\[0\]: expected a finite number"),
        (dict(mlp_ratio=(0.001, 4.0)), r"mlp_ratio\[0\]: expected > 0 with an MLP at least 1"),
        (dict(qkv_bias=1), r"qkv_bias: expected True or False, got 1"),
        (dict(crop_scale="yes"), r"crop_scale: expected True or False"),
        (dict(drop_rate=True), r"drop_rate: expected a probability"),
        (dict(attn_drop_rate=float("nan")), r"attn_drop_rate: expected a probability"),
        (dict(proj_drop_rate="0.1"), r"proj_drop_rate: expected a probability"),
        (dict(norm_eps=float("nan")), r"norm_eps: expected a finite number"),
        (dict(norm_eps=0.0), r"norm_eps: expected a positive float"),
        (dict(global_pool=["token"]), r"global_pool: expected 'token' or 'avg'"),
    ],
)
def test_no_silent_coercion(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossViTConfig(**kwargs)


def test_integral_types_and_lists_are_accepted_as_exact_values():
    import numpy as np

    c = CrossViTConfig(embed_dim=[np.int64(96), 192], num_classes=np.int32(7), mlp_ratio=[4, 4])
    assert c.embed_dim == (96, 192) and type(c.embed_dim[0]) is int and c.num_classes == 7
    assert c.mlp_ratio == (4.0, 4.0) and type(c.mlp_ratio[0]) is float


@pytest.mark.parametrize(
    "depth, stage", [(((2, 1, 0),), 0), (((1, 1, 0), (2, 1, 0)), 1), (((1, 2, 0), (3, 1, 0)), 1)]
)
def test_configs_timm_cannot_build_are_refused_with_the_reason(depth, stage):
    # timm's drop-path schedule is sized by the last branch: an earlier, deeper branch runs out
    # of rates (timm's CrossVit raises IndexError; tests/test_timm.py checks that against timm).
    with pytest.raises(ValueError, match=rf"depth\[{stage}\]: .* cannot be built .*IndexError"):
        CrossViTConfig(depth=depth)


@pytest.mark.parametrize("depth", [((2, 1, 1),), ((2, 3, 0), (1, 2, 0)), ((1, 4, 0),) * 3])
def test_configs_timm_builds_are_accepted(depth):
    c = CrossViTConfig(depth=depth, drop_path_rate=0.2)
    for (rates, _), stage in zip(c.drop_path_rates(), depth):
        assert len(rates) >= max(stage[:-1])


def test_from_timm_kwargs_validate_img_scale():
    with pytest.raises(ValueError, match=r"img_scale\[1\]: expected a finite number"):
        CrossViTConfig.from_timm(img_size=224, img_scale=(1.0, float("nan")))
    with pytest.raises(ValueError, match=r"img_scale\[0\]: expected a positive scale"):
        CrossViTConfig.from_timm(img_size=224, img_scale=(0.0, 1.0))


# -- MLP widths exactly as timm builds them ---------------------------------------------------


def test_mlp_ratio_for_rebuilds_every_width():
    from crossvit_fast.config import mlp_ratio_for

    for r in (0.7, 1.1, 1.5, 2.0, 2.2, 2.5, 8 / 3, 3.0, 3.3, 4.0, 4.4, 5.3):
        for d in range(1, 1025):
            h = int(d * r)
            if h >= 1:
                assert int(d * mlp_ratio_for(d, h)) == h, (d, r)
    # the ratios come back as written where hidden / dim would build the wrong width
    for d, r in ((152, 0.7), (304, 8 / 3), (232, 2.2), (39, 2.2)):
        h = int(d * r)
        assert int(d * (h / d)) != h and mlp_ratio_for(d, h) == r
