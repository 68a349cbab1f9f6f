"""The errors a run reports without a traceback (exit status 2): `TrainError` and its kinds."""

from __future__ import annotations

__all__ = ["BadImageError", "TrainError"]


class TrainError(Exception):
    """A user-facing problem (bad option, unusable checkpoint or data): one line on stderr, exit
    status 2. Under torchrun every rank raises the same one and only rank 0 prints it."""


class BadImageError(TrainError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"bad image {path}: {reason} (pass --skip-bad-images to skip such files)")
        self.path, self.reason = path, reason
