"""What a run reports, and where (rank 0 only):

* human lines (header, one line per epoch, warnings, the resume command) on **stdout**; the
  progress bar and errors on stderr;
* `OUT/metrics.jsonl`: one JSON object per epoch (`"event": "epoch"`), at the end (`"end"`) and
  when stopped by a signal (`"stopped"`): step, epoch, train_loss, val_loss, top1, top5,
  img_per_s, lr (and ema_* with --ema);
* TensorBoard scalars in OUT when `tensorboard` imports (the optional `tensorboard` extra).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

__all__ = ["METRICS_NAME", "RunLog", "read_metrics"]

METRICS_NAME = "metrics.jsonl"


def _summary_writer(log_dir: str):
    """torch's SummaryWriter, or None without tensorboard (torch.utils.tensorboard imports it)."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # an incompatible tensorboard build
        return None
    return SummaryWriter(log_dir=log_dir)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLog:
    def __init__(self, out: str, is_main: bool):
        self.out, self.is_main = out, is_main
        self.path = os.path.join(out, METRICS_NAME)
        self._bar = None
        self._tb = None
        self._tb_tried = False

    def attach_bar(self, bar) -> None:
        """Lines are then written above the progress bar (tqdm.write)."""
        self._bar = bar

    def line(self, msg: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.line(f"train: warning: {msg}")

    def truncate(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resume starts from)."""
        if not (self.is_main and os.path.isfile(self.path)):
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def record(self, entry: dict) -> None:
        """Append one line to metrics.jsonl, and its numbers to TensorBoard."""
        if not self.is_main:
            return
        os.makedirs(self.out, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        step = entry.get("step", 0)
        self.scalars(
            step, {f"epoch/{k}": v for k, v in entry.items() if k not in ("step", "epoch")}
        )

    def scalars(self, step: int, values: dict) -> None:
        if not self.is_main:
            return
        if not self._tb_tried:
            self._tb_tried = True
            self._tb = _summary_writer(self.out)
        if self._tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
