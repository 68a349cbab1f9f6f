"""Batch-level augmentation of DeiT / CrossViT: mixup and cutmix (timm's `Mixup`, "batch" mode:
each batch is mixed with itself reversed, one lambda per batch; with both enabled each batch uses
one of the two, with probability 1/2), with label smoothing folded into the soft targets."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Mix", "soft_cross_entropy"]


@dataclass(frozen=True)
class Mix:
    """mixup / cutmix: Beta(alpha, alpha) concentrations (0: off); DeiT uses 0.8 and 1.0."""

    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def targets(self, y: Tensor, num_classes: int) -> Tensor:
        off = self.label_smoothing / num_classes
        t = torch.full((y.shape[0], num_classes), off, device=y.device)
        return t.scatter_(1, y.view(-1, 1), 1.0 - self.label_smoothing + off)

    def __call__(self, x: Tensor, y: Tensor, num_classes: int, rng: random.Random):
        """(mixed images (B, C, H, W) float, soft targets (B, num_classes)); `rng` draws the
        per-batch choices (seeded per step by the caller, so a resumed run mixes alike)."""
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = rng.betavariate(alpha, alpha)
        t = self.targets(y, num_classes)
        if x.shape[0] == 0:
            return x, t
        rev = x.flip(0)
        if use_cutmix:  # timm's rand_bbox, then lambda corrected to the clipped box's area
            h, w = x.shape[-2:]
            ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = rng.randrange(h), rng.randrange(w)
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = rev[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = x * lam + rev * (1.0 - lam)
        return x, t * lam + t.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)) (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
