"""Public API of the model: timm-compatible names and counts, heads, pooling, resizing, backends,
checkpoint loading and errors for bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import crossvit_fast
from crossvit_fast import CrossViT, CrossViTConfig, create_model, list_models

from . import golden
from .conftest import SMALL_KWARGS, THREE_BRANCHES, TIMM_RATES, tiny_config

# timm's parameter counts (results/benchmark-infer-*.csv, verified by instantiation).
TIMM_PARAMS = {
    "crossvit_tiny_240": 7_014_800,
    "crossvit_small_240": 26_856_272,
    "crossvit_base_240": 105_025_232,
    "crossvit_9_240": 8_553_296,
    "crossvit_15_240": 27_528_464,
    "crossvit_18_240": 43_271_408,
    "crossvit_9_dagger_240": 8_776_592,
    "crossvit_15_dagger_240": 28_209_008,
    "crossvit_18_dagger_240": 44_266_976,
    "crossvit_15_dagger_408": 28_500_080,
    "crossvit_18_dagger_408": 44_606_560,
}

SMALL = tiny_config(**SMALL_KWARGS)


def small(**kw) -> CrossViT:
    return CrossViT(SMALL.replace(**kw), backend="reference")


def test_list_models_is_timms_eleven():
    assert sorted(list_models()) == sorted(TIMM_PARAMS)


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_parameter_counts_match_timm(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = create_model(name)
    assert sum(p.numel() for p in m.parameters()) == TIMM_PARAMS[name]
    assert m.config.img_size[0] == ((408, 408) if name.endswith("408") else (240, 240))


@pytest.mark.parametrize("case", golden.CASES)
def test_state_dict_keys_and_shapes_equal_timms(case):
    g = golden.load(case)
    m = golden.build(g)
    sd = m.state_dict()
    assert list(sd) == list(g["state_dict"])  # same names, same order
    assert all(sd[k].shape == v.shape for k, v in g["state_dict"].items())
    assert [list(s) for s in m.img_size_scaled] == g["img_size_scaled"]


def test_forward_features_and_head():
    m = small().eval()
    x = torch.randn(3, 3, 48, 48)
    feats = m.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(3, 17, 32), (3, 5, 64)]
    assert m(x).shape == (3, 5)
    assert m.forward_head(feats, pre_logits=True).shape == (3, 96)
    logits = m.forward_head(feats)
    expect = (m.head[0](feats[0][:, 0]) + m.head[1](feats[1][:, 0])) / 2
    torch.testing.assert_close(logits, expect)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_pooling_the_cls_rows_equals_forward_head_of_forward_features(backend):
    """`forward` skips the last stage's token rows and normalises only the CLS rows (what token
    pooling reads): the same logits (bitwise) and gradients as forward_head(forward_features)."""
    torch.manual_seed(0)
    m = CrossViT(SMALL.replace(depth=((1, 1, 0), (1, 1, 0))), backend=backend)
    x = torch.randn(2, 3, 48, 48, requires_grad=True)

    def run(fn):
        m.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x)
        (out * torch.arange(1.0, 6.0)).sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in m.parameters()]

    out, gx, gp = run(m)
    out_f, gx_f, gp_f = run(lambda t: m.forward_head(m.forward_features(t)))
    assert torch.equal(out, out_f)
    torch.testing.assert_close(gx, gx_f, rtol=1e-6, atol=1e-7)
    for a, b in zip(gp, gp_f):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_num_classes_zero_gives_features_and_reset_classifier():
    m = small(num_classes=0).eval()
    x = torch.randn(2, 3, 48, 48)
    assert m(x).shape == (2, 96)
    m.reset_classifier(11, global_pool="avg")
    assert m(x).shape == (2, 11) and m.global_pool == "avg"
    feats = m.forward_features(x)
    expect = (m.head[0](feats[0][:, 1:].mean(1)) + m.head[1](feats[1][:, 1:].mean(1))) / 2
    torch.testing.assert_close(m(x), expect)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="max")


def test_no_weight_decay_names():
    assert small().no_weight_decay() == {"cls_token_0", "cls_token_1", "pos_embed_0", "pos_embed_1"}


def test_three_branch_model_runs_and_names_follow_the_pattern():
    cfg = CrossViTConfig(**THREE_BRANCHES, num_classes=4)
    m = CrossViT(cfg)
    assert {"cls_token_2", "pos_embed_2", "blocks.0.fusion.2.attn.wq.weight"} <= set(m.state_dict())
    out = m(torch.randn(2, 3, 48, 48))
    out.sum().backward()
    assert out.shape == (2, 4) and m.cls_token_2.grad is not None


def test_any_input_size_is_resized_as_timm():
    m = small().eval()
    x = torch.randn(1, 3, 40, 40)
    feats = m.forward_features(x)  # both branches resized (bicubic)
    assert feats[0].shape == (1, 17, 32) and feats[1].shape == (1, 5, 64)
    crop = small(crop_scale=True).eval()
    crop.load_state_dict(m.state_dict())
    big = torch.randn(1, 3, 56, 56)
    # crop_scale: centre crop (offsets round((56-48)/2)=4, round((56-32)/2)=12), not a resize
    ref = crop.forward_features(big[:, :, 4:52, 4:52])[0]
    torch.testing.assert_close(crop.forward_features(big)[0], ref)


def test_drop_path_is_stochastic_in_training_only():
    m = small(drop_path_rate=0.5)
    x = torch.randn(4, 3, 48, 48)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_dropout_rates_are_applied_in_training():
    m = small(proj_drop_rate=0.5, attn_drop_rate=0.5, pos_drop_rate=0.5, drop_rate=0.5).train()
    x = torch.randn(2, 3, 48, 48)
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


def test_grad_checkpointing_gives_same_gradients():
    m = small(depth=((1, 2, 0), (1, 1, 1)))
    x = torch.randn(2, 3, 48, 48)
    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


# -- backends ------------------------------------------------------------------------------


def test_available_backends_reports_reasons():
    avail = crossvit_fast.available_backends()
    assert set(avail) == {"reference", "triton", "cuda"}
    assert avail["reference"][0] is True
    for ok, why in avail.values():
        assert isinstance(ok, bool) and isinstance(why, str) and why


def test_backend_property_set_backend_and_repr():
    m = CrossViT(SMALL)
    assert m.backend == "auto" and "backend='auto'" in repr(m)
    assert m.set_backend("reference") is m and m.backend == "reference"
    assert set(m.opset("cpu").sources.values()) == {"reference"}
    with pytest.raises(ValueError, match="backend must be one of"):
        m.set_backend("fastest")


# The sub-layer ops (timm's Attention / Mlp / CrossAttention alone) take dropout too.
DROPOUT_LAYERS = ("attention_layer", "mlp_layer", "cross_attention_layer")


def test_repr_names_the_backend_of_every_op():
    m = CrossViT(SMALL)
    text = m.extra_repr()
    for op in crossvit_fast.backends.OPS:
        assert f"{op}=reference" in text
    drop = ("self_attention", "mlp", "cross_attention", *DROPOUT_LAYERS)
    assert "dropout_ops=(" + ", ".join(f"{op}=reference" for op in drop) + ")" in text


def test_dropout_is_a_declared_capability_of_the_table():
    """Active dropout runs `OpSet.with_dropout(op)`: the op of a backend declaring DROPOUT_OPS
    (only the reference today); the model itself imports no op implementation."""
    import ast
    import inspect

    import crossvit_fast.blocks
    import crossvit_fast.model

    for module in (crossvit_fast.model, crossvit_fast.blocks):
        tree = ast.parse(inspect.getsource(module))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and "ops" in m.split(".") for m in imported), (module, imported)
    ops = crossvit_fast.backends.resolve("auto", "cpu")
    assert ops.dropout_sources == dict.fromkeys(
        ("self_attention", "mlp", "cross_attention", *DROPOUT_LAYERS), "reference"
    )
    assert ops.with_dropout("mlp") is ops.mlp
    with pytest.raises(NotImplementedError, match="patch_embed"):
        ops.with_dropout("patch_embed")


def test_submodules_run_alone_with_timms_signatures_and_hooks():
    """Block(x) and CrossAttentionBlock(x) are timm's forwards, on the model's shared op set:
    calling one alone, a forward hook and a feature tap see what the model computes."""
    m = CrossViT(SMALL).double().eval()
    blk = m.blocks[0].blocks[0][0]
    assert blk._ops is m._ops and m.blocks[0].fusion[0]._ops is m._ops
    taps = []
    handle = blk.register_forward_hook(lambda mod, args, out: taps.append((args[0], out)))
    x = torch.randn(2, 3, *SMALL.img_size[0], dtype=torch.float64)
    m(x)
    handle.remove()
    ((inp, out),) = taps
    torch.testing.assert_close(blk(inp), out, rtol=0, atol=0)
    # CrossAttentionBlock(x): x = cat(CLS, tokens) -> (B, 1, C) = x[:, :1] + attn(LN1(x))
    f = m.blocks[0].fusion[0]
    C = f.norm1.normalized_shape[0]
    seq = torch.randn(2, 5, C, dtype=torch.float64)
    n = torch.nn.functional.layer_norm(seq, (C,), f.norm1.weight, f.norm1.bias, f.eps)
    a = f.attn
    H, d = a.num_heads, C // a.num_heads
    q = a.wq(n[:, :1]).view(2, 1, H, d).transpose(1, 2)
    k = a.wk(n).view(2, 5, H, d).transpose(1, 2)
    v = a.wv(n).view(2, 5, H, d).transpose(1, 2)
    o = ((q @ k.transpose(-2, -1)) * d**-0.5).softmax(-1) @ v
    want = seq[:, :1] + a.proj(o.transpose(1, 2).reshape(2, 1, C))
    torch.testing.assert_close(f(seq), want)
    m.set_backend("reference")
    assert blk._ops.backend == "reference"


def test_sublayers_have_timms_forwards_and_compose_to_the_fused_blocks():
    """Attention / Mlp / CrossAttention (input already normalised) and PatchEmbed(x) are timm's
    forwards on the model's op set; composed as timm's blocks compose them, they give the fused
    ops' results, and a stage runs alone without being handed the ops."""
    m = CrossViT(SMALL).double().eval()
    blk, f, pe = m.blocks[0].blocks[0][0], m.blocks[0].fusion[0], m.patch_embed[0]
    assert {blk.attn._ops, blk.mlp._ops, f.attn._ops, pe._ops, m.blocks[0]._ops} == {m._ops}
    x = torch.randn(2, 7, blk.norm1.normalized_shape[0], dtype=torch.float64)
    h = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), h + blk.mlp(blk.norm2(h)), rtol=1e-13, atol=1e-13)
    seq = torch.randn(2, 5, f.norm1.normalized_shape[0], dtype=torch.float64)
    want = seq[:, :1] + f.attn(f.norm1(seq))
    torch.testing.assert_close(f(seq), want, rtol=1e-13, atol=1e-13)
    img = torch.randn(2, 3, *SMALL.img_size[0], dtype=torch.float64)
    patches = pe(img)  # timm's PatchEmbed output: (B, N, D), no CLS
    assert patches.shape == (2, SMALL.num_patches[0], SMALL.embed_dim[0])
    cls, pos = m.cls_token_0, m.pos_embed_0
    tokens = pe(img, cls, pos)
    torch.testing.assert_close(tokens, torch.cat([cls.expand(2, -1, -1), patches], 1) + pos)
    xs = [tokens, pe_1 := m.patch_embed[1](img[..., :32, :32], m.cls_token_1, m.pos_embed_1)]
    out = m.blocks[0](xs)
    assert [t.shape for t in out] == [tokens.shape, pe_1.shape]


