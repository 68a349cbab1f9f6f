"""`train` as real runs meet it: signals (in a subprocess, as a scheduler or a terminal sends them),
bad and empty data, --init, extending a run, the logs, the CrossViT/DeiT recipe options, and the
eval / predict / export round trip of a checkpoint."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import crossvit_fast
from crossvit_fast import CrossViT, CrossViTConfig
from crossvit_fast.__main__ import main as cli
from crossvit_fast.train import data as data_mod
from crossvit_fast.train import logs as logs_mod
from crossvit_fast.train import main, parse_args
from crossvit_fast.train.state import CHECKPOINT_NAME, load
from crossvit_fast.train.trainer import Trainer

from .conftest import TRAIN_TINY, popen_in_session, write_image_folder

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("PIL")
pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(crossvit_fast.__file__).resolve().parents[1]


def _wait_for(cond, proc, timeout=120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _epochs_done(out: Path) -> int:
    path = out / logs_mod.METRICS_NAME
    if not path.exists():
        return 0
    return sum(r["event"] == "epoch" for r in logs_mod.read_metrics(str(path)))


def _signal_run(cmd: list[str], out: Path, sig: int, after_epochs: int) -> tuple[int, str, str]:
    """Start `cmd` in its own session, wait for `after_epochs` epoch records, then send `sig`
    to the whole process group (as a scheduler or a terminal's Ctrl-C does: the DataLoader
    workers get it too)."""
    proc = popen_in_session(cmd)
    try:
        _wait_for(lambda: _epochs_done(out) >= after_epochs, proc)
        os.killpg(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stdout, stderr


def _folder_args(model: str, data: Path, batch_size: str, *extra: str) -> list[str]:
    """`train` options of a CPU run without a progress bar on the ImageFolder at `data`, `extra`
    between the batch size and the device."""
    head = ["--model", model, "--data", str(data), "--batch-size", batch_size]
    return [*head, *extra, "--device", "cpu", "--no-progress"]


def test_sigterm_then_sigint_checkpoint_print_the_resume_command_and_exit_cleanly(
    tmp_path, tiny_json
):
    """SIGTERM (a scheduler's) mid-run: exit 143, checkpoint at the step it stopped after, the
    resume command on stdout, no traceback. The printed command, run as printed, resumes from
    that step; SIGINT (Ctrl-C) then stops it the same way with exit 130. ImageFolder data with a
    decoding worker, so the signal reaches a DataLoader worker too."""
    write_image_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    args = _folder_args(tiny_json, tmp_path / "data", "4", "--steps", "100000", "--workers", "1")
    cmd = [sys.executable, "-m", "crossvit_fast", "train", *args, "--out", str(out)]
    rc, stdout, stderr = _signal_run(cmd, out, signal.SIGTERM, after_epochs=1)
    assert rc == 143, stdout + stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    assert re.search(r"SIGTERM: stopped at step \d+/100000", stdout), stdout
    first = load(out / CHECKPOINT_NAME)["step"]
    assert first >= 3  # 14 train images / batch 4 = 3 steps per epoch, one epoch done
    resume = stdout.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert resume.endswith(f"--out {out} --resume") and "--steps 100000" in resume
    assert not list(out.glob(".checkpoint.pt.*.tmp"))

    argv = resume.split()
    assert argv[:4] == ["python", "-m", "crossvit_fast", "train"] or argv[1:4] == [
        "-m",
        "crossvit_fast",
        "train",
    ]
    rc, stdout, stderr = _signal_run(
        [sys.executable, *argv[1:]], out, signal.SIGINT, after_epochs=_epochs_done(out) + 1
    )
    assert rc == 130, stdout + stderr
    assert f"resumed from {out / CHECKPOINT_NAME} at step {first}/100000" in stdout
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "SIGINT: stopped at step" in stdout
    assert load(out / CHECKPOINT_NAME)["step"] > first
    events = [r["event"] for r in logs_mod.read_metrics(str(out / logs_mod.METRICS_NAME))]
    assert events.count("stopped") == 2 and events[-1] == "stopped"


def test_stale_temporary_files_are_removed_and_resume_without_a_checkpoint_starts(
    tmp_path, quick, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.k1ll3d.tmp"  # what SIGKILL during a save leaves
    stale.write_bytes(b"half a checkpoint")
    assert main([*quick, "--steps", "2", "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale}" in text
    assert "no checkpoint at" in text and load(out / CHECKPOINT_NAME)["step"] == 2


def test_a_finished_run_can_be_extended_and_not_cut_below_its_steps(tmp_path, quick, capsys):
    out = str(tmp_path / "run")
    assert main([*quick, "--steps", "4", "--out", out]) == 0
    assert main([*quick, "--steps", "7", "--out", out, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "changed total_steps: checkpoint 4, this run 7" in text
    assert load(os.path.join(out, CHECKPOINT_NAME))["step"] == 7
    assert main([*quick, "--steps", "5", "--out", out, "--resume"]) == 2
    assert "past this run's 5 steps" in capsys.readouterr().err
    # --epochs extends as well: 6 steps per epoch, 2 epochs = 12 steps.
    assert main([*quick, "--epochs", "2", "--out", out, "--resume"]) == 0
    assert load(os.path.join(out, CHECKPOINT_NAME))["step"] == 12


def test_checkpoints_at_epoch_ends_and_every_save_every(tmp_path, quick, monkeypatch):
    saved = []
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(self.step))
    t = Trainer(parse_args([*quick, "--steps", "14", "--save-every", "4", "--out", str(tmp_path)]))
    t.run()
    t.close()
    assert saved == [4, 6, 8, 12, 14]  # every 4 steps, epoch ends (6 steps each), the end
    assert parse_args([]).save_every == ("seconds", 600.0)  # default: 10 minutes
    assert parse_args(["--save-every", "90s"]).save_every == ("seconds", 90.0)
    with pytest.raises(SystemExit):
        parse_args(["--save-every", "0"])


# -- data ------------------------------------------------------------------------------------------


def _bad_folder(root: Path) -> tuple[Path, Path]:
    write_image_folder(root / "train", per_class=6)
    write_image_folder(root / "val", per_class=2)
    garbage = root / "train" / "blue" / "garbage.png"
    garbage.write_bytes(b"this is not a PNG")
    good = (root / "train" / "red" / "0.png").read_bytes()
    truncated = root / "train" / "red" / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    return garbage, truncated


def test_bad_image_is_one_line_naming_the_file_and_exit_2(tmp_path, tiny_json, capsys):
    garbage, truncated = _bad_folder(tmp_path)
    args = [*_folder_args(tiny_json, tmp_path, "4"), "--out", str(tmp_path / "run")]
    for workers in ("0", "1"):  # decoded here and in a DataLoader worker process
        assert main([*args, "--workers", workers, "--steps", "6"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert re.fullmatch(rf"train: error: bad image ({garbage}|{truncated}): .+", err[0]), err
        assert "--skip-bad-images" in err[0]


def test_skip_bad_images_names_each_file_once_and_trains_on(tmp_path, tiny_json, capsys):
    garbage, truncated = _bad_folder(tmp_path)
    args = [*_folder_args(tiny_json, tmp_path, "4"), "--out", str(tmp_path / "run")]
    assert main([*args, "--workers", "1", "--skip-bad-images", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    for f in (garbage, truncated):
        assert out.count(f"skipped bad image {f}") == 1, out
    assert "image file is truncated" in out and "cannot identify image file" in out
    assert load(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 3 * (14 // 4)


def test_empty_class_folder_is_an_error(tmp_path):
    write_image_folder(tmp_path, per_class=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) without images.*empty"):
        data_mod.load_image_folder(tmp_path, (8, 8))


def test_default_workers_follow_the_cpus_available(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data_mod.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data_mod.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert data_mod.default_workers() == 4


def test_transforms_crop_and_resize_as_timm():
    from crossvit_fast.train import transforms

    assert transforms.eval_resize_size((240, 240), 0.875) == 274  # timm: floor(240 / 0.875)
    x = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    ev = transforms.eval_transform((240, 240), 0.875, use_torchvision=False)(x)
    assert ev.shape == (3, 240, 240) and ev.dtype == torch.uint8
    # Resize the shorter side to 274 (300x400 -> 274x365), then the centre 240x240.
    ref = transforms.resize(x, (274, 365))[:, 17:257, 62:302]
    assert torch.equal(ev, ref)
    tr = transforms.train_transform((32, 24), use_torchvision=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = tr(x)
        torch.manual_seed(0)
        b = tr(x)
    assert a.shape == (3, 32, 24) and torch.equal(a, b)  # the seed fixes the crop and flip


def test_torchvision_transforms_match_the_plain_tensor_path():
    """Where torchvision imports, its v2 transforms serve; they must agree with ours."""
    from crossvit_fast.train import transforms

    if transforms.torchvision_v2() is None:
        pytest.skip("torchvision does not import here (the plain-tensor path is what runs)")
    x = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    a = transforms.eval_transform((240, 240), 0.875, use_torchvision=False)(x)
    b = transforms.eval_transform((240, 240), 0.875)(x)
    assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 1  # rounding


def test_mixup_and_cutmix_targets():
    import random

    from crossvit_fast.train.augment import Mix

    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 4])  # image 0 is mixed with image 5: another class
    for mix in (Mix(mixup=0.8, label_smoothing=0.1), Mix(cutmix=1.0)):
        xm, t = mix(x, y, 5, random.Random(0))
        assert xm.shape == x.shape and t.shape == (6, 5)
        torch.testing.assert_close(t.sum(-1), torch.ones(6))
    xm, t = Mix(cutmix=1.0)(x, y, 5, random.Random(3))
    changed = (xm != x).any(1)  # cutmix pastes a box of the reversed batch
    lam = 1 - changed[0].float().mean()
    assert 0 < lam < 1 and t[0, y[0]] == pytest.approx(lam.item(), abs=1e-6)


# -- recipe, logs ---------------------------------------------------------------------------------


def test_recipe_options_and_metrics_jsonl(tmp_path, quick, capsys, monkeypatch):
    """--mixup --cutmix --ema: the EMA weights are evaluated too and checkpointed; metrics.jsonl
    has one line per epoch and one at the end; --no-progress still prints one line per epoch;
    TensorBoard gets scalars when it imports (a stand-in writer here)."""
    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(logs_mod, "_summary_writer", lambda out: Writer())
    out = tmp_path / "run"
    recipe = ["--mixup", "0.8", "--cutmix", "1.0", "--ema", "0.9"]
    assert main([*quick, "--steps", "12", *recipe, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert len(re.findall(r"^epoch \d/2 step \d+/12: .*top-5 .*ema top-1", text, re.M)) == 2
    recs = logs_mod.read_metrics(str(out / logs_mod.METRICS_NAME))
    assert [r["event"] for r in recs] == ["epoch", "epoch", "end"]
    for r in recs:
        assert set(r) >= {
            "step",
            "epoch",
            "train_loss",
            "val_loss",
            "top1",
            "top5",
            "img_per_s",
            "lr",
            "ema_top1",
            "ema_top5",
        }
    assert recs[-1]["step"] == 12 and 0 <= recs[-1]["top5"] <= 1
    st = load(out / CHECKPOINT_NAME)
    assert set(st["ema"]) == set(st["model"])
    assert not all(torch.equal(st["ema"][k], st["model"][k]) for k in st["model"])
    assert ("train/loss", 10) in scalars and ("epoch/top1", 6) in scalars


def test_lr_below_min_lr_is_a_warning(tmp_path, tiny_json, capsys):
    write_image_folder(tmp_path / "data", per_class=4)
    args = _folder_args(tiny_json, tmp_path / "data", "2", "--steps", "1", "--workers", "0")
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "warning: the peak LR 1.95e-06 is at or below --min-lr 1e-05" in out


# -- --init -----------------------------------------------------------------------------------------


def test_init_from_a_checkpoint_or_weights_file_resets_a_head_of_another_size(
    tmp_path, quick, tiny_json, capsys, monkeypatch
):
    """A digits checkpoint (10 classes) initialises a 2-class ImageFolder run: everything but the
    heads is loaded, the heads are new; a timm-style .pth and an export's .safetensors too."""
    pytest.importorskip("safetensors")
    src = tmp_path / "digits"
    assert main([*quick, "--steps", "2", "--out", str(src)]) == 0
    weights = load(src / CHECKPOINT_NAME)["model"]
    torch.save(weights, tmp_path / "timm_style.pth")
    assert cli(["export", str(src / CHECKPOINT_NAME), str(tmp_path / "export")]) == 0
    write_image_folder(tmp_path / "data", per_class=4)
    base = _folder_args(tiny_json, tmp_path / "data", "4", "--steps", "1", "--workers", "0")
    capsys.readouterr()
    for i, init in enumerate(
        [str(src / CHECKPOINT_NAME), str(tmp_path / "timm_style.pth"), str(tmp_path / "export")]
    ):
        t = Trainer(parse_args([*base, "--init", init, "--out", str(tmp_path / f"ft{i}")]))
        try:
            sd = t.bare.state_dict()
            for k, v in weights.items():
                if not k.startswith("head."):
                    assert torch.equal(sd[k], v), (init, k)
            assert sd["head.0.weight"].shape == (2, 48)
            assert any("heads reset: 10 -> 2 classes" in n for n in t.notes), t.notes
            assert t.lr == pytest.approx(0.1 * 5e-4 * 4 / 512)  # the fine-tuning default
        finally:
            t.close()
    # A same-sized head is loaded too.
    same = [*quick, "--steps", "1", "--init", str(tmp_path / "timm_style.pth")]
    t = Trainer(parse_args([*same, "--out", str(tmp_path / "same")]))
    try:
        assert torch.equal(t.bare.state_dict()["head.0.weight"], weights["head.0.weight"])
    finally:
        t.close()
    # Weights of another architecture: a clear error.
    other = CrossViT(CrossViTConfig(**{**TRAIN_TINY, "embed_dim": [24, 48]}), backend="reference")
    torch.save(other.state_dict(), tmp_path / "other.pth")
    assert main([*quick, "--init", str(tmp_path / "other.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "do not fit model" in capsys.readouterr().err


def test_init_pretrained_calls_create_model_and_explains_when_unsupported(
    tmp_path, quick, capsys, monkeypatch
):
    """No download here: create_model is replaced (unsupported, then a stand-in hub model)."""
    name = "crossvit_tiny_240"

    def unsupported(*a, **k):
        raise ValueError("unknown CrossViTConfig field(s) ['pretrained']")

    monkeypatch.setattr(crossvit_fast, "create_model", unsupported)
    args = [*quick, "--model", name, "--init", "pretrained", "--out", str(tmp_path / "a")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--init pretrained: this crossvit_fast cannot load hub weights" in err
    assert len(err.strip().splitlines()) == 1

    calls = []

    def hub(model, pretrained=False, num_classes=1000, **kw):
        calls.append((model, pretrained, num_classes))
        return crossvit_fast.registry.create_model(model, num_classes=num_classes, **kw)

    monkeypatch.setattr(crossvit_fast, "create_model", hub)
    from crossvit_fast.train.models import load_init

    net = crossvit_fast.registry.create_model(name, num_classes=10, backend="reference")
    note = load_init(net, "pretrained", name, net.config)
    assert calls == [(name, True, 10)] and note == f"init from the pretrained weights of {name}"


# -- eval / predict / export ------------------------------------------------------------------------


def test_eval_predict_export_round_trip(tmp_path, quick, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "run"
    assert main([*quick, "--steps", "6", "--ema", "0.9", "--out", str(out)]) == 0
    ckpt = out / CHECKPOINT_NAME
    st = load(ckpt)
    assert st["classes"] == [str(i) for i in range(10)]
    assert st["options"]["steps"] == 6 and st["preprocess"]["kind"] == "digits"
    capsys.readouterr()

    # eval: the checkpoint's own validation split, the same numbers the run logged.
    m = tmp_path / "eval.json"
    assert cli(["eval", str(ckpt), "--weights", "model", "--metrics-json", str(m)]) == 0
    got = json.loads(m.read_text())
    assert got["images"] == 16
    for k in ("top1", "top5", "loss"):
        assert got[k] == pytest.approx(st["metrics"][k], rel=1e-6), k  # other batch sizes
    assert cli(["eval", str(ckpt), "--metrics-json", str(m)]) == 0  # default: the EMA weights
    assert json.loads(m.read_text())["top1"] == pytest.approx(st["metrics"]["ema_top1"])
    assert "top-1" in capsys.readouterr().out

    # predict: digits images saved as 8x8 PNGs, class names in the output and the CSV.
    from PIL import Image

    ds = data_mod.load_digits()
    paths = []
    for i in range(3):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(ds.val.images[i, 0].numpy(), mode="L").save(p)
        paths.append(str(p))
    csv_path = tmp_path / "pred.csv"
    assert cli(["predict", str(ckpt), *paths, "--topk", "3", "--out", str(csv_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{paths[0]}: ")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 9 and rows[0]["class"] in st["classes"] and rows[0]["rank"] == "1"
    assert sum(float(r["probability"]) for r in rows[:3]) <= 1.0 + 1e-6
    # The same class as the model gives the in-memory validation image.
    model = CrossViT(CrossViTConfig(**st["config"]), backend="reference").eval()
    model.load_state_dict(st["ema"])
    pre = st["preprocess"]
    prep = data_mod.Preprocess(
        tuple(pre["input_size"]), 3, pre["mean"], pre["std"], torch.device("cpu")
    )
    with torch.no_grad():
        want = model(prep(ds.val.images[:3])).argmax(-1).tolist()
    assert [int(r["class"]) for r in rows if r["rank"] == "1"] == want

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    assert cli(["predict", str(ckpt), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]

    # export: what create_model / load_checkpoint read back gives the same logits.
    exp = tmp_path / "export"
    assert cli(["export", str(ckpt), str(exp), "--weights", "model"]) == 0
    assert {p.name for p in exp.iterdir()} == {"model.safetensors", "config.json", "classes.json"}
    assert json.loads((exp / "classes.json").read_text()) == st["classes"]
    back = CrossViT(
        CrossViTConfig(**json.loads((exp / "config.json").read_text())), backend="reference"
    )
    crossvit_fast.load_checkpoint(back, exp / "model.safetensors")
    for k, v in st["model"].items():
        assert torch.equal(back.state_dict()[k], v), k


# -- small fixes ------------------------------------------------------------------------------------


def test_help_lists_every_option_once_with_its_default(capsys):
    from crossvit_fast.train.cli import build_parser
    from crossvit_fast.train.infer import build_parser as infer_parser

    for p in (build_parser(), *(infer_parser(c) for c in ("eval", "predict", "export"))):
        for a in p._actions:
            assert a.help, (p.prog, a.dest)
        text = p.format_help()
        assert "default: None" not in text and "(default: 64) (default" not in text
        assert not re.search(r"default: [^)]*\) \(default:", text), text
    text = build_parser().format_help()
    assert re.search(r"processes on this\s+node\) = \d+ here", text)
    assert re.search(r"35 s on an\s+idle 2-core CPU", text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_check_on_cuda_without_a_gpu_is_one_line(capsys):
    assert cli(["check", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["check: error: --device cuda: no CUDA GPU is visible to torch"]


def test_json_config_accepts_timm_arguments(tmp_path):
    from crossvit_fast.train.models import resolve_config

    path = tmp_path / "timm.json"
    path.write_text(
        json.dumps(
            {
                "img_size": 32,
                "img_scale": [1.0, 0.75],
                "patch_size": [8, 6],
                "embed_dim": [32, 64],
                "depth": [[1, 1, 0]],
                "num_heads": [2, 2],
                "mlp_ratio": [2, 2, 1],
            }
        )
    )
    _, cfg = resolve_config(str(path), num_classes=3, drop_path=None)
    assert cfg.img_size == ((32, 32), (24, 24)) and cfg.mlp_ratio == (2.0, 2.0)
    assert cfg.num_classes == 3


def test_readme_training_commands_parse():
    """Every `python -m crossvit_fast train ...` line of the README is a valid command line."""
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    cmds = re.findall(r"-m crossvit_fast train([^\n`]*)", text)
    assert len(cmds) >= 6
    for c in cmds:
        if "--help" not in c:
            parse_args(shlex.split(c.split("&&")[0]))
