"""create_model(name, pretrained=...): timm's published weights through huggingface_hub's cache,
tested offline against a cache laid out here (no network), plus "org/repo" and local files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import crossvit_fast
from crossvit_fast import create_model

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

NAME = "crossvit_tiny_240"  # the smallest registered variant (7M parameters)
REPO = "timm/crossvit_tiny_240.in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.usefixtures("one_thread")  # 7M-parameter inits: ~4x faster on 1 thread


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(state_dict, path of a model.safetensors) standing in for timm's published file."""
    torch.manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module fixtures run before the one_thread fixture)
    with torch.no_grad():
        m = create_model(NAME, backend="reference")
    torch.set_num_threads(threads)
    with torch.no_grad():
        for p in m.parameters():  # distinguishable from any fresh init
            p.add_(0.5)
    sd = m.state_dict()
    path = tmp_path_factory.mktemp("published") / "model.safetensors"
    save_file(sd, path)
    return sd, path


def lay_out_cache(hub_cache, repo: str, weights) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/file}."""
    root = hub_cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "snapshots" / COMMIT).mkdir(parents=True)
    os.link(weights, root / "snapshots" / COMMIT / "model.safetensors")  # no 28 MB copy


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty hub cache under tmp_path, offline. huggingface_hub reads HF_HOME and
    HF_HUB_OFFLINE when it is imported (test_env_variables_are_honoured checks that path in a
    fresh process); here the values it read are replaced."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _assert_weights(model, sd, skip=()):
    for k, v in model.state_dict().items():
        if not k.startswith(skip):
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_pretrained_true_reads_timms_repo_from_the_cache(offline_cache, published):
    sd, weights = published
    lay_out_cache(offline_cache, REPO, weights)
    model = create_model(NAME, pretrained=True, backend="reference")
    _assert_weights(model, sd)


def test_other_num_classes_gets_a_fresh_head_as_in_timm(offline_cache, published):
    sd, weights = published
    lay_out_cache(offline_cache, REPO, weights)
    torch.manual_seed(7)
    model = create_model(NAME, pretrained=True, num_classes=10, backend="reference")
    torch.manual_seed(7)
    fresh = create_model(NAME, num_classes=10, backend="reference")
    _assert_weights(model, sd, skip=("head.",))
    for k, v in model.head.state_dict().items():  # the constructor's (timm's) init, untouched
        torch.testing.assert_close(v, fresh.head.state_dict()[k], rtol=0, atol=0)
    assert model.config.num_classes == 10
    features = create_model(NAME, pretrained=True, num_classes=0, backend="reference")
    _assert_weights(features, sd, skip=("head.",))


def test_pretrained_org_repo_and_local_files(offline_cache, published, tmp_path):
    sd, weights = published
    lay_out_cache(offline_cache, "someone/my-crossvit", weights)
    _assert_weights(create_model(NAME, pretrained="someone/my-crossvit"), sd)
    _assert_weights(create_model(NAME, pretrained="hf-hub:someone/my-crossvit"), sd)
    _assert_weights(create_model(NAME, pretrained=str(weights)), sd)
    torch.save(sd, tmp_path / "W.PTH")
    _assert_weights(create_model(NAME, pretrained=tmp_path / "W.PTH"), sd)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        create_model(NAME, pretrained=str(tmp_path / "missing.pth"))


def test_offline_and_not_cached_says_which_repo_and_how_to_get_it(offline_cache):
    with pytest.raises(RuntimeError) as info:
        create_model(NAME, pretrained=True)
    msg = str(info.value)
    assert f"{REPO}/model.safetensors" in msg and "HF_HUB_OFFLINE" in msg, msg
    assert f"hf download {REPO} model.safetensors" in msg and "pretrained='/path/to/" in msg


def test_weights_of_another_variant_are_refused_naming_the_file(offline_cache, published):
    _, weights = published
    with pytest.raises(RuntimeError, match=r"model\.safetensors: does not fit crossvit_9_240"):
        create_model("crossvit_9_240", pretrained=str(weights))


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"crossvit_fast\[hub\]"):
        create_model(NAME, pretrained=True)


def test_bad_pretrained_values():
    with pytest.raises(ValueError, match="pretrained"):
        create_model(NAME, pretrained=3)
    with pytest.raises(ValueError, match="neither a checkpoint file"):
        create_model(NAME, pretrained="not a repo")


def test_env_variables_are_honoured(tmp_path, published):
    """A fresh process with HF_HOME and HF_HUB_OFFLINE=1 set as a user would: the cache under
    HF_HOME is used, and a repo missing from it is a clear error, not a network call."""
    _, weights = published
    lay_out_cache(tmp_path / "home" / "hub", REPO, weights)
    code = textwrap.dedent(f"""
        import crossvit_fast
        m = crossvit_fast.create_model({NAME!r}, pretrained=True, backend="reference")
        print("loaded", float(m.cls_token_0.sum()))
        try:
            crossvit_fast.create_model("crossvit_9_240", pretrained=True)
        except RuntimeError as e:
            print("refused", "timm/crossvit_9_240.in1k" in str(e))
    """)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(crossvit_fast.__file__)), env.get("PYTHONPATH", "")]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    want = float(published[0]["cls_token_0"].sum())
    lines = out.stdout.split("\n")
    assert lines[0].startswith("loaded") and float(lines[0].split()[1]) == pytest.approx(want)
    assert lines[1] == "refused True", out.stdout
