"""`python -m crossvit_fast train`: the default run's accuracy, exact resume, checkpoint safety,
metrics, data sources, batch plans and the optimisation recipe. Runs in-process (no interpreter
start-up per case) on small slices of the bundled digits."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crossvit_fast
from crossvit_fast.train import DEFAULT_CONFIG, main, parse_args
from crossvit_fast.train import data as data_mod
from crossvit_fast.train.optim import lr_multiplier, param_groups
from crossvit_fast.train.state import CHECKPOINT_NAME, CheckpointError, load
from crossvit_fast.train.trainer import Trainer

from .conftest import write_image_folder

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {**DEFAULT_CONFIG.to_dict(), "depth": [[1, 1, 0]]}


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_default_run_learns_digits(tmp_path):
    """The README's main job, with its default model, data and schedule (10 epochs of the digits):
    validation accuracy must be well above chance (0.1); it reaches ~0.96."""
    metrics = tmp_path / "metrics.json"
    assert main(["--out", str(tmp_path / "run"), "--metrics-json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert set(m) >= {"accuracy", "loss", "img_per_s", "steps"}
    assert m["steps"] == 10 * (1438 // 64)
    assert m["accuracy"] >= 0.6, m
    assert m["img_per_s"] > 0 and math.isfinite(m["loss"])
    assert (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_importing_needs_no_training_dependencies():
    """tqdm, Pillow and scikit-learn (the `train` extra) load only when a run needs them."""
    code = (  # torch itself imports tqdm when it is installed (torch.hub): count only ours
        "import sys, torch; before = set(sys.modules); "
        "import crossvit_fast, crossvit_fast.train, crossvit_fast.train.data, crossvit_fast.train.trainer; "
        "print(sorted(m for m in ('tqdm', 'PIL', 'sklearn') if m in set(sys.modules) - before))"
    )
    repo = str(Path(crossvit_fast.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_metrics_json_and_checkpoint_contents(tmp_path, quick):
    out, metrics = tmp_path / "run", tmp_path / "m" / "metrics.json"
    args = [*quick, "--steps", "3", "--out", str(out), "--metrics-json", str(metrics)]
    assert main(args) == 0
    m = json.loads(metrics.read_text())
    assert m["steps"] == 3 and 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
    assert m["img_per_s"] > 0
    st = load(out / CHECKPOINT_NAME)  # weights_only=True
    assert st["step"] == 3
    assert set(st) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config", "run"}
    assert st["config"]["num_classes"] == 10 and st["run"]["total_steps"] == 3
    assert len(st["rng"]) == 1 and st["rng"][0]["cpu"].dtype == torch.uint8
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # no temp file left behind


def _final_state(out) -> dict:
    return load(os.path.join(out, CHECKPOINT_NAME))


def test_resume_equals_uninterrupted_training(tmp_path, quick):
    """Interrupt after step 3 (a checkpoint is written there), resume, and finish: every weight,
    optimizer moment, EMA average, the LR schedule and the metrics equal an uninterrupted run's
    exactly. The run crosses an epoch boundary (6 steps / epoch) and uses drop-path, mixup and
    cutmix, so data order and RNG state all matter."""
    common = [
        *quick,
        "--steps",
        "8",
        "--save-every",
        "3",
        "--drop-path",
        "0.2",
        "--ema",
        "0.9",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
    ]
    a_out, b_out = str(tmp_path / "a"), str(tmp_path / "b")

    t = Trainer(parse_args([*common, "--out", a_out]))
    full = t.run()
    t.close()

    t = Trainer(parse_args([*common, "--out", b_out]))
    t.run(until_step=3)  # "killed" here
    t.close()
    assert _final_state(b_out)["step"] == 3
    t = Trainer(parse_args([*common, "--out", b_out, "--resume"]))
    assert t.step == 3
    resumed = t.run()
    t.close()

    a, b = _final_state(a_out), _final_state(b_out)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for name, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][name][k]), (name, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert torch.equal(a["rng"][0]["cpu"], b["rng"][0]["cpu"])
    assert full["accuracy"] == resumed["accuracy"] and full["loss"] == resumed["loss"]


def test_mismatched_checkpoint_is_a_clear_error_and_never_overwritten(tmp_path, quick, capsys):
    out = tmp_path / "run"
    assert main([*quick, "--steps", "2", "--out", str(out)]) == 0
    ckpt = out / CHECKPOINT_NAME
    before, mtime = _sha(ckpt), ckpt.stat().st_mtime_ns
    capsys.readouterr()

    # Different options: refused, listing what differs.
    assert main([*quick, "--steps", "2", "--batch-size", "4", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different run" in err and "batch_size: checkpoint 8, this run 4" in err

    # A different model (JSON config): refused, naming the field.
    cfg = tmp_path / "wide.json"
    cfg.write_text(json.dumps({**TINY, "mlp_ratio": [3.0, 2.0]}))
    assert main([*quick, "--steps", "2", "--out", str(out), "--resume", "--model", str(cfg)]) == 2
    assert "model mlp_ratio: checkpoint [2.0, 2.0], this run [3.0, 2.0]" in capsys.readouterr().err

    # A new run into the same directory: refused (would overwrite the checkpoint).
    assert main([*quick, "--steps", "2", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _sha(ckpt) == before and ckpt.stat().st_mtime_ns == mtime


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path, quick, capsys):
    out = tmp_path / "run"
    assert main([*quick, "--steps", "1", "--out", str(out)]) == 0
    ckpt = out / CHECKPOINT_NAME
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])  # truncated, as by a crash in a non-atomic writer
    before = _sha(ckpt)
    capsys.readouterr()
    assert main([*quick, "--steps", "1", "--out", str(out), "--resume"]) == 2
    assert "cannot be read (corrupt or truncated?)" in capsys.readouterr().err
    assert _sha(ckpt) == before

    weights = tmp_path / "weights.pt"  # a plain state_dict is not a training checkpoint
    torch.save({"w": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match="not a crossvit_fast training checkpoint"):
        load(weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.pt")


class _Payload:  # any pickled object: weights_only=True must refuse to construct it
    pass


def test_checkpoint_loading_is_weights_only(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "crossvit_fast.train", "version": 1, "x": _Payload()}, evil)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load(evil)


def test_resume_needs_a_checkpoint_location(quick, capsys):
    assert main([*quick, "--steps", "1", "--resume"]) == 2
    assert "--resume without a CHECKPOINT needs --out" in capsys.readouterr().err


def test_bad_options_are_clear_errors(tmp_path, quick, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--batch-size", "0"])
    assert "--batch-size: expected >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--amp", "fp8"])
    assert main([*quick, "--model", "crossvit_huge", "--out", str(tmp_path / "x")]) == 2
    assert "registered name" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    assert "not a directory" in capsys.readouterr().err
    # More processes x batch than images: no step could be taken.
    assert main(["--train-samples", "10", "--batch-size", "16", "--out", str(tmp_path / "z")]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err


def test_registered_model_name_and_json_config(tmp_path):
    from crossvit_fast.train.models import resolve_config

    name, cfg = resolve_config("crossvit_9_240", num_classes=7, drop_path=0.1)
    assert name == "crossvit_9_240" and cfg.num_classes == 7 and cfg.drop_path_rate == 0.1
    assert cfg.embed_dim == (128, 256)
    path = tmp_path / "cfg.json"
    path.write_text(
        json.dumps(
            {
                "img_size": [16, 12],
                "patch_size": [4, 6],
                "embed_dim": [32, 64],
                "depth": [[1, 1, 0]],
                "num_heads": [2, 2],
            }
        )
    )
    name, cfg = resolve_config(str(path), num_classes=10, drop_path=None)
    assert cfg.depth == ((1, 1, 0),) and cfg.num_classes == 10
    path.write_text(json.dumps({"embed_dims": [32, 64]}))
    with pytest.raises(Exception, match="embed_dims"):
        resolve_config(str(path), num_classes=10, drop_path=None)


# -- data --------------------------------------------------------------------------------------


def test_image_folder_reads_classes_and_pixels(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path)
    ds = data_mod.load_image_folder(tmp_path, (16, 12), val_fraction=0.25)
    assert ds.classes == ["blue", "red"] and ds.num_classes == 2
    assert len(ds.train) + len(ds.val) == 12 and len(ds.val) == 3
    x, y, bad = ds.train[0]
    assert x.shape == (3, 16, 12) and x.dtype == torch.uint8 and bad == []
    expect = (0, 1) if y == 1 else (2, 1)  # red: R channel brightest, blue: B channel
    assert x[expect[0]].float().mean() > x[expect[1]].float().mean()
    xb, yb, bad = next(data_mod.iterate(ds.val, [[0, 1], []]))
    assert xb.shape == (2, 3, 16, 12) and yb.shape == (2,) and bad == []
    empty = ds.val.collate([])
    assert empty[0].shape == (0, 3, 16, 12)


def test_image_folder_train_val_layout_and_training(tmp_path):
    pytest.importorskip("PIL")
    write_image_folder(tmp_path / "data" / "train")
    write_image_folder(tmp_path / "data" / "val", per_class=2)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**DEFAULT_CONFIG.to_dict(), "depth": [[1, 1, 0]]}))
    metrics = tmp_path / "m.json"
    data = ["--data", str(tmp_path / "data"), "--model", str(cfg), "--batch-size", "4"]
    outputs = ["--out", str(tmp_path / "run"), "--metrics-json", str(metrics), "--no-progress"]
    assert main([*data, "--steps", "2", "--workers", "0", *outputs]) == 0
    m = json.loads(metrics.read_text())
    assert m["steps"] == 2 and 0.0 <= m["accuracy"] <= 1.0
    assert load(tmp_path / "run" / CHECKPOINT_NAME)["run"]["val_images"] == 4


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="one sub-directory per class"):
        data_mod.load_image_folder(tmp_path, (8, 8))
    os.makedirs(tmp_path / "a")
    with pytest.raises(ValueError, match="no images"):
        data_mod.load_image_folder(tmp_path, (8, 8))


def test_digits_split_is_fixed_and_held_out():
    ds = data_mod.load_digits()
    assert (len(ds.train), len(ds.val)) == (1438, 359) and ds.num_classes == 10
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    again = data_mod.load_digits()
    assert torch.equal(ds.val.labels, again.val.labels)
    assert torch.equal(ds.val.images, again.val.images)


def test_digits_read_from_the_bundled_file_equal_sklearns_loader():
    datasets = pytest.importorskip("sklearn.datasets")
    images, labels = data_mod._digits_tensors()
    d = datasets.load_digits()
    assert torch.equal(images, torch.as_tensor(d.images, dtype=torch.float32))
    assert torch.equal(labels, torch.as_tensor(d.target).long())


def test_preprocess_resizes_expands_and_normalises():
    prep = data_mod.Preprocess((16, 16), 3, (0.5,), (0.25,), torch.device("cpu"))
    x = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = prep(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25
    assert prep(torch.zeros(0, 1, 8, 8, dtype=torch.uint8)).shape[0] == 0  # empty eval batch
    flip = data_mod.Preprocess((2, 2), 1, (0.0,), (1.0,), torch.device("cpu"), hflip=0.999)
    img = torch.tensor([[[[0, 255], [0, 255]]]], dtype=torch.uint8)
    assert flip(img, torch.Generator().manual_seed(0))[0, 0, 0, 0] == 1.0


def test_epoch_batches_define_global_batches_independent_of_world_size():
    one = data_mod.epoch_batches(100, 16, 1, 0, epoch=3, seed=5)
    two = [data_mod.epoch_batches(100, 8, 2, r, epoch=3, seed=5) for r in range(2)]
    assert len(one) == len(two[0]) == 100 // 16
    for k in range(len(one)):
        assert one[k] == two[0][k] + two[1][k]  # rank 0 then rank 1 slice of the global batch
    assert data_mod.epoch_batches(100, 16, 1, 0, epoch=4, seed=5) != one  # reshuffled per epoch
    # Evaluation: every item exactly once, the same batch count on every rank (FSDP needs it).
    ev = [data_mod.eval_batches(37, 8, 3, r) for r in range(3)]
    assert len({len(e) for e in ev}) == 1
    assert sorted(i for e in ev for b in e for i in b) == list(range(37))


# -- optimisation recipe ---------------------------------------------------------------------------


def test_no_weight_decay_on_tokens_biases_and_norms():
    from crossvit_fast import CrossViT

    model = CrossViT(DEFAULT_CONFIG, backend="reference")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert model.no_weight_decay() <= nd  # cls_token_i, pos_embed_i (3-D, still not decayed)
    assert all(n.endswith(("bias", "weight")) for n in nd - model.no_weight_decay())
    assert "blocks.0.blocks.0.0.norm1.weight" in nd and "head.0.bias" in nd
    assert "blocks.0.blocks.0.0.attn.qkv.weight" in d and "patch_embed.0.proj.weight" in d
    assert len(d) + len(nd) == len(names)


def test_warmup_then_cosine_schedule():
    total, warm, floor = 100, 10, 0.02
    lrs = [lr_multiplier(s, total, warm, floor) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warm - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(lrs[:warm]))  # linear warm-up
    assert all(a >= b for a, b in itertools.pairwise(lrs[warm:]))  # then non-increasing
    assert lrs[-1] == pytest.approx(floor)
    assert lrs[warm + (total - warm - 1) // 2] == pytest.approx((1 + floor) / 2, abs=0.02)


def test_trainer_applies_model_options(tmp_path, quick):
    t = Trainer(
        parse_args(
            [*quick, "--steps", "1", "--grad-checkpointing", "--amp", "off", "--out", str(tmp_path)]
        )
    )
    try:
        assert all(stage.grad_checkpointing for stage in t.bare.blocks)
        assert t.amp_dtype is None and not t.scaler.is_enabled()
        assert t.warmup == 1 and t.lr == pytest.approx(2e-3)
    finally:
        t.close()


def test_close_releases_the_model_and_optimizer(tmp_path, quick):
    """`close` frees what holds the process group (model wrapper, optimizer, EMA) before leaving
    it, so nothing of it is left for interpreter shutdown to tear down."""
    import weakref

    t = Trainer(parse_args([*quick, "--steps", "1", "--ema", "0.9", "--out", str(tmp_path)]))
    t.run()
    refs = [weakref.ref(x) for x in (t.model, t.bare, t.opt, t.ema)]
    t.close()
    assert [r() for r in refs] == [None] * len(refs)
