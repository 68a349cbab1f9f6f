"""What a training run measures, apart from the run itself: the autocast policy, evaluation
sums, running training sums on the device (no host sync per step) and the throughput clock."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

__all__ = [
    "Clock",
    "Meter",
    "Rate",
    "amp_dtype",
    "autocast",
    "eval_metrics",
    "evaluate",
    "input_size",
]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def input_size(cfg) -> tuple[int, int]:
    """The image size fed to the model: the largest branch size (timm's 240 for the *_240
    variants); each branch resizes from it."""
    return (max(h for h, _ in cfg.img_size), max(w for _, w in cfg.img_size))


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(net, batches, prep, device, amp_dtype=None) -> tuple[torch.Tensor, list]:
    """Sums over `batches` ((uint8 images, labels, bad files) as `data.iterate` yields them):
    (float64 [loss * n, top-1 hits, top-5 hits, n] on `device`, the bad files met)."""
    was_training = net.training
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    bad = []
    for xb, yb, b in batches:
        bad += b
        x, y = prep(xb), yb.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = net(x).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(-1).sum()
        sums[3] += y.numel()
    net.train(was_training)
    return sums, bad


def eval_metrics(sums: torch.Tensor) -> dict:
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1)
    return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n}


class Meter:
    """Running training sums on the device (no host sync per step); read at log points."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor):
        # In-place adds with a Python count: no host -> device copy per step.
        n = y.numel()
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += (logits.detach().argmax(-1) == y).sum()
        self.sums[2] += n


class Rate:
    """Training time and steps."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def img_per_s(self, global_batch: int) -> float | None:
        return self.steps * global_batch / self.seconds if self.steps and self.seconds > 0 else None


class Clock:
    """Throughput: wall time from the end of a run's first step (compilation, warm-up) on, with
    evaluation and checkpoint pauses left out; synced on GPUs at each pause. Accumulates into
    the whole run, the current epoch and the current progress-bar window."""

    def __init__(self, sync):
        self.sync = sync
        self.run, self.epoch, self.window = Rate(), Rate(), Rate()
        self._t, self._pending, self._started = None, 0, False

    def start(self) -> None:
        self.sync()
        self._t, self._pending, self._started = time.perf_counter(), 0, True

    def step(self) -> None:
        if self._t is not None:
            self._pending += 1

    def pause(self) -> None:
        if self._t is None:
            return
        self.sync()
        dt = time.perf_counter() - self._t
        for r in (self.run, self.epoch, self.window):
            r.seconds += dt
            r.steps += self._pending
        self._t, self._pending = None, 0

    def resume(self) -> None:
        if self._started and self._t is None:
            self._t = time.perf_counter()
