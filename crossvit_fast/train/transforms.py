"""Per-image transforms on decoded uint8 (C, H, W) tensors, as timm builds them for CrossViT:

* training: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bicubic) + horizontal flip;
* evaluation: resize to `size / crop_pct` (bicubic, shorter side for a square size) + centre crop
  (crop_pct 0.875: 240 -> resize 274 -> crop 240).

torchvision's v2 transforms are used when torchvision imports; otherwise the plain-tensor path
below (the same algorithms, `F.interpolate(mode="bicubic", antialias=True)`), which is what
CPU-only installs without torchvision run. Randomness comes from the global torch generator: the
data set seeds it per sample (`ImageFolder.__getitem__`), so augmentation is a function of (seed,
epoch, position) and a resumed run sees the same crops.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["eval_resize_size", "eval_transform", "resize", "torchvision_v2", "train_transform"]

Transform = Callable[[Tensor], Tensor]


def torchvision_v2():
    """torchvision.transforms.v2, or None when torchvision is missing or does not import (e.g. a
    PyPI torchvision built for another torch)."""
    try:
        from torchvision.transforms import v2
    except Exception:  # ImportError, or the RuntimeError / OSError of a mismatched build
        return None
    return v2


def eval_resize_size(size: tuple[int, int], crop_pct: float) -> int | tuple[int, int]:
    """timm's `transforms_factory`: floor(size / crop_pct); an int (resize the shorter side) for
    a square size."""
    h, w = (math.floor(s / crop_pct) for s in size)
    return h if size[0] == size[1] else (h, w)


# -- the plain-tensor path -----------------------------------------------------------------------


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 (C, H, W) -> (C, *size), bicubic with antialiasing (as PIL / torchvision)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0]


def _resize_shorter(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    if isinstance(size, int):
        h, w = x.shape[-2:]
        size = (
            (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
        )
    return resize(x, size)


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    h, w = x.shape[-2:]
    if h < size[0] or w < size[1]:  # as torchvision: pad, then crop
        ph, pw = max(0, size[0] - h), max(0, size[1] - w)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = round((h - size[0]) / 2), round((w - size[1]) / 2)
    return x[..., top : top + size[0], left : left + size[1]]


def _rrc_box(h: int, w: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
    area = h * w
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,)).item())
            left = int(torch.randint(0, w - cw + 1, (1,)).item())
            return top, left, ch, cw
    in_ratio = w / h  # fallback: the centre crop of the whole image, ratio clamped
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _plain_train(size, scale, ratio, hflip) -> Transform:
    def tf(x: Tensor) -> Tensor:
        top, left, ch, cw = _rrc_box(x.shape[-2], x.shape[-1], scale, ratio)
        x = resize(x[..., top : top + ch, left : left + cw], size)
        if hflip > 0 and torch.rand(1).item() < hflip:
            x = x.flip(-1)
        return x.contiguous()

    return tf


def _plain_eval(size, crop_pct) -> Transform:
    scale_size = eval_resize_size(size, crop_pct)
    return lambda x: _center_crop(_resize_shorter(x, scale_size), size).contiguous()


# -- builders ------------------------------------------------------------------------------------


def train_transform(
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    use_torchvision: bool = True,
) -> Transform:
    """RandomResizedCrop to `size` (bicubic) + horizontal flip with probability `hflip`."""
    size = tuple(size)
    v2 = torchvision_v2() if use_torchvision else None
    if v2 is None:
        return _plain_train(size, scale, ratio, hflip)
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                size, scale, ratio, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(hflip),
        ]
    )


def eval_transform(
    size: tuple[int, int], crop_pct: float = 0.875, use_torchvision: bool = True
) -> Transform:
    """Resize to floor(size / crop_pct) (bicubic) + centre crop to `size`; crop_pct 1: resize
    only."""
    size = tuple(size)
    v2 = torchvision_v2() if use_torchvision else None
    if v2 is None:
        return _plain_eval(size, crop_pct)
    return v2.Compose(
        [
            v2.Resize(
                eval_resize_size(size, crop_pct),
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.CenterCrop(size),
        ]
    )
