"""The training run behind `python -m crossvit_fast train` (options: `cli.build_parser`).

One process per device; under torchrun every process runs this same code on its slice of each
global batch (`data.epoch_batches`). Order of work per optimizer step:

    batch -> Preprocess (on device) -> autocast forward -> loss -> (scaled) backward
          -> [unscale, clip] -> optimizer step -> scheduler step
    then, at an epoch end or the last step: evaluate; every --save-every steps and at the
    end: checkpoint (all ranks gather the full state, rank 0 writes it atomically).

Exact resume: the data order is a function of (seed, epoch); a checkpoint stores model,
optimizer, scheduler, scaler, step and every rank's RNG state, so continuing from step s
replays exactly the steps an uninterrupted run takes after s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import data as data_mod
from ..model import CrossViT
from . import dist as dist_mod
from . import state as state_mod
from .cli import DIGITS_LR, TrainError, resolve_config
from .optim import build_optimizer

__all__ = ["Trainer", "run"]


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _input_size(cfg) -> tuple[int, int]:
    """The image size fed to the model: the largest branch size (timm's 240 for the *_240
    variants); each branch resizes from it."""
    return (max(h for h, _ in cfg.img_size), max(w for _, w in cfg.img_size))


@dataclass
class _Meter:
    """Running sums on the device (no host sync per step); read at log points."""

    device: torch.device
    sums: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.reset()

    def reset(self):
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor):
        # In-place adds with a Python count: no host -> device copy per step.
        n = y.numel()
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (logits.detach().argmax(-1) == y).sum()
        self.sums[2] += n


class Trainer:
    """Builds data, model, optimizer from parsed options; `run()` trains to the end.

    `run(until_step=k)` stops after step k as if interrupted (the checkpoint written then is
    what a resume continues from); tests use it to show resumed == uninterrupted training.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dist = dist_mod.setup(args.device, need_group=args.fsdp)
        self.device = self.dist.device
        d = self.dist
        self.log = print if d.is_main else (lambda *a, **k: None)

        # -- data (the same on every rank; each takes its slices per batch) --
        torch.manual_seed(args.seed)
        if args.data is None:
            ds = data_mod.load_digits(args.val_fraction or 0.2)
        else:
            ds = None  # needs the model's input size first
        name, cfg = resolve_config(args.model, ds.num_classes if ds else 0, args.drop_path)
        size = _input_size(cfg)
        if ds is None:
            ds = data_mod.load_image_folder(
                args.data, size, grey=cfg.in_chans == 1, val_fraction=args.val_fraction or 0.1
            )
            name, cfg = resolve_config(args.model, ds.num_classes, args.drop_path)
        if args.train_samples:
            ds.train = _head(ds.train, args.train_samples)
        if args.val_samples:
            ds.val = _head(ds.val, args.val_samples)
        self.ds, self.model_name, self.cfg = ds, name, cfg
        hflip = args.hflip if args.hflip is not None else (0.0 if args.data is None else 0.5)
        self.prep = data_mod.Preprocess(size, cfg.in_chans, ds.mean, ds.std, self.device, hflip)
        self.workers = 0 if args.data is None else (args.workers if args.workers is not None else 4)

        self.global_batch = args.batch_size * d.world_size
        self.steps_per_epoch = len(ds.train) // self.global_batch
        if self.steps_per_epoch < 1:
            raise TrainError(
                f"the training split has {len(ds.train)} images, fewer than one global batch "
                f"({args.batch_size} x {d.world_size} processes = {self.global_batch})"
            )
        self.total_steps = args.steps or args.epochs * self.steps_per_epoch
        self.warmup = (
            args.warmup_steps
            if args.warmup_steps is not None
            else max(1, round(0.05 * self.total_steps))
        )
        self.lr = args.lr or (DIGITS_LR if args.data is None else 5e-4 * self.global_batch / 512)
        self.amp_dtype = _amp_dtype(args.amp, self.device)

        # -- model: identical init on every rank (same seed), then per-rank RNG streams --
        try:
            net = CrossViT(cfg, backend=args.backend)
        except RuntimeError as exc:  # backend unavailable here: say why
            raise TrainError(str(exc)) from exc
        net = net.to(self.device)
        if args.grad_checkpointing:
            net.set_grad_checkpointing(True)
        self.net = dist_mod.wrap_model(net, d, fsdp=args.fsdp)
        # Compile the wrapped module (DDP's hooks / FSDP's gathers then sit at graph edges).
        self.model = torch.compile(self.net) if args.compile else self.net
        self.bare = net  # the CrossViT itself (parameter names, no_weight_decay, config)
        torch.manual_seed(args.seed * 1000 + d.rank + 1)

        self.opt, self.sched = build_optimizer(
            net, self.lr, args.weight_decay, self.total_steps, self.warmup, args.min_lr
        )
        if self.amp_dtype == torch.float16 and args.fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            # Gradients are sharded: the inf/NaN check must be agreed over all ranks.
            self.scaler = ShardedGradScaler(self.device.type)
        else:
            self.scaler = torch.amp.GradScaler(
                self.device.type, enabled=self.amp_dtype == torch.float16
            )

        # -- run directory, resume --
        self.run_opts = self._run_options()
        self.out, self.ckpt_path, resume_path = self._paths()
        self.step = 0
        self.last_eval: dict = {}
        if resume_path is not None:
            self._resume(resume_path)

    # -- setup helpers --------------------------------------------------------------------------

    def _run_options(self) -> dict:
        """What determines the trajectory: a resume must match all of it."""
        a = self.args
        return {
            "data": a.data or "digits",
            "train_images": len(self.ds.train),
            "val_images": len(self.ds.val),
            "batch_size": a.batch_size,
            "world_size": self.dist.world_size,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "lr": self.lr,
            "min_lr": a.min_lr,
            "warmup_steps": self.warmup,
            "weight_decay": a.weight_decay,
            "label_smoothing": a.label_smoothing,
            "clip_grad": a.clip_grad,
            "hflip": self.prep.hflip,
            "amp": str(self.amp_dtype),
            "seed": a.seed,
            "fsdp": a.fsdp,
        }

    def _paths(self) -> tuple[str, str, str | None]:
        a = self.args
        resume = None
        if a.resume is not None:
            if a.resume:
                resume = a.resume
            elif a.out:
                resume = os.path.join(a.out, state_mod.CHECKPOINT_NAME)
            else:
                raise TrainError(
                    "--resume without a CHECKPOINT needs --out DIR (its run directory)"
                )
        if resume is not None and not os.path.isfile(resume):
            raise state_mod.CheckpointError(f"checkpoint {resume} does not exist")
        out = a.out or (os.path.dirname(os.path.abspath(resume)) if resume else None)
        if out is None:
            stamp = dist_mod.broadcast_object(time.strftime("%Y%m%d-%H%M%S"), self.dist)
            out = os.path.join("runs", f"train-{stamp}")
        ckpt = os.path.join(out, state_mod.CHECKPOINT_NAME)
        if os.path.exists(ckpt) and not (resume and os.path.samefile(resume, ckpt)):
            raise TrainError(
                f"{ckpt} exists: pass --resume to continue that run, or choose another --out "
                "(a checkpoint is never overwritten by another run)"
            )
        return out, ckpt, resume

    def _resume(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        st = state_mod.load(path)
        state_mod.check_compatible(st, self.cfg.to_dict(), self.run_opts, path)
        if len(st["rng"]) != self.dist.world_size:
            raise state_mod.CheckpointError(
                f"{path}: RNG states of {len(st['rng'])} processes, this run has "
                f"{self.dist.world_size}"
            )
        try:
            set_state_dict(
                self.net,
                self.opt,
                model_state_dict=st["model"],
                optim_state_dict=st["optimizer"],
                options=StateDictOptions(full_state_dict=True, strict=True),
            )
            self.sched.load_state_dict(st["scheduler"])
            if self.scaler.is_enabled():
                self.scaler.load_state_dict(st["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise state_mod.CheckpointError(
                f"{path}: its state does not fit this model / optimizer: {exc}"
            ) from exc
        state_mod.set_rng_state(st["rng"][self.dist.rank], self.device)
        self.step = int(st["step"])
        self.last_eval = dict(st.get("metrics") or {})
        self.log(f"resumed from {path} at step {self.step}/{self.total_steps}")

    # -- checkpoint ----------------------------------------------------------------------------

    def save(self) -> None:
        """All ranks gather the full state (a collective under FSDP); rank 0 writes it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(
            self.net,
            self.opt,
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        rng = dist_mod.all_gather_object(state_mod.rng_state(self.device), self.dist)
        if self.dist.is_main:
            state_mod.save(
                {
                    "config": self.cfg.to_dict(),
                    "run": self.run_opts,
                    "step": self.step,
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "scheduler": self.sched.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "rng": [
                        {k: v.cpu() if v is not None else None for k, v in r.items()} for r in rng
                    ],
                    "metrics": self.last_eval,
                },
                self.ckpt_path,
            )

    # -- steps ---------------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, meter: _Meter) -> None:
        with self._autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.args.label_smoothing)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.args.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        meter.add(loss, logits, y)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation accuracy and (plain) cross-entropy over the whole held-out split, summed
        over ranks. Runs the eager model: a compiled one would recompile for eval mode and the
        short last batch for little gain."""
        self.net.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        batches = data_mod.eval_batches(
            len(self.ds.val), self.args.batch_size, self.dist.world_size, self.dist.rank
        )
        for xb, yb in data_mod.iterate(self.ds.val, batches, self.workers, self._pin):
            x, y = self.prep(xb), yb.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.net(x).float()
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += y.numel()
        dist_mod.all_reduce_sum(sums, self.dist)
        self.net.train()
        loss_sum, correct, n = sums.tolist()
        return {"accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1)}

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the loop ------------------------------------------------------------------------------

    def _header(self) -> None:
        n_params = sum(p.numel() for p in self.bare.parameters())
        ops = self.bare.opset(self.device)
        served = ", ".join(f"{op}={src}" for op, src in ops.sources.items())
        a = self.args
        self.log(
            f"train: model {self.model_name} ({n_params / 1e6:.2f}M params, input "
            f"{_input_size(self.cfg)}), backend {self.bare.backend} [{served}]\n"
            f"train: data {self.run_opts['data']}: {len(self.ds.train)} train / "
            f"{len(self.ds.val)} val images, {self.ds.num_classes} classes\n"
            f"train: {self.dist.world_size} process(es) on {self.device.type}"
            f"{' (FSDP2)' if a.fsdp else ' (DDP)' if self.dist.world_size > 1 else ''}, "
            f"batch {a.batch_size} x {self.dist.world_size}, {self.total_steps} steps "
            f"({self.steps_per_epoch}/epoch), lr {self.lr:.3g}, amp {a.amp} -> "
            f"{self.amp_dtype}, compile {a.compile}, grad checkpointing {a.grad_checkpointing}\n"
            f"train: checkpoints -> {self.ckpt_path}"
        )

    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    def run(self, until_step: int | None = None) -> dict:
        """Train from the current step to the end (or to `until_step`); returns the metrics."""
        a, d = self.args, self.dist
        self._header()
        stop = self.total_steps if until_step is None else min(until_step, self.total_steps)
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "tqdm is needed for training; pip install 'crossvit_fast[train]'"
            ) from exc
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=a.no_progress or not d.is_main,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        meter = _Meter(self.device)
        # Throughput: wall time from the end of this run's first step (compilation, warm-up)
        # to the end of its last, minus evaluation and checkpoint time; synced on GPUs.
        first_step, t_first, excluded = self.step, None, 0.0
        t_window, win_steps = time.perf_counter(), 0
        self.net.train()
        while self.step < stop:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = data_mod.epoch_batches(
                len(self.ds.train), a.batch_size, d.world_size, d.rank, epoch, a.seed
            )[offset : offset + (stop - self.step)]
            if offset == 0:
                meter.reset()
            for xb, yb in data_mod.iterate(self.ds.train, batches, self.workers, self._pin):
                # Augmentation draws from a generator seeded per (step, rank): reproducible
                # across resumes and independent of the model's use of the global RNG.
                gen = torch.Generator().manual_seed(a.seed * 1_000_003 + self.step * 131 + d.rank)
                x, y = self.prep(xb, gen), yb.to(self.device, non_blocking=True)
                self.train_step(x, y, meter)
                self.step += 1
                win_steps += 1
                bar.update(1)
                if self.step == first_step + 1:
                    self._sync()
                    t_first = t_window = time.perf_counter()
                    win_steps = 0
                if self.step % a.log_every == 0 or self.step == stop:
                    self._sync()
                    now = time.perf_counter()
                    s = dist_mod.all_reduce_sum(meter.sums.clone(), d).tolist()
                    post = {
                        "loss": f"{s[0] / max(s[2], 1):.3f}",
                        "acc": f"{s[1] / max(s[2], 1):.3f}",
                    }
                    if win_steps:
                        post["img/s"] = f"{win_steps * self.global_batch / (now - t_window):.0f}"
                    post["lr"] = f"{self.sched.get_last_lr()[0]:.2e}"
                    bar.set_postfix(post)
                    t_window, win_steps = now, 0
                t_pause = None
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    self._sync()
                    t_pause = time.perf_counter()
                    self.last_eval = self.evaluate()
                    s = dist_mod.all_reduce_sum(meter.sums.clone(), d).tolist()
                    self.last_eval["train_loss"] = s[0] / max(s[2], 1)
                    self._say(
                        f"epoch {math.ceil(self.step / self.steps_per_epoch)} step {self.step}: "
                        f"train loss {self.last_eval['train_loss']:.4f}  val loss "
                        f"{self.last_eval['loss']:.4f}  val acc {self.last_eval['accuracy']:.4f}"
                    )
                if self.step % a.save_every == 0 or self.step == stop:
                    if t_pause is None:
                        self._sync()
                        t_pause = time.perf_counter()
                    self.save()
                if t_pause is not None:
                    now = time.perf_counter()
                    if self.step > first_step + 1:
                        excluded += now - t_pause
                    t_window, win_steps = now, 0
        self._sync()
        t_end = time.perf_counter()
        bar.close()
        timed = self.step - first_step - 1
        img_per_s = (
            timed * self.global_batch / (t_end - t_first - excluded)
            if timed > 0 and t_first is not None
            else None
        )
        if not self.last_eval:  # nothing evaluated yet in this run's history
            self.last_eval = self.evaluate()
        metrics = {
            "accuracy": self.last_eval["accuracy"],
            "loss": self.last_eval["loss"],
            "img_per_s": img_per_s,
            "steps": self.step,
            "train_loss": self.last_eval.get("train_loss"),
            "epochs": self.step / self.steps_per_epoch,
            "world_size": d.world_size,
            "model": self.model_name,
            "backend": self.bare.backend,
            "device": self.device.type,
            "amp": str(self.amp_dtype),
        }
        self.log(
            f"train: done at step {self.step}: val acc {metrics['accuracy']:.4f}, val loss "
            f"{metrics['loss']:.4f}"
            + (f", {img_per_s:.1f} img/s" if img_per_s else "")
            + f"; checkpoint {self.ckpt_path}"
        )
        if a.metrics_json and d.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(a.metrics_json)), exist_ok=True)
            with open(a.metrics_json, "w") as f:
                json.dump(metrics, f, indent=2)
        return metrics

    def close(self) -> None:
        dist_mod.teardown(self.dist)


def _head(split, n: int):
    """The first n images of a split (for quick runs and tests)."""
    n = min(n, len(split))
    if isinstance(split, data_mod.TensorImages):
        return data_mod.TensorImages(split.images[:n], split.labels[:n])
    return split.subset(torch.arange(n))


def run(args: argparse.Namespace) -> dict:
    """Train with parsed options; returns the final metrics."""
    trainer = None
    owned = dist_mod.dist.is_available() and not dist_mod.dist.is_initialized()
    try:
        trainer = Trainer(args)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        elif owned and dist_mod.dist.is_initialized():  # failed after joining the group
            dist_mod.dist.destroy_process_group()
