"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is one `torch.save` file (a dict of tensors and plain Python values, so it loads with
`torch.load(weights_only=True)`: no pickled code runs):

    format, version          "crossvit_fast.train", 1
    config                   the CrossViTConfig fields (dict)
    run                      the options that determine the trajectory (batch size, world size,
                             total steps, seed, data, lr schedule, AMP, ...); `MUST_MATCH` says
                             which of them a resume must keep
    options, classes         every parsed option (the resolved command line) and the class names
    preprocess               how an image becomes the model's input (size, mean / std, crop)
    step                     optimizer steps done
    model, optimizer         full (unsharded) state dicts keyed by parameter name, as
                             `torch.distributed.checkpoint.state_dict` gives them, so the same file
                             serves plain, DDP, FSDP2 and compiled models
    scheduler, scaler        LR schedule and GradScaler state
    rng                      per rank: the CPU generator state and the CUDA one (or None)
    metrics                  the last evaluation
    ema                      the EMA weights (full state dict) with --ema, else None

Writes go to a temporary file in the same directory, are flushed to disk, then renamed over the
old checkpoint (`os.replace` is atomic on POSIX), so a crash mid-write leaves the previous
checkpoint intact; the temporary file a SIGKILL during a save leaves behind is removed by the
next run in that directory (`remove_stale_temporaries`). A checkpoint that cannot be read or does not match the run raises
`CheckpointError` before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from typing import Any

import torch

from .dist import broadcast_object
from .errors import TrainError

FORMAT, VERSION = "crossvit_fast.train", 1
CHECKPOINT_NAME = "checkpoint.pt"

__all__ = [
    "CHECKPOINT_NAME",
    "MUST_MATCH",
    "CheckpointError",
    "check_compatible",
    "load",
    "remove_stale_temporaries",
    "rng_state",
    "run_paths",
    "save",
]


class CheckpointError(ValueError):
    """A training checkpoint that is corrupt, of another format, or of a different run."""


def _plain(v: Any) -> Any:
    """Tuples -> lists, recursively, so configs compare the same after a save/load round trip."""
    return json.loads(json.dumps(v))


def save(state: dict, path: str | os.PathLike) -> None:
    """Write `state` (plus format tags) to `path` atomically: temp file, fsync, rename."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed `save(state, path)` left beside `path`; return them."""
    path = os.fspath(path)
    d, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isdir(d):
        return []
    stale = [
        os.path.join(d, f)
        for f in os.listdir(d)
        if f.startswith(f".{base}.") and f.endswith(".tmp")
    ]
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(f)
    return stale


_REQUIRED = ("config", "run", "step", "model", "optimizer", "scheduler", "scaler", "rng")


def load(path: str | os.PathLike) -> dict:
    """Read a training checkpoint (`weights_only=True`) and check its structure.

    Raises CheckpointError naming the file and what is wrong (missing, unreadable or truncated,
    not a training checkpoint, another format version, missing entries)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read (corrupt or truncated?): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a crossvit_fast training checkpoint (no format tag {FORMAT!r}); "
            "model weights files load with crossvit_fast.load_checkpoint instead"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('version')!r}, this crossvit_fast "
            f"reads version {VERSION}"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    return state


# What a resume must share with the checkpoint's run, stated once (README and --resume help quote
# it): the architecture (every CrossViTConfig field) and these run options. They fix what the
# saved state means: the weights' shapes, which images are the training and validation splits,
# and each global batch (data order is a function of seed, epoch, batch size and process count).
# Everything else may change on resume, each change listed when the run starts: --steps /
# --epochs (longer or shorter, not below the steps done: the LR schedule is recomputed for the
# new length), DDP <-> FSDP (checkpoints hold the full, unsharded state), the LR schedule,
# regularisation, augmentation, AMP, EMA. Only an unchanged resume continues bit-for-bit.
MUST_MATCH = ("data", "classes", "train_images", "val_images", "batch_size", "world_size", "seed")


def check_compatible(state: dict, config: dict, run: dict, path: str) -> list[str]:
    """Raise CheckpointError listing every difference in the model config and MUST_MATCH options
    between the checkpoint's run and this one; return the other differences, one line each."""
    diffs, notes = [], []
    old_cfg, new_cfg = _plain(state["config"]), _plain(config)
    for k in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(k) != new_cfg.get(k):
            diffs.append(f"model {k}: checkpoint {old_cfg.get(k)!r}, this run {new_cfg.get(k)!r}")
    old_run, new_run = _plain(state["run"]), _plain(run)
    for k in sorted(set(old_run) | set(new_run)):
        if old_run.get(k) != new_run.get(k):
            line = f"{k}: checkpoint {old_run.get(k)!r}, this run {new_run.get(k)!r}"
            (diffs if k in MUST_MATCH else notes).append(line)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is from a different run and cannot be resumed:\n  "
            + "\n  ".join(diffs)
            + "\n(a resume must keep the model and "
            + ", ".join(MUST_MATCH)
            + "; use the original options, or start a new run with another --out)"
        )
    total = run.get("total_steps", state["step"])
    if not 0 <= state["step"] <= total:
        raise CheckpointError(
            f"{path}: the checkpoint is at step {state['step']}, past this run's {total} steps "
            "(--steps / --epochs can extend a run, not cut it below the steps done)"
        )
    return notes


def rng_state(device: torch.device) -> dict:
    """This process's generator states (CPU, and the CUDA device's when training on one)."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def run_paths(a, dist, notes: list) -> tuple[str, str, str | None]:
    """(run directory, checkpoint path, checkpoint to resume or None) of a `train` run from its
    options (`--out`, `--resume [CHECKPOINT]`). Refuses to overwrite another run's checkpoint;
    removes the temporaries a killed save left (main rank). `notes` receives what to tell."""

    resume = None
    if a.resume is not None:
        if a.resume:
            resume = a.resume
            if not os.path.isfile(resume):
                raise CheckpointError(f"checkpoint {resume} does not exist")
        elif a.out:
            resume = os.path.join(a.out, CHECKPOINT_NAME)
            if not os.path.isfile(resume):  # preempted before its first checkpoint
                notes.append(f"no checkpoint at {resume} yet: starting the run")
                resume = None
        else:
            raise TrainError("--resume without a CHECKPOINT needs --out DIR (its run directory)")
    out = a.out or (os.path.dirname(os.path.abspath(resume)) if resume else None)
    if out is None:
        stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S"), dist)
        out = os.path.join("runs", f"train-{stamp}")
    ckpt = os.path.join(out, CHECKPOINT_NAME)
    if os.path.exists(ckpt) and not (resume and os.path.samefile(resume, ckpt)):
        raise TrainError(
            f"{ckpt} exists: pass --resume to continue that run, or choose another --out "
            "(a checkpoint is never overwritten by another run)"
        )
    if dist.is_main:
        for f in remove_stale_temporaries(ckpt):
            print(f"train: removed {f} (left by a save that was killed)", flush=True)
    return out, ckpt, resume