def test_hooks_on_sublayers_fire_and_see_timms_tensors():
    """Forward hooks on a block's sub-layers or norms, on a fusion block or on projs make those
    run module by module (timm's order): the hooks fire with timm's tensors and the logits and
    gradients are the fused path's."""
    torch.manual_seed(0)
    m = CrossViT(SMALL).double()
    x = torch.randn(2, 3, *SMALL.img_size[0], dtype=torch.float64)
    want = m(x)
    want_grads = torch.autograd.grad(want.sum(), list(m.parameters()))
    stage = m.blocks[0]
    blk, f = stage.blocks[1][0], stage.fusion[0]
    seen = {}
    hooks = [
        mod.register_forward_hook(lambda mod, a, o, n=name: seen.update({n: o.shape}))
        for name, mod in [
            ("attn", blk.attn),
            ("norm2", blk.norm2),
            ("fusion", f),
            ("fusion.attn", f.attn),
            ("projs.0", stage.projs[0]),
            ("revert_projs.0.2", stage.revert_projs[0][2]),
        ]
    ]
    got = m(x)
    grads = torch.autograd.grad(got.sum(), list(m.parameters()))
    for hk in hooks:
        hk.remove()
    C1, C0 = SMALL.embed_dim[1], SMALL.embed_dim[0]
    N1 = 1 + SMALL.num_patches[1]
    assert seen == {
        "attn": (2, N1, C1),
        "norm2": (2, N1, C1),
        "fusion": (2, 1, C1),
        "fusion.attn": (2, 1, C1),
        "projs.0": (2, 1, C1),
        "revert_projs.0.2": (2, 1, C0),
    }
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_sublayer_ops_are_table_ops_served_by_the_reference():
    """The sub-layer ops are table entries like any other: a fast backend without them falls back
    to the reference (named in `sources`), and their dropout variants are declared."""
    ops = crossvit_fast.backends.resolve("triton", "cpu")
    for op in DROPOUT_LAYERS:
        assert ops.sources[op] == "reference" and ops.dropout_sources[op] == "reference"
    m = CrossViT(SMALL.replace(attn_drop_rate=0.5, proj_drop_rate=0.5)).double().train()
    attn = m.blocks[0].blocks[0][0].attn
    x = torch.randn(2, 6, attn.qkv.in_features, dtype=torch.float64)
    assert not torch.equal(attn(x), attn(x))  # dropout active in training
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)


