"""Image data for `python -m crossvit_fast train`: the built-in digits set and ImageFolder trees.

Both sources yield `(uint8 image (C, h, w), int label)` samples; `Preprocess` turns a batch of
them into the model's float input on the training device (resize, channels, normalisation), so
the per-pixel arithmetic runs batched on the GPU and workers only decode, crop and resize.

* `load_digits()` — scikit-learn's bundled handwritten digits (1,797 8x8 greyscale images, 10
  classes; shipped inside the scikit-learn wheel, so it works offline) with a fixed held-out
  validation split. Kept at 8x8 in memory; `Preprocess` upsamples each batch to the model's size.
* `load_image_folder(root, size)` — the torchvision ImageFolder layout (`root/<class>/<image>`, or
  `root/train/<class>/...` + `root/val/<class>/...`), decoded with Pillow, then cropped and
  resized to `size` by `transforms` (RandomResizedCrop + flip for training, resize + centre crop
  for evaluation). A file that does not decode is reported by name (`BadImageError`), or skipped.

Data order is a pure function of (seed, epoch) (`epoch_batches`), not of an RNG state, so that a
resumed run sees exactly the batches an uninterrupted one would, for any number of processes.
Pillow and scikit-learn are imported lazily: `import crossvit_fast` never needs them.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import BadImageError, TrainError
from .transforms import eval_transform, resize, train_transform

__all__ = [
    "ImageFolder",
    "Preprocess",
    "TensorImages",
    "decode_image",
    "default_workers",
    "epoch_batches",
    "eval_batches",
    "find_classes",
    "find_samples",
    "head",
    "image_transform",
    "iterate",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "preprocess_info",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def default_workers() -> int:
    """--workers default: min(4, the CPUs this process may use / the processes on this node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(0, min(4, cpus // max(local, 1)))


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


def decode_image(path: str, grey: bool = False) -> Tensor:
    """uint8 (C, H, W) pixels of an image file (C = 1 with `grey`, else 3: RGB). Raises
    BadImageError naming the file when it cannot be decoded (unreadable, truncated, not an
    image): Pillow raises several types for those, so any exception is one."""
    image = _need("PIL.Image", "Pillow")
    try:
        with image.open(path) as im:
            im = im.convert("L" if grey else "RGB")  # decodes: truncation shows up here
            w, h = im.size
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BadImageError(path, f"{type(exc).__name__}: {first}".rstrip(": ")) from exc
    return data.view(h, w, 1 if grey else 3).permute(2, 0, 1).contiguous()


class ImageFolder(torch.utils.data.Dataset):
    """`root/<class>/<image>` decoded with Pillow, then `transform` (uint8 (C, H, W) -> uint8
    (C, *size)); see `transforms`. Classes are the sorted sub-directory names; images are the
    files with an image extension, in sorted order.

    Items are an index, or (index, seed): the transform's random draws are then seeded with
    `seed`, so augmentation is reproducible. `__getitem__` returns (image or None, label, bad),
    bad being the (path, reason) of files that failed to decode; `on_bad` says what then happens:
    "error" (return None: the caller stops the run), "drop" (return None: the caller leaves it out)
    or "replace" (try the following images until one decodes, so that batches keep their size).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: tuple[int, int],
        grey: bool = False,
        classes: list[str] | None = None,
        samples: list[tuple[str, int]] | None = None,
        transform=None,
        on_bad: str = "error",
    ):
        self.root, self.size, self.grey = os.fspath(root), tuple(size), grey
        self.classes = classes if classes is not None else find_classes(self.root)
        self.samples = samples if samples is not None else find_samples(self.root, self.classes)
        self.labels = torch.tensor([c for _, c in self.samples], dtype=torch.long)
        self.transform = transform if transform is not None else eval_transform(self.size, 1.0)
        if on_bad not in ("error", "drop", "replace"):
            raise ValueError(f"on_bad: expected error, drop or replace, got {on_bad!r}")
        self.on_bad = on_bad

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.grey else 3, *self.size)

    def __getitem__(self, item) -> tuple[Tensor | None, int, list[tuple[str, str]]]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        bad = []
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                x = decode_image(path, self.grey)
            except BadImageError as exc:
                bad.append((exc.path, exc.reason))
                if self.on_bad == "replace":
                    continue
                return None, label, bad
            if seed is None:
                return self.transform(x), label, bad
            with torch.random.fork_rng(devices=[]):  # leave the caller's generator alone
                torch.manual_seed(seed)
                return self.transform(x), label, bad
        raise TrainError(f"--data {self.root}: none of its {len(self.samples)} images decodes")

    def subset(self, idx: Tensor, transform=None) -> ImageFolder:
        return ImageFolder(
            self.root,
            self.size,
            self.grey,
            self.classes,
            [self.samples[i] for i in idx.tolist()],
            transform if transform is not None else self.transform,
            self.on_bad,
        )

    def collate(self, samples: list) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
        # Our own collate so that an empty batch (see `eval_batches`) still has the image shape,
        # and so that undecodable files travel back from the workers as data, not exceptions.
        bad = [b for s in samples for b in s[2]]
        good = [s for s in samples if s[0] is not None]
        if not good:
            return (
                torch.empty(0, *self.shape, dtype=torch.uint8),
                torch.empty(0, dtype=torch.long),
                bad,
            )
        return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), bad


def find_classes(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"--data {root}: expected one sub-directory per class (ImageFolder layout "
            "root/<class>/<image>), found none"
        )
    return classes


def find_samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    samples, empty = [], []
    for c, name in enumerate(classes):
        d = os.path.join(root, name)
        if not os.path.isdir(d):
            raise ValueError(f"--data {root}: class {name!r} has no directory {d}")
        found = [
            (os.path.join(dirpath, f), c)
            for dirpath, _, files in sorted(os.walk(d, followlinks=True))
            for f in sorted(files)
            if f.lower().endswith(IMG_EXTENSIONS)
        ]
        if not found:
            empty.append(d)
        samples += found
    if not samples:
        raise ValueError(f"--data {root}: no images ({', '.join(IMG_EXTENSIONS)}) found")
    if empty:
        raise ValueError(
            f"--data {root}: class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): "
            + ", ".join(empty)
        )
    return samples


def load_image_folder(
    root: str | os.PathLike,
    size: tuple[int, int],
    grey: bool = False,
    val_fraction: float = 0.1,
    train_tf=None,
    eval_tf=None,
    on_bad: str = "error",
) -> Dataset:
    """An ImageFolder tree. With `root/train` and `root/val` those are the splits; otherwise
    `root/<class>/...` is split, a fixed `val_fraction` held out for validation. The training
    split uses `train_tf`, validation `eval_tf` (default for both: a plain resize to `size`).
    Undecodable training images are handled as `on_bad` says; in validation, "replace" becomes
    "drop" (a duplicated image would bias the metrics)."""
    root = os.fspath(root)
    val_bad = "drop" if on_bad == "replace" else on_bad
    tr_dir, va_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(tr_dir) and os.path.isdir(va_dir):
        train = ImageFolder(tr_dir, size, grey, transform=train_tf, on_bad=on_bad)
        extra = sorted(set(find_classes(va_dir)) - set(train.classes))
        if extra:
            raise ValueError(f"--data {root}: val has classes that train lacks: {extra}")
        val = ImageFolder(va_dir, size, grey, train.classes, transform=eval_tf, on_bad=val_bad)
    else:
        full = ImageFolder(root, size, grey, transform=train_tf, on_bad=on_bad)
        tr, va = _split(len(full), val_fraction)
        train, val = full.subset(tr), full.subset(va, eval_tf)
        val.on_bad = val_bad
    mean, std = ((0.5,), (0.5,)) if grey else (IMAGENET_MEAN, IMAGENET_STD)
    return Dataset(os.path.basename(os.path.normpath(root)), train, val, train.classes, mean, std)


def head(split: TensorImages | ImageFolder, n: int) -> TensorImages | ImageFolder:
    """The first n images of a split (for quick runs and tests)."""
    n = min(n, len(split))
    if isinstance(split, TensorImages):
        return TensorImages(split.images[:n], split.labels[:n])
    return split.subset(torch.arange(n))


DIGITS_SIZE = (8, 8)


def load_dataset(opts: dict, size: tuple[int, int], grey: bool) -> Dataset:
    """The train / val splits a run's options describe (`train`, and `eval` for a checkpoint's own
    validation split): keys data (None: the digits), val_fraction, train_samples, val_samples,
    hflip, rrc_scale, crop_pct, skip_bad_images; `size` is the model's input size."""
    if opts.get("data") is None:
        ds = load_digits(opts.get("val_fraction") or 0.2)
    else:
        hflip = opts.get("hflip")
        train_tf = train_transform(
            size, (opts.get("rrc_scale") or 0.08, 1.0), hflip=0.5 if hflip is None else hflip
        )
        ds = load_image_folder(
            opts["data"],
            size,
            grey,
            opts.get("val_fraction") or 0.1,
            train_tf,
            eval_transform(size, opts.get("crop_pct") or 0.875),
            "replace" if opts.get("skip_bad_images") else "error",
        )
    if opts.get("train_samples"):
        ds.train = head(ds.train, opts["train_samples"])
    if opts.get("val_samples"):
        ds.val = head(ds.val, opts["val_samples"])
    return ds


def preprocess_info(opts: dict, ds: Dataset, size: tuple[int, int], grey: bool) -> dict:
    """How one image file becomes a model input, stored in checkpoints (for `predict`)."""
    return {
        "kind": "digits" if opts.get("data") is None else "folder",
        "input_size": list(size),
        "grey": grey,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "crop_pct": None if opts.get("data") is None else (opts.get("crop_pct") or 0.875),
    }


def image_transform(pre: dict):
    """decoded uint8 (C, H, W) -> uint8 as the checkpoint's validation images were: digits-sized
    for a digits model (`Preprocess` then upsamples), else resize + centre crop."""
    if pre["kind"] == "digits":
        return lambda x: resize(x, DIGITS_SIZE)
    return eval_transform(tuple(pre["input_size"]), pre["crop_pct"])


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


def _worker_init(_: int) -> None:
    # A scheduler's SIGTERM and a terminal's Ctrl-C reach the whole process group: the workers
    # ignore them and let the main process stop at a step boundary and shut them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def iterate(
    data: TensorImages | ImageFolder,
    batches: list[list[int]],
    workers: int = 0,
    pin: bool = False,
    seed: int | None = None,
) -> Iterator[tuple[Tensor, Tensor, list[tuple[str, str]]]]:
    """(uint8 images, labels, bad files) per batch of indices. In-memory data is indexed directly;
    files go through a DataLoader (`workers` processes decoding ahead); with `seed`, image i's
    random transform is seeded with a function of (seed, i)."""
    if isinstance(data, TensorImages):
        for b in batches:
            yield (*data.batch(b), [])
        return
    if seed is not None:
        batches = [[(i, (seed * 1_000_003 + i) % 2**63) for i in b] for b in batches]
    yield from torch.utils.data.DataLoader(
        data,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=data.collate,
        pin_memory=pin,
        persistent_workers=False,
        worker_init_fn=_worker_init if workers > 0 else None,
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
