"""`python -m crossvit_fast train`: options, and the entry point `main(argv) -> exit status`.

Exit status: 0 when the run ends; 2 for a usage, checkpoint or data error (one line on stderr,
from rank 0 only under torchrun); 128 + the signal number (130 SIGINT, 143 SIGTERM) when a
signal stopped it at a step boundary after writing the checkpoint (the command that resumes is
printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys

from ..backends import BACKENDS
from ..registry import list_models
from .data import default_workers
from .errors import TrainError
from .models import DEFAULT_CONFIG, DIGITS_LR, FINETUNE_LR_FACTOR
from .state import MUST_MATCH

__all__ = ["DEFAULT_CONFIG", "build_parser", "main", "parse_args", "resume_command"]

DEFAULT_EPOCHS = 10
DEFAULT_SAVE_EVERY = "10m"


def parse_interval(text: str) -> tuple[str, float]:
    """--save-every: "N" steps, or a time "N{s,m,h}" -> ("steps", N) / ("seconds", N)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0 or (not m.group(2) and "." in m.group(1)):
        raise argparse.ArgumentTypeError(
            f"expected a positive step count (500) or a time (90s, 10m, 1h), got {text!r}"
        )
    if not m.group(2):
        return ("steps", int(m.group(1)))
    return ("seconds", float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crossvit_fast train",
        description=(
            "Train a CrossViT. With no arguments: a small CrossViT on scikit-learn's bundled "
            "digits (offline, no download), about 35 s on an idle 2-core CPU. Multi-GPU / "
            "multi-node: launch with torchrun (DDP; add --fsdp for FSDP2)."
        ),
        epilog=(
            "Exit status: 0 done; 2 usage, checkpoint or data error; 130 / 143 stopped by "
            "SIGINT / SIGTERM after writing the checkpoint (the resume command is printed). "
            "Progress lines go to stdout, the progress bar and errors to stderr; OUT/metrics.jsonl "
            "gets one JSON line per epoch and one at the end."
        ),
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="a registered name (" + ", ".join(list_models()) + ") or a JSON file of "
        "CrossViTConfig fields or of timm CrossVit arguments (img_scale, ...); default: a small "
        "CrossViT for the built-in digits",
    )
    g.add_argument(
        "--backend",
        default="auto",
        choices=(*BACKENDS, "auto"),
        help="kernels (default: auto, the fastest available per op)",
    )
    g.add_argument(
        "--init",
        default=None,
        metavar="PATH|pretrained",
        help="start from these weights: a timm / IBM .pth or .safetensors file, a crossvit_fast "
        "checkpoint or export directory, or 'pretrained' (the hub weights of --model); heads "
        "of another class count are re-initialised. Default peak LR is then "
        f"{FINETUNE_LR_FACTOR:g} x the from-scratch one",
    )
    g.add_argument(
        "--drop-path", type=float, default=None, help="stochastic depth rate (default: config's)"
    )
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute ViT blocks")
    g.add_argument("--compile", action="store_true", help="torch.compile the training model")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=None,
        help="ImageFolder directory (DIR/<class>/<img> or DIR/train + DIR/val); default: "
        "scikit-learn's digits with a held-out 20%% validation split",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="held-out fraction when the data has no train/val split (default: 0.2 digits, "
        "0.1 --data)",
    )
    g.add_argument(
        "--hflip",
        type=float,
        default=None,
        help="random horizontal flip rate (default: 0.5 with --data, 0 on digits)",
    )
    g.add_argument(
        "--rrc-scale",
        type=float,
        default=0.08,
        help="with --data: RandomResizedCrop's smallest area fraction (default: %(default)s; "
        "1 = whole image, aspect still jittered)",
    )
    g.add_argument(
        "--crop-pct",
        type=float,
        default=0.875,
        help="with --data: evaluation resizes to input / crop-pct (bicubic), then centre-crops "
        "(default: %(default)s, timm's)",
    )
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (DeiT: 0.8; default: off)")
    g.add_argument(
        "--cutmix", type=float, default=0.0, help="cutmix alpha (DeiT: 1.0; default: off)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes per training process for --data (default: min(4, CPUs "
        f"available / processes on this node) = {default_workers()} here)",
    )
    g.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="skip (and name, once) images that do not decode, instead of stopping with exit "
        "status 2",
    )
    g.add_argument("--train-samples", type=int, default=None, help="use the first N train images")
    g.add_argument("--val-samples", type=int, default=None, help="use the first N val images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process (default: %(default)s)")
    g.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs to train (default: %(default)s)"
    )
    g.add_argument(
        "--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)"
    )
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak LR (default: {DIGITS_LR:g} on digits, 5e-4 x global batch / 512 with --data "
        f"(CrossViT's recipe); {FINETUNE_LR_FACTOR:g} x that with --init)",
    )
    g.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor (default: %(default)s)")
    g.add_argument(
        "--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)"
    )
    g.add_argument(
        "--warmup-steps", type=int, default=None, help="linear warm-up (default: 5%% of the steps)"
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="cross-entropy label smoothing (default: %(default)s)",
    )
    g.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (e.g. 0.9998) and evaluate it "
        "too (default: off)",
    )
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: off)")
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="autocast dtype; auto (default) = bf16 on a GPU that has it, off on CPU; fp16 adds "
        "a GradScaler",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="model init, data order and augmentation (default: %(default)s)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="(default: auto = cuda:LOCAL_RANK when a GPU is visible, else cpu)",
    )
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per stage)")
    g.add_argument("--out", default=None, help="run directory (default: runs/train-<time>)")
    g.add_argument(
        "--save-every",
        type=parse_interval,
        default=DEFAULT_SAVE_EVERY,
        metavar="N|TIME",
        help="checkpoint every N steps, or every TIME (90s, 10m, 1h); checkpoints are also "
        f"written at every epoch end, at the end and on SIGINT / SIGTERM (default: "
        f"{DEFAULT_SAVE_EVERY})",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (default: OUT/checkpoint.pt; a new run when it does not "
        "exist yet). Must keep the model and " + ", ".join(MUST_MATCH) + "; may change the "
        "rest (e.g. more --steps / --epochs, --fsdp)",
    )
    g.add_argument("--metrics-json", default=None, help="write the final metrics here")
    g.add_argument(
        "--log-every", type=int, default=10, help="progress bar update interval (default: 10)"
    )
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one line per epoch is still printed)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    for name in ("steps", "train_samples", "val_samples"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {v}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup-steps: expected >= 0, got {args.warmup_steps}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers: expected >= 0, got {args.workers}")
    if args.lr is not None and args.lr <= 0:
        p.error(f"--lr: expected > 0, got {args.lr}")
    for name in ("label_smoothing", "hflip"):
        v = getattr(args, name)
        if v is not None and not 0.0 <= v < 1.0:
            p.error(f"--{name.replace('_', '-')}: expected a value in [0, 1), got {v}")
    if not 0.0 < args.rrc_scale <= 1.0:
        p.error(f"--rrc-scale: expected a value in (0, 1], got {args.rrc_scale}")
    if not 0.0 < args.crop_pct <= 1.0:
        p.error(f"--crop-pct: expected a value in (0, 1], got {args.crop_pct}")
    for name in ("mixup", "cutmix"):
        if getattr(args, name) < 0:
            p.error(f"--{name}: expected an alpha >= 0, got {getattr(args, name)}")
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        p.error(f"--ema: expected a decay in (0, 1), got {args.ema}")
    if isinstance(args.save_every, str):  # the default, not passed through `type`
        args.save_every = parse_interval(args.save_every)
    return args


def _python() -> str:
    found = shutil.which("python")
    same = found and os.path.realpath(found) == os.path.realpath(sys.executable)
    return "python" if same else sys.executable


def resume_command(args: argparse.Namespace, out: str) -> str:
    """The command line that continues this run: its options, --out OUT, --resume (under
    torchrun: with this run's process counts)."""
    toks = []
    for a in build_parser()._actions:
        if not a.option_strings or a.dest in ("help", "out", "resume"):
            continue
        v = getattr(args, a.dest, a.default)
        if a.dest == "save_every":
            if v == parse_interval(DEFAULT_SAVE_EVERY):
                continue
            v = str(v[1]) if v[0] == "steps" else f"{v[1]:g}s"
        elif v == a.default:
            continue
        opt = max(a.option_strings, key=len)
        toks += [opt] if a.nargs == 0 else [opt, str(v)]
    toks += ["--out", out, "--resume"]
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        nodes = world // max(local, 1)
        launch = ["torchrun"] + ([f"--nnodes={nodes}"] if nodes > 1 else [])
        launch += [f"--nproc_per_node={local}"]
        if nodes > 1:
            launch += ["<your rendezvous options>"]
        return shlex.join([*launch, "-m", "crossvit_fast", "train", *toks])
    return shlex.join([_python(), "-m", "crossvit_fast", "train", *toks])


def report_error(exc: BaseException, prefix: str = "train") -> None:
    """One line on stderr (rank 0 only under torchrun: every rank raises the same error)."""
    if int(os.environ.get("RANK") or 0) == 0:
        print(f"{prefix}: error: {exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run `train` with these arguments; see the module docstring for the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    from .preempt import Stopped
    from .state import CheckpointError
    from .trainer import run

    try:
        run(args)
    except Stopped as stop:
        if int(os.environ.get("RANK") or 0) == 0:
            print(f"train: resume with:\n  {resume_command(args, stop.out)}", flush=True)
        return stop.exit_status
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        report_error(exc)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: abort now, without a checkpoint
        report_error("aborted (second Ctrl-C); the last checkpoint written is still there")
        return 130
    return 0
