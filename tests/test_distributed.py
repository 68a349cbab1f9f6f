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

REPO = Path(crossvit_fast.__file__).resolve().parents[1]
WORLD = 2
CFG = CrossViTConfig(
    img_size=(32, 16),
    patch_size=(8, 8),
    embed_dim=(32, 64),
    depth=((1, 1, 0), (1, 1, 0)),
    num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0),
    num_classes=5,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo"
)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)


def _model() -> CrossViT:
    torch.manual_seed(0)  # identical init on every rank and in the single-process run
    return CrossViT(CFG, backend="reference").train()


def _full(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _worker(rank: int, port: int, out: str) -> None:
    """One rank: its half of the global batch through DDP and through FSDP2 (as `train` wraps
    them); rank 0 saves the full gradients."""
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
            torch.save(result, out)
    finally:
        dist_mod.teardown(info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp_gradients_equal_single_process(tmp_path):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)

    model = _model()
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()  # mean over the whole global batch
    want = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("ddp", "fsdp"):
        assert set(got[mode]) == set(want)
        for n, g in want.items():
            # Averaging two half-batch means vs one full-batch mean: fp32 rounding only.
            torch.testing.assert_close(got[mode][n], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {n}")


def _torchrun(tmp_path: Path, *extra: str) -> dict:
    metrics = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "crossvit_fast", "train", *extra,
           "--out", str(tmp_path / "run"), "--metrics-json", str(metrics),
           "--no-progress"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(metrics.read_text())


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
    m = _torchrun(
        tmp_path,
        "--fsdp",
        "--steps",
        "2",
        "--train-samples",
        "64",
        "--val-samples",
        "32",
        "--batch-size",
        "16",
    )
    assert m["steps"] == 2 and m["world_size"] == WORLD
    from crossvit_fast.train.state import load

    st = load(tmp_path / "run" / "checkpoint.pt")
    assert st["run"]["fsdp"] is True
    # The full (gathered) weights, not shards: they load strictly into a plain model.
    model = CrossViT(CrossViTConfig(**st["config"]), backend="reference")
    model.load_state_dict(st["model"], strict=True)
