"""Image data for `python -m crossvit_fast train`: the built-in digits set and ImageFolder trees.

Both sources yield `(uint8 image (C, h, w), int label)` samples; `Preprocess` turns a batch of
them into the model's float input on the training device (resize, channels, normalisation), so the
expensive per-pixel work runs batched on the GPU and workers only decode files.

* `load_digits()` — scikit-learn's bundled handwritten digits (1,797 8x8 greyscale images, 10
  classes; shipped inside the scikit-learn wheel, so it works offline) with a fixed held-out
  validation split. Kept at 8x8 in memory; `Preprocess` upsamples each batch to the model's size.
* `load_image_folder(root, size)` — the torchvision ImageFolder layout (`root/<class>/<image>`, or
  `root/train/<class>/...` + `root/val/<class>/...`), decoded with Pillow and resized to `size`.

Data order is a pure function of (seed, epoch) (`epoch_batches`), not of an RNG state, so that a
resumed run sees exactly the batches an uninterrupted one would, for any number of processes.
Pillow and scikit-learn are imported lazily: `import crossvit_fast` never needs them.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ImageFolder",
    "Preprocess",
    "TensorImages",
    "epoch_batches",
    "eval_batches",
    "iterate",
    "load_digits",
    "load_image_folder",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise ImportError(
            f"{package} is needed for training data; install it with "
            f"pip install 'crossvit_fast[train]' (or pip install {package})"
        ) from exc


@dataclass
class TensorImages:
    """An in-memory split: images (N, C, h, w) uint8 and labels (N,) int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        return self.images[i], self.labels[i]