def test_auto_on_cpu_is_the_reference():
    assert set(CrossViT(SMALL).opset("cpu").sources.values()) == {"reference"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_backend_unavailable_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        small().set_backend("cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from crossvit_fast import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = backends.backend_availability("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        backends.resolve("triton", "cpu")


def test_ops_take_parameter_groups_or_plain_tuples_of_their_fields():
    """An op's parameter group: the NamedTuple, or a plain tuple of the same fields (same
    output); anything else is a ValueError naming the fields expected and what came."""
    from crossvit_fast.backends import MlpParams
    from crossvit_fast.ops import reference

    x, C = torch.randn(2, 3, 8), 8
    p = (torch.ones(C), torch.zeros(C), torch.randn(16, C), None, torch.randn(C, 16), None)
    torch.testing.assert_close(reference.mlp(x, MlpParams(*p), 1e-6), reference.mlp(x, p, 1e-6))
    with pytest.raises(ValueError, match=r"expected MlpParams\('norm_weight'.*got 5 items"):
        reference.mlp(x, p[:5], 1e-6)
    with pytest.raises(ValueError, match=r"expected MlpParams.*got Tensor"):
        reference.mlp(x, p[2], 1e-6)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, err, match",
    [
        (
            torch.randn(2, 4, 48, 48),
            ValueError,
            r"expected 3 input channels .* got shape \(2, 4, 48, 48\)",
        ),
        (torch.randn(3, 48, 48), ValueError, "missing batch dimension"),
        (
            torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8),
            ValueError,
            "floating-point.*uint8",
        ),
        (
            torch.randn(2, 3, 48, 48, dtype=torch.float64),
            ValueError,
            "dtype torch.float64 does not match.*float32",
        ),
        ([1, 2], TypeError, "expected a torch.Tensor"),
    ],
)
def test_bad_input_errors(x, err, match):
    with pytest.raises(err, match=match):
        small()(x)


