"""The training run behind `python -m crossvit_fast train` (options: `cli.build_parser`).

One process per device; under torchrun every process runs this same code on its slice of each
global batch (`data.epoch_batches`). Order of work per optimizer step:

    agree (stop on a signal? checkpoint now? a bad image?) -> batch -> Preprocess (on device)
          -> [mixup / cutmix] -> autocast forward -> loss -> (scaled) backward -> [unscale, clip]
          -> optimizer step -> scheduler step -> [EMA update]
    then, at an epoch end and the last step: evaluate (and the EMA weights), one line of
    metrics; at epoch ends, every --save-every, at the end and on a signal: checkpoint (all
    ranks gather the full state, rank 0 writes it atomically).

Exact resume: the data order is a function of (seed, epoch), augmentation of (seed, epoch,
image) and (seed, step, rank); a checkpoint stores model, optimizer, scheduler, scaler, EMA, step
and every rank's RNG state, so continuing from step s replays exactly the steps an uninterrupted
run takes after s (when the options are unchanged: `state.MUST_MATCH` says what may change).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.nn.functional as F

from ..model import CrossViT
from . import data as data_mod
from . import dist as dist_mod
from . import state as state_mod
from .augment import Mix, soft_cross_entropy
from .errors import BadImageError, TrainError
from .logs import RunLog
from .meters import Clock, Meter, Rate, amp_dtype, autocast, eval_metrics, evaluate, input_size
from .models import DIGITS_LR, FINETUNE_LR_FACTOR, load_init, resolve_config
from .optim import EMA, build_optimizer
from .preempt import Agreement, SignalStop, Stopped

__all__ = ["Trainer", "run"]


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
        self.agreement = Agreement(d.world_size)

        # -- data (the same on every rank; each takes its slices per batch) --
        torch.manual_seed(args.seed)
        name, cfg = resolve_config(args.model, 0, args.drop_path)  # size and channels first
        size, grey = input_size(cfg), cfg.in_chans == 1
        self.ds = data_mod.load_dataset(vars(args), size, grey)
        name, cfg = resolve_config(args.model, self.ds.num_classes, args.drop_path)
        self.model_name, self.cfg = name, cfg
        self.preprocess = data_mod.preprocess_info(vars(args), self.ds, size, grey)
        digits = args.data is None
        hflip = args.hflip if args.hflip is not None else (0.0 if digits else 0.5)
        # On digits the flip runs batched on the device; ImageFolder flips in its transform.
        self.prep = data_mod.Preprocess(
            size, cfg.in_chans, self.ds.mean, self.ds.std, self.device, hflip if digits else 0.0
        )
        self.hflip = hflip
        self.workers = (
            0
            if digits
            else (args.workers if args.workers is not None else data_mod.default_workers())
        )
        self.mix = Mix(args.mixup, args.cutmix, args.label_smoothing)

        self.global_batch = args.batch_size * d.world_size
        self.steps_per_epoch = len(self.ds.train) // self.global_batch
        if self.steps_per_epoch < 1:
            raise TrainError(
                f"the training split has {len(self.ds.train)} images, fewer than one global batch "
                f"({args.batch_size} x {d.world_size} processes = {self.global_batch})"
            )
        self.total_steps = args.steps or args.epochs * self.steps_per_epoch
        self.warmup = (
            args.warmup_steps
            if args.warmup_steps is not None
            else max(1, round(0.05 * self.total_steps))
        )
        base_lr = DIGITS_LR if digits else 5e-4 * self.global_batch / 512
        self.lr = args.lr or base_lr * (FINETUNE_LR_FACTOR if args.init else 1.0)
        self.amp_dtype = amp_dtype(args.amp, self.device)

        # -- run directory (a resume there skips --init: the checkpoint has the weights) --
        self.notes: list[str] = []  # printed after the header
        self.out, self.ckpt_path, resume_path = state_mod.run_paths(
            self.args, self.dist, self.notes
        )
        self.log = RunLog(self.out, d.is_main)
        if self.lr <= args.min_lr:
            self.notes.append(
                f"warning: the peak LR {self.lr:.3g} is at or below --min-lr {args.min_lr:g}: the "
                "schedule is flat at --min-lr; pass a larger --lr or a smaller --min-lr"
                + (
                    ""
                    if args.lr
                    else f" (the default scales with the global batch {self.global_batch} / 512)"
                )
            )

        # -- model: identical init on every rank (same seed), then per-rank RNG streams --
        try:
            net = CrossViT(cfg, backend=args.backend)
        except RuntimeError as exc:  # backend unavailable here: say why
            raise TrainError(str(exc)) from exc
        if args.init and resume_path is None:
            self.notes.append(load_init(net, args.init, name, cfg))
        net = net.to(self.device)
        if args.grad_checkpointing:
            net.set_grad_checkpointing(True)
        self.net = dist_mod.wrap_model(net, d, fsdp=args.fsdp)
        # Compile the wrapped module (DDP's hooks / FSDP's gathers then sit at graph edges).
        self.model = torch.compile(self.net) if args.compile else self.net
        self.bare = net  # the CrossViT itself (parameter names, no_weight_decay, config)
        self.ema = EMA(net.parameters(), args.ema) if args.ema else None
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

        self.run_opts = self._run_options()
        self.step = 0
        self.last_eval: dict = {}
        self.skipped: set[str] = set()  # bad files already named
        self.meter = Meter(self.device)
        if resume_path is not None:
            self._resume(resume_path)

    # -- setup helpers --------------------------------------------------------------------------

    def _run_options(self) -> dict:
        """What determines the trajectory (`state.MUST_MATCH`: what a resume must keep)."""
        a = self.args
        return {
            "data": a.data or "digits",
            "classes": list(self.ds.classes),
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
            "hflip": self.hflip,
            "rrc_scale": a.rrc_scale if a.data else None,
            "mixup": a.mixup,
            "cutmix": a.cutmix,
            "ema": a.ema,
            "amp": str(self.amp_dtype),
            "seed": a.seed,
            "fsdp": a.fsdp,
        }

    def _resume(self, path: str) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_state_dict,
        )

        st = state_mod.load(path)
        changed = state_mod.check_compatible(st, self.cfg.to_dict(), self.run_opts, path)
        full = StateDictOptions(full_state_dict=True, strict=True)
        try:
            if self.ema is not None and st.get("ema"):
                # The averages go through the model (which knows its sharding), then aside.
                set_model_state_dict(self.net, st["ema"], options=full)
                self.ema.copy_params()
            set_state_dict(
                self.net,
                self.opt,
                model_state_dict=st["model"],
                optim_state_dict=st["optimizer"],
                options=full,
            )
            if self.ema is not None and not st.get("ema"):
                self.ema.copy_params()
                changed.append("ema: starts from the checkpoint's weights")
            self.sched.load_state_dict(st["scheduler"])
            if self.scaler.is_enabled() and st["scaler"]:
                self.scaler.load_state_dict(st["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise state_mod.CheckpointError(
                f"{path}: its state does not fit this model / optimizer: {exc}"
            ) from exc
        # This run's schedule (peak LR, warm-up, floor, length) from the restored step on: the
        # same numbers as before when nothing changed.
        self.sched.base_lrs = [self.lr for _ in self.opt.param_groups]
        for g, fn in zip(self.opt.param_groups, self.sched.lr_lambdas):
            g["initial_lr"] = self.lr
            g["lr"] = self.lr * fn(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        state_mod.set_rng_state(st["rng"][self.dist.rank], self.device)
        self.step = int(st["step"])
        self.last_eval = dict(st.get("metrics") or {})
        self.skipped = set(st.get("skipped") or [])
        if st.get("meter") is not None and self.dist.is_main:  # the sum over ranks, once
            self.meter.sums.copy_(st["meter"])
        self.log.truncate(self.step)
        self.notes.append(f"resumed from {path} at step {self.step}/{self.total_steps}")
        self.notes += [f"resume: changed {c}" for c in changed]

    # -- checkpoint ----------------------------------------------------------------------------

    def save(self) -> None:
        """All ranks gather the full state (a collective under FSDP); rank 0 writes it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.net, self.opt, options=full)
        ema_sd = None
        if self.ema is not None:
            with self.ema.swapped():
                # Cloned: on the CPU the state dict's tensors are the parameters themselves.
                ema_sd = {
                    k: v.clone() for k, v in get_model_state_dict(self.net, options=full).items()
                }
        rng = dist_mod.all_gather_object(state_mod.rng_state(self.device), self.dist)
        meter = dist_mod.all_reduce_sum(self.meter.sums.clone(), self.dist).cpu()
        if self.dist.is_main:
            opts = {k: v for k, v in vars(self.args).items() if k != "save_every"}
            state_mod.save(
                {
                    "config": self.cfg.to_dict(),
                    "run": self.run_opts,
                    "options": json.loads(json.dumps(opts)),
                    "classes": list(self.ds.classes),
                    "preprocess": self.preprocess,
                    "step": self.step,
                    "model": model_sd,
                    "optimizer": optim_sd,
                    "scheduler": self.sched.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "ema": ema_sd,
                    "rng": [
                        {k: v.cpu() if v is not None else None for k, v in r.items()} for r in rng
                    ],
                    "metrics": self.last_eval,
                    "meter": meter,  # this epoch's training sums so far, over all ranks
                    "skipped": sorted(self.skipped),
                },
                self.ckpt_path,
            )
        self._last_save = time.monotonic()

    # -- steps ---------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, meter: Meter, rng) -> None:
        target = None
        if self.mix.enabled:
            x, target = self.mix(x, y, self.ds.num_classes, rng)
        with autocast(self.device, self.amp_dtype):
            logits = self.model(x)
        if target is None:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.args.label_smoothing)
        else:
            loss = soft_cross_entropy(logits.float(), target)
        self.scaler.scale(loss).backward()
        if self.args.clip_grad:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.args.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.step)
        meter.add(loss, logits, y)

    def _val_batches(self):
        batches = data_mod.eval_batches(
            len(self.ds.val), self.args.batch_size, self.dist.world_size, self.dist.rank
        )
        return data_mod.iterate(self.ds.val, batches, self.workers, self._pin)

    def evaluate(self) -> dict:
        """Validation loss, top-1 and top-5 over the whole held-out split, summed over ranks
        (and of the EMA weights, as ema_*). Runs the eager model: a compiled one would recompile
        for eval mode and the short last batch for little gain."""
        sums, bad = evaluate(self.net, self._val_batches(), self.prep, self.device, self.amp_dtype)
        out = eval_metrics(dist_mod.all_reduce_sum(sums, self.dist))
        if self.ema is not None:
            with self.ema.swapped():
                sums, _ = evaluate(
                    self.net, self._val_batches(), self.prep, self.device, self.amp_dtype
                )
            ema = eval_metrics(dist_mod.all_reduce_sum(sums, self.dist))
            out.update({f"ema_{k}": v for k, v in ema.items()})
        self._handle_bad(self.agreement.gather_bad(bad))
        return out

    def _handle_bad(self, bad: list) -> None:
        """Stop on the first undecodable file (all ranks raise the same error), or name each new
        one once with --skip-bad-images."""
        if not bad:
            return
        if not self.args.skip_bad_images:
            raise BadImageError(*bad[0])
        for path, reason in bad:
            if path not in self.skipped:
                self.skipped.add(path)
                self.log.line(f"train: skipped bad image {path}: {reason}")

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
        extras = [
            f"{k} {v:g}"
            for k, v in (("mixup", a.mixup), ("cutmix", a.cutmix), ("ema", a.ema or 0))
            if v
        ]
        self.log.line(
            f"train: model {self.model_name} ({n_params / 1e6:.2f}M params, input "
            f"{input_size(self.cfg)}), backend {self.bare.backend} [{served}]\n"
            f"train: data {self.run_opts['data']}: {len(self.ds.train)} train / "
            f"{len(self.ds.val)} val images, {self.ds.num_classes} classes, "
            f"{self.workers} decoding workers\n"
            f"train: {self.dist.world_size} process(es) on {self.device.type}"
            f"{' (FSDP2)' if a.fsdp else ' (DDP)' if self.dist.world_size > 1 else ''}, "
            f"batch {a.batch_size} x {self.dist.world_size}, {self.total_steps} steps "
            f"({self.steps_per_epoch}/epoch), lr {self.lr:.3g}, amp {a.amp} -> "
            f"{self.amp_dtype}, compile {a.compile}, grad checkpointing {a.grad_checkpointing}"
            + (", " + ", ".join(extras) if extras else "")
            + f"\ntrain: checkpoints -> {self.ckpt_path}"
        )
        for note in self.notes:
            self.log.line(f"train: {note}")

    def _epoch_record(self, event: str, rate: Rate, train_loss: float | None) -> dict:
        e = self.last_eval
        rec = {
            "event": event,
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "train_loss": train_loss,
            "val_loss": e.get("loss"),
            "top1": e.get("top1"),
            "top5": e.get("top5"),
            "img_per_s": rate.img_per_s(self.global_batch),
            "lr": self.sched.get_last_lr()[0],
        }
        rec.update({k: v for k, v in e.items() if k.startswith("ema_")})
        return rec

    def run(self, until_step: int | None = None, signals: SignalStop | None = None) -> dict:
        """Train from the current step to the end (or to `until_step`); returns the metrics.
        Raises `Stopped` (after writing the checkpoint) when SIGINT / SIGTERM arrived (while
        `signals` is active, by default during this call)."""
        with contextlib.nullcontext(signals) if signals else SignalStop() as sig:
            try:
                return self._run(sig, until_step)
            finally:
                self.log.close()

    def _run(self, signals: SignalStop, until_step: int | None) -> dict:
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
        self.log.attach_bar(bar)
        meter = self.meter
        clock = Clock(self._sync)
        first_step = self.step
        self._last_save = time.monotonic()
        signum = 0
        self.net.train()
        while self.step < stop and not signum:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            batches = data_mod.epoch_batches(
                len(self.ds.train), a.batch_size, d.world_size, d.rank, epoch, a.seed
            )[offset : offset + (stop - self.step)]
            if offset == 0:
                meter.reset()
                clock.epoch = Rate()
            loader = data_mod.iterate(
                self.ds.train, batches, self.workers, self._pin, seed=a.seed * 100_003 + epoch
            )
            for xb, yb, bad in loader:
                verdict = self.agreement.agree(signals.signum, self._time_save_due(), bad)
                self._handle_bad(verdict.bad)
                if verdict.stop:
                    signum = verdict.stop
                    break
                if verdict.save:
                    clock.pause()
                    self.save()
                    clock.resume()
                # Augmentation draws from generators seeded per (step, rank): reproducible
                # across resumes and independent of the model's use of the global RNG.
                seed = a.seed * 1_000_003 + self.step * 131 + d.rank
                x = self.prep(xb, torch.Generator().manual_seed(seed))
                y = yb.to(self.device, non_blocking=True)
                self.train_step(x, y, meter, random.Random(seed))
                self.step += 1
                bar.update(1)
                if self.step == first_step + 1:
                    clock.start()
                else:
                    clock.step()
                if self.step % a.log_every == 0 or self.step == stop:
                    clock.pause()
                    s = dist_mod.all_reduce_sum(meter.sums.clone(), d).tolist()
                    loss, lr = s[0] / max(s[2], 1), self.sched.get_last_lr()[0]
                    post = {"loss": f"{loss:.3f}", "acc": f"{s[1] / max(s[2], 1):.3f}"}
                    rate = clock.window.img_per_s(self.global_batch)
                    if rate:
                        post["img/s"] = f"{rate:.0f}"
                    post["lr"] = f"{lr:.2e}"
                    bar.set_postfix(post)
                    self.log.scalars(self.step, {"train/loss": loss, "train/lr": lr})
                    clock.window = Rate()
                    clock.resume()
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end or self.step == self.total_steps:
                    clock.pause()
                    self.last_eval = self.evaluate()
                    s = dist_mod.all_reduce_sum(meter.sums.clone(), d).tolist()
                    train_loss = s[0] / max(s[2], 1)
                    self.last_eval["train_loss"] = train_loss
                    self._epoch_line(clock.epoch, train_loss)
                    self.log.record(self._epoch_record("epoch", clock.epoch, train_loss))
                if epoch_end or self.step == stop or self._step_save_due():
                    clock.pause()
                    self.save()
                clock.resume()
        clock.pause()
        bar.close()
        self.log.attach_bar(None)
        if signum:
            self.save()
            name = signal.Signals(signum).name
            self.log.record({"event": "stopped", "signal": name, "step": self.step})
            self.log.line(
                f"train: {name}: stopped at step {self.step}/{self.total_steps}, checkpoint "
                f"{self.ckpt_path}"
            )
            raise Stopped(signum, self.step, self.ckpt_path, self.out)
        if not self.last_eval:  # nothing evaluated yet in this run's history
            self.last_eval = self.evaluate()
        img_per_s = clock.run.img_per_s(self.global_batch)
        e = self.last_eval
        metrics = {
            "accuracy": e["top1"],
            "top5": e["top5"],
            "loss": e["loss"],
            "img_per_s": img_per_s,
            "steps": self.step,
            "train_loss": e.get("train_loss"),
            "epochs": self.step / self.steps_per_epoch,
            "world_size": d.world_size,
            "model": self.model_name,
            "backend": self.bare.backend,
            "device": self.device.type,
            "amp": str(self.amp_dtype),
        }
        if "ema_top1" in e:
            metrics.update(
                ema_accuracy=e["ema_top1"], ema_top5=e["ema_top5"], ema_loss=e["ema_loss"]
            )
        if self.step == stop == self.total_steps and self.step > first_step:
            self.log.record(self._epoch_record("end", clock.run, e.get("train_loss")))
        self.log.line(
            f"train: done at step {self.step}: val top-1 {e['top1']:.4f}, top-5 {e['top5']:.4f}, "
            f"loss {e['loss']:.4f}"
            + (f", {img_per_s:.1f} img/s" if img_per_s else "")
            + f"; checkpoint {self.ckpt_path}"
        )
        if a.metrics_json and d.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(a.metrics_json)), exist_ok=True)
            with open(a.metrics_json, "w") as f:
                json.dump(metrics, f, indent=2)
        if d.world_size > 1 and d.initialized:
            # Leave together: a rank that tears down its (gloo) group while rank 0 is still
            # saving or writing aborts at exit ("terminate called without an active exception").
            dist_mod.dist.barrier()
        return metrics

    def _time_save_due(self) -> bool:
        kind, every = self.args.save_every
        return (
            kind == "seconds" and self.dist.is_main and time.monotonic() - self._last_save >= every
        )

    def _step_save_due(self) -> bool:
        kind, every = self.args.save_every
        return kind == "steps" and self.step % every == 0

    def _epoch_line(self, rate: Rate, train_loss: float) -> None:
        e, r = self.last_eval, rate.img_per_s(self.global_batch)
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.log.line(
            f"epoch {math.ceil(self.step / self.steps_per_epoch)}/{epochs} step "
            f"{self.step}/{self.total_steps}: train loss {train_loss:.4f}  val loss "
            f"{e['loss']:.4f}  top-1 {e['top1']:.4f}  top-5 {e['top5']:.4f}"
            + (f"  (ema top-1 {e['ema_top1']:.4f})" if "ema_top1" in e else "")
            + (f"  {r:.0f} img/s" if r else "")
            + f"  lr {self.sched.get_last_lr()[0]:.2e}"
        )

    def close(self) -> None:
        """Release the run: the wrapped model (DDP's reducer, FSDP's hooks), the optimizer and EMA
        hold the process group; they are dropped and collected here, while the interpreter is
        whole, and the group left after. Left to interpreter shutdown, the gloo backend was torn
        down out of order and a rank aborted after a finished run ("terminate called without an
        active exception", seen in CI's torchrun tests). The trainer is not usable after."""
        for name in ("model", "net", "bare", "ema", "opt", "sched", "scaler"):
            setattr(self, name, None)
        gc.collect()
        dist_mod.teardown(self.dist)


def run(args: argparse.Namespace) -> dict:
    """Train with parsed options; returns the final metrics."""
    trainer = None
    owned = dist_mod.dist.is_available() and not dist_mod.dist.is_initialized()
    try:
        # Signals from here on: one during setup stops the run before its first step.
        with SignalStop() as signals:
            trainer = Trainer(args)
            return trainer.run(signals=signals)
    finally:
        if trainer is not None:
            trainer.close()
        elif owned and dist_mod.dist.is_initialized():  # failed after joining the group
            dist_mod.dist.destroy_process_group()
