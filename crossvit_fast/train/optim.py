"""The CrossViT / DeiT optimisation recipe: AdamW, no weight decay on `no_weight_decay()`
parameters nor on 1-D ones (biases, LayerNorm affines), linear warm-up then cosine decay."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

__all__ = ["EMA", "build_optimizer", "lr_multiplier", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (weights of Linear / Conv) and not decayed (biases, norms, the
    model's `no_weight_decay()` names: CLS tokens and position embeddings), as timm does.

    `model` is the bare CrossViT (its parameter names); under FSDP2 its parameters are DTensors
    whose `ndim` is the full tensor's, so the split is the same."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor for optimizer step `step` (0-based): linear warm-up over `warmup` steps to 1, then
    cosine down to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9 / 0.999, eps 1e-8, as CrossViT) and its warm-up + cosine schedule."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ratio = min(1.0, min_lr / lr) if lr > 0 else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, total_steps, warmup_steps, ratio)
    )
    return opt, sched


class EMA:
    """An exponential moving average of the parameters (timm's ModelEmaV3 with warm-up): after
    optimizer step t, shadow <- d * shadow + (1 - d) * param with d = min(decay, (1 + t) / (10 + t)),
    so that short runs average recent weights rather than the initialisation.

    `params` are the training model's (plain tensors, or FSDP2's sharded DTensors: the shadow
    then holds the same shards and the updates are local). `swapped()` puts the averages into the
    model for evaluation or for gathering a full state dict, and restores the weights after."""

    def __init__(self, params, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay: expected a value in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in params]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - d)

    @torch.no_grad()
    def copy_params(self) -> None:
        """shadow <- the current parameters (used to load a checkpoint's averages)."""
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach())

    @contextlib.contextmanager
    def swapped(self):
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)