def test_valid_input_prints_no_warnings():
    m = small()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(torch.randn(2, 3, 48, 48)).sum().backward()
        m.eval()(torch.randn(1, 3, 40, 40))


def test_batch_zero_and_one():
    m = small().eval()
    assert m(torch.randn(0, 3, 48, 48)).shape == (0, 5)
    assert m(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_autocast_bf16_on_cpu_runs():
    m = small().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 48, 48))
    assert out.dtype == torch.bfloat16


# -- timm ----------------------------------------------------------------------------------


def test_from_timm_round_trip_on_a_timm_shaped_model():
    # Our modules carry timm's attribute names, so from_timm reads them like a timm CrossVit.
    src = small(depth=((1, 2, 0), (1, 1, 2)), qkv_bias=False, global_pool="avg").eval()
    dst = crossvit_fast.from_timm(src, backend="reference")
    assert dst.config == src.config and not dst.training
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(TypeError, match="expected a timm CrossVit"):
        crossvit_fast.from_timm(torch.nn.Linear(2, 2))


class DropPath(torch.nn.Module):
    """Stands in for timm.layers.DropPath (from_timm reads `drop_prob` of modules so named)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob


def _timm_shaped(model: CrossViT) -> CrossViT:
    """Our model with timm's rate-carrying modules in timm's places (nn.Dropout / DropPath where
    ours holds floats), so from_timm reads it as it reads a timm CrossVit."""
    model.head_drop, model.pos_drop = (
        torch.nn.Dropout(p) for p in (model.head_drop, model.pos_drop)
    )
    for stage in model.blocks:
        for seq in stage.blocks:
            for blk in seq:
                blk.drop_path1 = (
                    DropPath(blk.drop_path) if blk.drop_path > 0 else torch.nn.Identity()
                )
                blk.attn.attn_drop = torch.nn.Dropout(blk.attn.attn_drop)
                blk.attn.proj_drop = torch.nn.Dropout(blk.attn.proj_drop)
                blk.mlp.drop1 = torch.nn.Dropout(blk.mlp.drop)
        for f in stage.fusion:
            for blk in f if isinstance(f, torch.nn.Sequential) else [f]:
                blk.drop_path = (
                    DropPath(blk.drop_path) if blk.drop_path > 0 else torch.nn.Identity()
                )
    return model


def test_from_timm_carries_rates_and_mlp_widths():
    # width 152 at ratio 0.7: timm's MLP is int(106.39999999999999) = 106, and 106 / 152 would
    # rebuild 105 (so would a naive from_timm, which then failed to load)
    cfg = SMALL.replace(
        embed_dim=(152, 64),
        num_heads=(4, 4),
        mlp_ratio=(0.7, 3.0),
        depth=((1, 2, 0), (1, 1, 1)),
        **TIMM_RATES,
    )
    src = _timm_shaped(CrossViT(cfg, backend="reference"))
    dst = crossvit_fast.from_timm(src, backend="reference")
    assert dst.config == cfg
    assert dst.blocks[0].blocks[0][0].mlp.fc1.out_features == 106


def test_reset_classifier_keeps_the_config_true_and_initialises_as_timm():
    m = small(global_pool="token")
    torch.manual_seed(5)
    m.reset_classifier(9, global_pool="avg")
    assert (
        (m.config.num_classes, m.config.global_pool) == (9, "avg") == (m.num_classes, m.global_pool)
    )
    CrossViT(m.config).load_state_dict(m.state_dict())  # the config rebuilds this state_dict
    # timm's reset_classifier: plain nn.Linear layers, PyTorch's default init, in branch order
    torch.manual_seed(5)
    want = [torch.nn.Linear(d, 9) for d in m.config.embed_dim]
    for h, w in zip(m.head, want):
        torch.testing.assert_close(h.weight, w.weight, rtol=0, atol=0)
        torch.testing.assert_close(h.bias, w.bias, rtol=0, atol=0)
    m.reset_classifier(0)
    assert m.config.num_classes == 0 and m(torch.randn(1, 3, 48, 48)).shape == (1, 96)
    with pytest.raises(ValueError, match="num_classes: expected an int"):
        m.reset_classifier(2.0)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(2, "max")
