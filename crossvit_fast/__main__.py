"""Command line: `python -m crossvit_fast {info,check,train,eval,predict,export}`.

* `info`  — versions, devices, and each backend with why it is or is not available.
* `check` — every available backend against the reference on a small model on this machine,
  forward and backward, as a table of max errors and times.
* `train` — the training run (`crossvit_fast.train`); `eval`, `predict`, `export` — use its
  checkpoints (`crossvit_fast.train.infer`).
* `cost`  — estimated launches, DRAM bytes, FLOPs and GPU time of a step (`crossvit_fast.cost`).
* `plot`  — the speed-up chart of a `benchmarks/bench_model.py` JSON (`crossvit_fast.plot`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from . import __version__, backends
from .config import CrossViTConfig
from .model import CrossViT


def _versions() -> list[tuple[str, str]]:
    rows = [
        ("crossvit_fast", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    for name, value in _versions():
        print(f"{name:14s} {value}")
    from .ops.cuda.build import prebuilt_state  # no torch.utils.cpp_extension import, no build

    print(f"{'CUDA extension':14s} {prebuilt_state()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"{'device ' + str(i):14s} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
            )
    else:
        print(f"{'devices':14s} cpu only (no CUDA GPU visible to torch)")
    print("\nbackends (for this machine's best device):")
    for name, (ok, why) in backends.available_backends().items():
        print(f"  {name:10s} {'available' if ok else 'unavailable':12s} {why}")
    dt = "cuda" if torch.cuda.is_available() else "cpu"
    ops = backends.resolve("auto", dt)
    print(
        f"\nbackend='auto' on {dt}: " + ", ".join(f"{op}={src}" for op, src in ops.sources.items())
    )
    return 0


# A small CrossViT that exercises every op (both branches, fusion, heads) in well under a second.
_CHECK_CONFIG = CrossViTConfig(
    img_size=(48, 32),
    patch_size=(12, 16),
    embed_dim=(32, 64),
    depth=((1, 2, 0), (1, 1, 0)),
    num_heads=(2, 4),
    mlp_ratio=(2.0, 3.0),
    num_classes=10,
)


def _run_backend(model: CrossViT, x: torch.Tensor, device: str) -> tuple[torch.Tensor, dict, float]:
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(x)
    out.square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return out.detach(), grads, dt


def cmd_check(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("check: error: --device cuda: no CUDA GPU is visible to torch", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    ref = CrossViT(_CHECK_CONFIG, backend="reference").to(device).train()
    x = torch.randn(args.batch, 3, 48, 48, device=device)
    ref64 = CrossViT(_CHECK_CONFIG, backend="reference").to(device, torch.float64).train()
    ref64.load_state_dict(ref.state_dict())
    out64, grads64, _ = _run_backend(ref64, x.double(), device)
    print(
        f"check on {device}: {_CHECK_CONFIG.embed_dim} widths, batch {args.batch}, fp32, "
        "forward + backward vs the float64 reference"
    )
    print(
        f"{'backend':10s} {'ops served':>10s} {'max |d out|':>12s} {'max |d grad|':>13s} {'time (ms)':>10s}"
    )
    failures = 0
    for name in backends.BACKENDS:
        ok, why = backends.backend_availability(name, device)
        if not ok:
            print(f"{name:10s} skipped: {why}")
            continue
        model = CrossViT(_CHECK_CONFIG, backend=name).to(device).train()
        model.load_state_dict(ref.state_dict())
        try:
            _run_backend(model, x, device)  # warm-up: compile / autotune
            out, grads, dt = _run_backend(model, x, device)
        except Exception as exc:  # report every backend, then fail
            print(f"{name:10s} FAILED: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        own = sum(s == name for s in model.opset(device).sources.values())
        e_out = (out.double() - out64).abs().max().item()
        e_grad = max(
            (
                (g.double() - grads64[k]).abs().max().item()
                / max(grads64[k].abs().max().item(), 1e-6)
            )
            for k, g in grads.items()
            if g is not None
        )
        bad = not (e_out < 1e-3 and e_grad < 1e-2)
        failures += bad
        print(
            f"{name:10s} {own:>4d}/{len(backends.OPS):<5d} {e_out:12.2e} {e_grad:13.2e} {dt * 1e3:10.1f}"
            + ("  <- too large" if bad else "")
        )
    print("(grad errors are relative to each tensor's largest float64 gradient)")
    return 1 if failures else 0


# Commands that own their argument parsers (crossvit_fast.train).
_TRAIN_COMMANDS = {
    "train": "train a CrossViT (see `train --help`)",
    "eval": "loss, top-1 and top-5 of a train checkpoint (see `eval --help`)",
    "predict": "classes of image files from a train checkpoint (see `predict --help`)",
    "export": "a train checkpoint -> model.safetensors + config.json + classes.json",
}


def cmd_train(name: str, args: list[str]) -> int:
    try:
        from .train import command
    except ImportError as exc:
        print(f"{name} is not available: {exc}", file=sys.stderr)
        return 2
    return command(name, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _TRAIN_COMMANDS:
        return cmd_train(argv[0], argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m crossvit_fast",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and backends")
    p = sub.add_parser("check", help="every available backend vs the reference, fwd + bwd")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=2)
    for name, what in _TRAIN_COMMANDS.items():
        sub.add_parser(name, help=what)
    from . import cost  # the cost ledger: estimates without a GPU

    cost.add_arguments(sub.add_parser("cost", help="estimated launches / bytes / time of a step"))
    from . import plot  # matplotlib is imported only when plotting

    p = sub.add_parser("plot", help="speed-up chart of a bench_model.py --benchmark-json file")
    p.add_argument("results")
    p.add_argument("out")
    args = parser.parse_args(argv)
    commands = {"info": cmd_info, "check": cmd_check, "cost": cost.main, "plot": plot.main}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
