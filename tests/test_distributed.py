"""Distributed training on CPU (gloo): DDP and FSDP2 gradients equal a single process's on the
same global batch, and `torchrun --nproc_per_node=2 -m crossvit_fast train` runs to the end.

Everything talks over the loopback interface only (torchrun --standalone / 127.0.0.1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import crossvit_fast
from crossvit_fast import CrossViT, CrossViTConfig

from .conftest import child_env, popen_in_session, tiny_config

REPO = Path(crossvit_fast.__file__).resolve().parents[1]
WORLD = 2
CFG = tiny_config(depth=((1, 1, 0), (1, 1, 0)))

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
    ),
    pytest.mark.usefixtures("one_thread"),
]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)


def _model() -> CrossViT:
    torch.manual_seed(0)  # identical init on every rank and in the single-process run
    return CrossViT(CFG, backend="reference").train()


def _full(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _common(model_json: str, mode: str) -> list[str]:
    sizes = ["--train-samples", "32", "--val-samples", "8", "--batch-size", "4", "--steps", "6"]
    options = ["--save-every", "2", "--drop-path", "0.2", "--ema", "0.9", "--device", "cpu"]
    fsdp = ["--fsdp"] if mode == "fsdp" else []
    return ["--model", model_json, *sizes, *options, "--no-progress", *fsdp]


def _resume_runs(tmp: str, mode: str, model_json: str) -> None:
    """On every rank: an uninterrupted 6-step run, and one stopped after step 2 then resumed;
    and one started in the other mode (DDP <-> FSDP), stopped after step 2 and resumed in this."""
    from crossvit_fast.train.cli import parse_args
    from crossvit_fast.train.trainer import Trainer

    other = "ddp" if mode == "fsdp" else "fsdp"
    runs = [
        (mode, "a", None, []),
        (mode, "b", 2, []),
        (mode, "b", None, ["--resume"]),
        (other, "switch", 2, []),
        (mode, "switch", None, ["--resume"]),
    ]
    for m, out, until, resume in runs:
        name = f"{mode}-{out}"
        t = Trainer(
            parse_args([*_common(model_json, m), "--out", os.path.join(tmp, name), *resume])
        )
        assert t.dist.world_size == WORLD and not t.dist.owns_group
        if out == "switch" and resume:
            assert (
                f"resume: changed fsdp: checkpoint {m == 'ddp'}, this run {m == 'fsdp'}" in t.notes
            )
        t.run(until_step=until)
        t.close()


def _worker(rank: int, port: int, tmp: str, model_json: str) -> None:
    """One rank: (1) its half of the global batch through DDP and through FSDP2 (wrapped as
    `train` wraps them), rank 0 saving the full gradients; (2) exact-resume runs of the trainer
    under DDP and FSDP2."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    from crossvit_fast.train import dist as dist_mod

    info = dist_mod.setup("cpu")
    try:
        x, y = _batch()
        per = x.shape[0] // WORLD
        xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        result = {}
        for mode in ("ddp", "fsdp"):
            model = _model()
            wrapped = dist_mod.wrap_model(model, info, fsdp=mode == "fsdp")
            assert (type(wrapped).__name__ == "DistributedDataParallel") == (mode == "ddp")
            F.cross_entropy(wrapped(xs), ys).backward()  # mean over the local half
            result[mode] = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(result, os.path.join(tmp, "grads.pt"))
        for mode in ("ddp", "fsdp"):
            _resume_runs(tmp, mode, model_json)
    finally:
        dist_mod.teardown(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the 2-process work once (process start-up dominates); tests read its results."""
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("dist")
    model_json = tmp / "tiny.json"
    small = {"img_size": [[16, 16], [12, 12]], "patch_size": [4, 6], "num_classes": 10}
    model_json.write_text(json.dumps({**CFG.to_dict(), **small}))
    mp.spawn(_worker, args=(_free_port(), str(tmp), str(model_json)), nprocs=WORLD, join=True)
    return tmp


def test_ddp_and_fsdp_gradients_equal_single_process(two_ranks):
    got = torch.load(two_ranks / "grads.pt", weights_only=True)
    model = _model()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()  # mean over the whole global batch
    want = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("ddp", "fsdp"):
        assert set(got[mode]) == set(want)
        for n, g in want.items():
            # Averaging two half-batch means vs one full-batch mean: fp32 rounding only.
            torch.testing.assert_close(got[mode][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_equals_uninterrupted_training_distributed(two_ranks, mode):
    """Stopped after step 2 of 6 (4 steps / epoch, drop-path and EMA on, per-rank RNG streams)
    and resumed: the same weights, EMA and optimizer state as the uninterrupted run, bit for bit.
    Started in the other mode (DDP <-> FSDP) and resumed in this one: the same too (averaging two
    ranks' gradients is exact in both, a power-of-two scaling)."""
    from crossvit_fast.train.state import load

    a = load(two_ranks / f"{mode}-a" / "checkpoint.pt")
    for other in ("b", "switch"):
        b = load(two_ranks / f"{mode}-{other}" / "checkpoint.pt")
        assert a["step"] == b["step"] == 6 and len(a["rng"]) == WORLD
        for key in ("model", "ema"):
            for k, v in a[key].items():
                torch.testing.assert_close(b[key][k], v, rtol=0, atol=0, msg=f"{other} {key} {k}")
        for name, st in a["optimizer"]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b["optimizer"]["state"][name][k]), (mode, other, name, k)
        assert a["metrics"] == b["metrics"]


def _torchrun_cmd(tmp_path: Path, *extra: str) -> list[str]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    train = [f"--nproc_per_node={WORLD}", "-m", "crossvit_fast", "train", *extra]
    return [*torchrun, *train, "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]


def _torchrun(tmp_path: Path, *extra: str) -> dict:
    metrics = tmp_path / "metrics.json"
    proc = subprocess.run(
        _torchrun_cmd(tmp_path, *extra, "--metrics-json", str(metrics)),
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(metrics.read_text())


def _no_traceback_of_ours(stderr: str) -> None:
    """torchrun reports a failed worker with its own traceback (ChildFailedError, or the
    SignalException of a SIGTERM it received); no frame of ours may appear."""
    import re

    assert not re.search(r'File ".*crossvit_fast', stderr), stderr


@pytest.mark.slow
def test_torchrun_bad_image_is_one_message(tmp_path, tiny_json):
    """An undecodable image met by one rank: every rank stops (no hang in a collective), and
    the one line naming the file is printed once, not once per rank; exit status 2."""
    pytest.importorskip("PIL")
    from .conftest import write_image_folder

    write_image_folder(tmp_path / "data", per_class=8)
    bad = tmp_path / "data" / "blue" / "3.png"
    bad.write_bytes(b"not a png")
    data = ["--data", str(tmp_path / "data"), "--batch-size", "2", "--workers", "1"]
    cmd = _torchrun_cmd(tmp_path, "--model", tiny_json, *data, "--steps", "20")
    proc = subprocess.run(
        cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "train: error:" in ln]
    assert len(lines) == 1 and f"bad image {bad}" in lines[0], proc.stderr
    assert "exitcode  : 2" in proc.stderr, proc.stderr  # torchrun may SIGTERM the other rank
    _no_traceback_of_ours(proc.stderr)


@pytest.mark.slow
def test_torchrun_sigterm_stops_every_rank_at_the_same_step(tmp_path, tiny_json):
    """SIGTERM to torchrun (a scheduler's preemption): it forwards the signal to every worker;
    they agree on the step, write one checkpoint, and print the torchrun command that resumes."""
    import signal
    import time

    sizes = ["--train-samples", "64", "--val-samples", "8", "--batch-size", "4"]
    proc = popen_in_session(
        _torchrun_cmd(tmp_path, "--model", tiny_json, *sizes, "--steps", "100000")
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        t0 = time.monotonic()
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 240
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert stdout.count("SIGTERM: stopped at step") == 1, stdout + stderr
    from crossvit_fast.train.state import load

    st = load(tmp_path / "run" / "checkpoint.pt")
    assert st["step"] >= 8 and f"stopped at step {st['step']}/100000" in stdout
    assert "torchrun --nproc_per_node=2 -m crossvit_fast train" in stdout
    assert stderr.count("exitcode  : 143") == WORLD or "SignalException" in stderr, stderr
    _no_traceback_of_ours(stderr)


@pytest.mark.slow
def test_torchrun_two_processes_train_steps(tmp_path):
    """The README's multi-process command on CPU: `torchrun --nproc_per_node=2 -m crossvit_fast
    train --steps 4` (default model and data), DDP over gloo, exits cleanly."""
    m = _torchrun(tmp_path, "--steps", "4")
    assert m["steps"] == 4 and m["world_size"] == WORLD
    assert 0.0 <= m["accuracy"] <= 1.0 and m["img_per_s"] > 0
    from crossvit_fast.train.state import load

    st = load(tmp_path / "run" / "checkpoint.pt")
    assert st["run"]["world_size"] == WORLD and len(st["rng"]) == WORLD


@pytest.mark.slow
def test_torchrun_fsdp(tmp_path):
    sizes = ["--train-samples", "64", "--val-samples", "32", "--batch-size", "16"]
    m = _torchrun(tmp_path, "--fsdp", "--steps", "2", *sizes)
    assert m["steps"] == 2 and m["world_size"] == WORLD
    from crossvit_fast.train.state import load

    st = load(tmp_path / "run" / "checkpoint.pt")
    assert st["run"]["fsdp"] is True
    # The full (gathered) weights, not shards: they load strictly into a plain model.
    model = CrossViT(CrossViTConfig(**st["config"]), backend="reference")
    model.load_state_dict(st["model"], strict=True)