@dataclass
class Dataset:
    """A train / val pair with what the model needs to know about it."""

    name: str
    train: TensorImages | ImageFolder
    val: TensorImages | ImageFolder
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split(n: int, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed (train, val) index split: the same for every run, independent of --seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _digits_tensors() -> tuple[Tensor, Tensor]:
    """(images (1797, 8, 8) float 0..16, labels (1797,)) from scikit-learn's bundled file.

    The file (`sklearn/datasets/data/digits.csv.gz`: 64 pixels then the label per row) is read
    directly when it is where scikit-learn keeps it, because importing scikit-learn (and SciPy)
    costs seconds per process, which every torchrun worker would pay; otherwise through
    `sklearn.datasets.load_digits()`."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as f:
                rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
            t = torch.tensor(rows)
            if t.shape == (1797, 65):
                return t[:, :64].view(-1, 8, 8), t[:, 64].long()
    datasets = _need("sklearn.datasets", "scikit-learn")
    d = datasets.load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32), torch.as_tensor(d.target).long()


def load_digits(val_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits: 1,797 8x8 greyscale images of 0-9 (pixel values 0..16), stored as
    uint8 (scaled to 0..255); 20% held out for validation by default (1,438 / 359)."""
    images, labels = _digits_tensors()
    images = (images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    tr, va = _split(len(labels), val_fraction)
    train, val = TensorImages(images[tr], labels[tr]), TensorImages(images[va], labels[va])
    # Normalise with the training split's own statistics (0..1 scale), one grey channel.
    x = train.images.float() / 255.0
    return Dataset(
        "digits", train, val, [str(i) for i in range(10)], (x.mean().item(),), (x.std().item(),)
    )


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` read with Pillow, resized (bicubic) to `size` = (H, W).

    Returns (uint8 (C, H, W), class index); C is 3 (RGB) or 1 (`grey=True`). Classes are the
    sorted sub-directory names; images are the files with an image extension, in sorted order.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: tuple[int, int],
        grey: bool = False,
        classes: list[str] | None = None,
        samples: list[tuple[str, int]] | None = None,
    ):
        self.root, self.size, self.grey = os.fspath(root), tuple(size), grey
        self.classes = classes if classes is not None else _find_classes(self.root)
        self.samples = samples if samples is not None else _find_samples(self.root, self.classes)
        self.labels = torch.tensor([c for _, c in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.grey else 3, *self.size)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = _need("PIL.Image", "Pillow")
        path, label = self.samples[i]
        with image.open(path) as im:
            im = im.convert("L" if self.grey else "RGB")
            im = im.resize((self.size[1], self.size[0]), image.Resampling.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        c, h, w = self.shape
        return data.view(h, w, c).permute(2, 0, 1).contiguous(), label

    def subset(self, idx: Tensor) -> ImageFolder:
        return ImageFolder(
            self.root, self.size, self.grey, self.classes, [self.samples[i] for i in idx.tolist()]
        )

    def collate(self, samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
        # Our own collate so that an empty batch (see `eval_batches`) still has the image shape.
        if not samples:
            return torch.empty(0, *self.shape, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def _find_classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"--data {root}: expected one sub-directory per class (ImageFolder layout "
            "root/<class>/<image>), found none"
        )
    return classes


def _find_samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    samples = []
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            raise ValueError(f"--data {root}: class {name!r} has no directory {d}")
        for dirpath, _, files in sorted(os.walk(d, followlinks=True)):
            samples += [
                (os.path.join(dirpath, f), c)
                for f in sorted(files)
                if f.lower().endswith(IMG_EXTENSIONS)
            ]
    if not samples:
        raise ValueError(f"--data {root}: no images ({', '.join(IMG_EXTENSIONS)}) found")
    return samples


def load_image_folder(
    root: str | os.PathLike, size: tuple[int, int], grey: bool = False, val_fraction: float = 0.1
) -> Dataset:
    """An ImageFolder tree. With `root/train` and `root/val` those are the splits; otherwise
    `root/<class>/...` is split, a fixed `val_fraction` held out for validation."""
    root = os.fspath(root)
    tr_dir, va_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(tr_dir) and os.path.isdir(va_dir):
        train = ImageFolder(tr_dir, size, grey)
        val = ImageFolder(va_dir, size, grey, classes=train.classes)
    else:
        full = ImageFolder(root, size, grey)
        tr, va = _split(len(full), val_fraction)
        train, val = full.subset(tr), full.subset(va)
    mean, std = ((0.5,), (0.5,)) if grey else (IMAGENET_MEAN, IMAGENET_STD)
    return Dataset(os.path.basename(os.path.normpath(root)), train, val, train.classes, mean, std)


# -- batch plans -----------------------------------------------------------------------------------


def epoch_batches(
    n: int, batch_size: int, world_size: int, rank: int, epoch: int, seed: int
) -> list[list[int]]:
    """This rank's training batches of one epoch: global batch k is items [k*B*W, (k+1)*B*W) of a
    permutation seeded by (seed, epoch), and rank r takes its r-th slice of B. So global batch k
    is the same for any (per-process batch B, world size W) with the same B*W, and a run resumed
    at step s sees exactly the batches an uninterrupted run would. Incomplete batches are dropped
    (every step has the same size, as DDP gradient averaging assumes)."""
    g = batch_size * world_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return [
        perm[k * g + rank * batch_size : k * g + (rank + 1) * batch_size].tolist()
        for k in range(n // g)
    ]


def eval_batches(n: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's evaluation batches: every item exactly once over all ranks, in order, and the
    SAME number of batches on every rank (some may be short or empty), because an FSDP forward
    is a collective that every rank must join."""
    g = batch_size * world_size
    return [
        list(range(min(n, k + rank * batch_size), min(n, k + (rank + 1) * batch_size)))
        for k in range(0, n, g)
    ]


def iterate(
    data: TensorImages | ImageFolder, batches: list[list[int]], workers: int = 0, pin: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images, labels) per batch of indices. In-memory data is indexed directly; files go
    through a DataLoader (`workers` processes decoding ahead)."""
    if isinstance(data, TensorImages):
        for b in batches:
            yield data.batch(b)
        return
    yield from torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=data.collate,
        pin_memory=pin,
        persistent_workers=False,
    )


class Preprocess:
    """uint8 (B, c, h, w) -> the model's float32 input (B, in_chans, H, W) on `device`:
    scale to [0, 1], resize (bilinear, when (h, w) != (H, W)), grey -> in_chans copies,
    normalise with the dataset's mean / std; optional random horizontal flip for training."""

    def __init__(
        self,
        size: tuple[int, int],
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        hflip: float = 0.0,
    ):
        self.size, self.in_chans, self.device, self.hflip = tuple(size), in_chans, device, hflip
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        c = x.shape[1]
        if c != self.in_chans and c != 1:
            raise ValueError(
                f"the data has {c} channels but the model expects in_chans={self.in_chans}"
            )
        x = (x - self.mean) / self.std
        if tuple(x.shape[-2:]) != self.size and x.shape[0] > 0:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if c != self.in_chans:  # grey data, colour model
            x = x.expand(-1, self.in_chans, -1, -1).contiguous()
        if self.hflip > 0 and generator is not None and x.shape[0] > 0:
            # The flip draws come from a generator seeded per step (not the global RNG), so that
            # augmentation is reproducible across resumes and independent of the model's RNG use.
            flip = torch.rand(x.shape[0], generator=generator) < self.hflip
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x
