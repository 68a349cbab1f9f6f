"""Using a training checkpoint: `python -m crossvit_fast eval | predict | export`.

* `eval CHECKPOINT [--data DIR]` — loss, top-1 and top-5 on the checkpoint's own validation split
  (rebuilt from its stored options), or on DIR (DIR/val when it exists, else every image of DIR;
  its class folders must be among the checkpoint's classes);
* `predict CHECKPOINT IMAGE... [--topk K] [--out FILE.csv]` — the top K classes of each image, by
  name, preprocessed as the checkpoint's validation images were;
* `export CHECKPOINT OUTDIR` — `model.safetensors` (the weights), `config.json` (CrossViTConfig
  fields: `CrossViTConfig(**json.load(f))`, or `train --model OUTDIR/config.json`) and
  `classes.json` (the class names, in output order). `crossvit_fast.load_checkpoint` reads the
  weights back.

With --ema runs, the EMA weights are used by default (`--weights model` for the trained ones).
Exit status: 0, or 2 with one line on stderr (unreadable checkpoint or image, bad options).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import torch

from ..config import CrossViTConfig
from ..model import CrossViT
from . import data as data_mod
from . import state as state_mod
from .errors import TrainError

__all__ = ["COMMANDS", "main"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a `train` checkpoint (checkpoint.pt)")
    p.add_argument(
        "--weights",
        choices=("auto", "model", "ema"),
        default="auto",
        help="which weights (default: auto = the EMA ones when the run kept them)",
    )


def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="(default: auto = cuda when a GPU is visible, else cpu)",
    )
    p.add_argument("--backend", default="auto", help="kernels (default: auto)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")


def build_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m crossvit_fast {command}")
    _common(p)
    if command == "eval":
        p.description = "Loss, top-1 and top-5 accuracy of a checkpoint."
        p.add_argument(
            "--data",
            default=None,
            help="an ImageFolder directory (DIR/val if present, else all of DIR); default: the "
            "checkpoint's own validation split",
        )
        p.add_argument(
            "--workers", type=int, default=None, help="decoding processes (default: as train)"
        )
        p.add_argument("--metrics-json", default=None, help="also write the metrics here")
        _runtime(p)
    elif command == "predict":
        p.description = "The most likely classes of each image."
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        p.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
        p.add_argument(
            "--out", default=None, help="also write a CSV: image,rank,class,index,probability"
        )
        _runtime(p)
    else:
        p.description = "Write model.safetensors, config.json and classes.json."
        p.add_argument("outdir", metavar="OUTDIR", help="directory to write (created)")
    return p


def _load(args) -> tuple[dict, CrossViTConfig, dict, list[str]]:
    st = state_mod.load(args.checkpoint)
    cfg = CrossViTConfig(**st["config"])
    which = args.weights
    if which == "auto":
        which = "ema" if st.get("ema") else "model"
    if which == "ema" and not st.get("ema"):
        raise TrainError(f"{args.checkpoint}: this run kept no EMA weights (train --ema)")
    classes = st.get("classes") or [str(i) for i in range(cfg.num_classes)]
    return st, cfg, st[which], classes


def _model(args, cfg: CrossViTConfig, weights: dict) -> tuple[CrossViT, torch.device]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA GPU is visible to torch")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    try:
        model = CrossViT(cfg, backend=args.backend)
    except (RuntimeError, ValueError) as exc:
        raise TrainError(str(exc)) from exc
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), device


def _prep(st: dict, cfg: CrossViTConfig, device) -> data_mod.Preprocess:
    pre = st["preprocess"]
    return data_mod.Preprocess(
        tuple(pre["input_size"]), cfg.in_chans, tuple(pre["mean"]), tuple(pre["std"]), device
    )


def _eval_split(args, st: dict, classes: list[str]):
    pre = st["preprocess"]
    size, grey = tuple(pre["input_size"]), pre["grey"]
    if args.data is None:
        opts = st["options"]
        return data_mod.load_dataset(opts, size, grey).val, opts.get("data") or "digits (val)"
    root = (
        os.path.join(args.data, "val")
        if os.path.isdir(os.path.join(args.data, "val"))
        else args.data
    )
    found = data_mod.find_classes(root)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise TrainError(f"--data {root}: classes the checkpoint does not know: {unknown}")
    samples = [(p, classes.index(found[c])) for p, c in data_mod.find_samples(root, found)]
    tf = data_mod.image_transform(pre)
    return data_mod.ImageFolder(root, size, grey, classes, samples, tf), root


def cmd_eval(args) -> int:
    from .meters import eval_metrics, evaluate

    st, cfg, weights, classes = _load(args)
    model, device = _model(args, cfg, weights)
    split, where = _eval_split(args, st, classes)
    workers = args.workers if args.workers is not None else data_mod.default_workers()
    if isinstance(split, data_mod.TensorImages):
        workers = 0
    batches = data_mod.eval_batches(len(split), args.batch_size, 1, 0)
    sums, bad = evaluate(
        model, data_mod.iterate(split, batches, workers), _prep(st, cfg, device), device
    )
    if bad:
        from .errors import BadImageError

        raise BadImageError(*bad[0])
    m = {**eval_metrics(sums), "images": len(split), "data": where}
    print(
        f"eval: {args.checkpoint} on {where} ({m['images']} images): top-1 {m['top1']:.4f}  "
        f"top-5 {m['top5']:.4f}  loss {m['loss']:.4f}"
    )
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(m, f, indent=2)
    return 0


@torch.no_grad()
def cmd_predict(args) -> int:
    if args.topk < 1:
        raise TrainError(f"--topk: expected >= 1, got {args.topk}")
    st, cfg, weights, classes = _load(args)
    model, device = _model(args, cfg, weights)
    prep, tf = _prep(st, cfg, device), data_mod.image_transform(st["preprocess"])
    grey = st["preprocess"]["grey"]
    k = min(args.topk, len(classes))
    rows = []
    for i in range(0, len(args.images), args.batch_size):
        paths = args.images[i : i + args.batch_size]
        x = torch.stack([tf(data_mod.decode_image(p, grey)) for p in paths])
        probs = model(prep(x)).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for p, vals, idx in zip(paths, top.values.tolist(), top.indices.tolist()):
            print(f"{p}: " + ", ".join(f"{classes[j]} {v:.3f}" for v, j in zip(vals, idx)))
            rows += [
                (p, r + 1, classes[j], j, f"{v:.6f}") for r, (v, j) in enumerate(zip(vals, idx))
            ]
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "rank", "class", "index", "probability"])
            w.writerows(rows)
    return 0


def cmd_export(args) -> int:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise TrainError(
            "export needs the safetensors package (a crossvit_fast dependency): pip install "
            "safetensors"
        ) from exc
    _, cfg, weights, classes = _load(args)
    os.makedirs(args.outdir, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in weights.items()}
    save_file(tensors, os.path.join(args.outdir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(args.outdir, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    with open(os.path.join(args.outdir, "classes.json"), "w") as f:
        json.dump(classes, f, indent=2)
    print(
        f"export: {args.checkpoint} -> {args.outdir}/model.safetensors, config.json, "
        f"classes.json ({len(classes)} classes)"
    )
    return 0


COMMANDS = {"eval": cmd_eval, "predict": cmd_predict, "export": cmd_export}


def main(command: str, argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    try:
        return COMMANDS[command](args)
    except (TrainError, ValueError, FileNotFoundError, ImportError) as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
