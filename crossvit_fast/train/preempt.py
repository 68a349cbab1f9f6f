"""Stopping a run cleanly: SIGINT / SIGTERM end it at the next step boundary, on every rank.

A cluster scheduler sends SIGTERM before it kills a job (torchrun forwards it to every worker;
SLURM signals every process), a terminal sends SIGINT on Ctrl-C. While `SignalStop` is active
either only records the signal; the training loop asks `Agreement.agree` before each step, and
every rank stops after the same step (the largest signal number any rank received wins), writes
the checkpoint together and exits with status 128 + signal (130 for SIGINT, 143 for SIGTERM, the
shell's convention). A second Ctrl-C aborts at once (KeyboardInterrupt).

`Agreement` is also how ranks agree on a time-based checkpoint (rank 0's clock) and on undecodable
images (each rank reads other files): one all-reduce of three integers per step over gloo (a
separate gloo group when the main one is NCCL, so that it never waits for the GPU), plus an
all-gather of file names only when some rank met a bad file.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Agreement", "SignalStop", "Stopped", "exit_status"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Stopped(Exception):
    """The run stopped at a step boundary on a signal, after writing its checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: str, out: str):
        self.signum, self.step, self.checkpoint, self.out = int(signum), step, checkpoint, out
        super().__init__(f"stopped by {signal.Signals(self.signum).name} at step {step}")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class SignalStop:
    """While active (a context manager), SIGINT and SIGTERM set `signum` instead of ending the
    process; a second SIGINT raises KeyboardInterrupt. Handlers can only be installed from the main
    thread; elsewhere the signals keep their usual effect."""

    def __init__(self):
        self.signum = 0
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        # No printing here: the handler runs between two bytecodes of the main thread, possibly
        # inside a write to the same stream. The loop reports the stop at the boundary.
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = max(self.signum, int(signum))

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


@dataclass
class Verdict:
    stop: int = 0  # the signal to stop on (0: go on)
    save: bool = False
    bad: list = field(default_factory=list)  # (path, reason) of every rank's undecodable files


class Agreement:
    """What every rank must decide together at a step boundary (see the module docstring)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = None
        if world_size > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank, same point

    def agree(self, stop: int, save: bool, bad: list) -> Verdict:
        if self.world_size == 1:
            return Verdict(stop, save, list(bad))
        flags = torch.tensor([stop, int(save), int(bool(bad))], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        everyone: list = []
        if flags[2]:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, list(bad), group=self.group)
            everyone = [b for g in gathered for b in g]
        return Verdict(int(flags[0]), bool(flags[1]), everyone)

    def gather_bad(self, bad: list) -> list:
        """Every rank's (path, reason) list, concatenated (after an evaluation)."""
        return self.agree(0, False, bad).bad
