"""`python -m crossvit_fast train`: options, and the entry point `main(argv) -> exit code`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..backends import BACKENDS
from ..config import CrossViTConfig
from ..registry import list_models, model_config

__all__ = ["DEFAULT_CONFIG", "build_parser", "main", "parse_args", "resolve_config"]

# The default model, sized for the built-in digits so that the default run reaches > 0.9
# validation accuracy on a 2-core CPU in about a minute: the 8x8 digits are upsampled to 16x16;
# branch 0 sees 16 patches of 4x4 px (2x2 digit pixels each), branch 1 resizes to 12x12 and sees 4
# patches of 6x6 px: the same 1 : 0.75 scale pair as timm's 240 / 224 variants, and three stages of
# (1, 2) blocks + fusion like every timm CrossViT.
DEFAULT_CONFIG = CrossViTConfig(
    img_size=(16, 12),
    patch_size=(4, 6),
    embed_dim=(48, 96),
    depth=((1, 2, 0),) * 3,
    num_heads=(3, 3),
    mlp_ratio=(2.0, 2.0),
    num_classes=10,
)
DEFAULT_EPOCHS = 10
DIGITS_LR = 2e-3


class TrainError(Exception):
    """A user-facing problem (bad option, unusable checkpoint or data): reported without a
    traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crossvit_fast train",
        description=(
            "Train a CrossViT. With no arguments: a small CrossViT on scikit-learn's bundled "
            "digits (offline, no download), a few minutes at most on a laptop CPU. Multi-GPU / "
            "multi-node: launch with torchrun (DDP; add --fsdp for FSDP2)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="a registered name (" + ", ".join(list_models()) + ") or a JSON file of "
        "CrossViTConfig fields; default: a small CrossViT for the built-in digits",
    )
    g.add_argument("--backend", default="auto", choices=(*BACKENDS, "auto"))
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
        help="held-out fraction when DATA has no train/val split (default 0.2 digits, 0.1 DATA)",
    )
    g.add_argument("--hflip", type=float, default=None, help="random horizontal flip rate")
    g.add_argument("--workers", type=int, default=None, help="decoding processes for --data")
    g.add_argument("--train-samples", type=int, default=None, help="use the first N train images")
    g.add_argument("--val-samples", type=int, default=None, help="use the first N val images")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    g.add_argument("--steps", type=int, default=None, help="total optimizer steps (over --epochs)")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"peak LR; default {DIGITS_LR:g} on digits, 5e-4 x global batch / 512 with --data "
        "(CrossViT's recipe)",
    )
    g.add_argument("--min-lr", type=float, default=1e-5, help="cosine floor")
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "off"),
        help="autocast dtype; auto = bf16 on a GPU that has it, off on CPU; fp16 adds a GradScaler",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per stage)")
    g.add_argument("--out", default=None, help="run directory (default: runs/train-<time>)")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (default: OUT/checkpoint.pt)",
    )
    g.add_argument("--metrics-json", default=None, help="write the final metrics here")
    g.add_argument("--log-every", type=int, default=10, help="progress bar update interval")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "log_every", "save_every"):
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
    return args


def resolve_config(model: str | None, num_classes: int, drop_path: float | None) -> tuple:
    """(name, CrossViTConfig) for --model, with the data's class count (and --drop-path)."""
    if model is None:
        name, cfg = "default", DEFAULT_CONFIG
    elif model in list_models():
        name, cfg = model, model_config(model)
    elif model.endswith(".json") or os.path.isfile(model):
        name = os.path.basename(model)
        try:
            with open(model) as f:
                fields = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"--model {model}: cannot read the JSON config: {exc}") from exc
        if not isinstance(fields, dict):
            raise TrainError(f"--model {model}: expected a JSON object of CrossViTConfig fields")
        try:
            cfg = CrossViTConfig(**fields)
        except TypeError as exc:  # unknown field names
            raise TrainError(f"--model {model}: {exc}") from exc
    else:
        raise TrainError(
            f"--model {model!r}: expected a registered name ({', '.join(list_models())}) or a "
            "JSON config file"
        )
    overrides = {"num_classes": num_classes}
    if drop_path is not None:
        overrides["drop_path_rate"] = drop_path
    return name, cfg.replace(**overrides)


def main(argv: list[str] | None = None) -> int:
    """Run `train` with these arguments; 0 on success, 2 on a usage / checkpoint / data error."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    from .state import CheckpointError
    from .trainer import run

    try:
        run(args)
    except (TrainError, CheckpointError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 2
    return 0
