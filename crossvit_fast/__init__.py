"""crossvit_fast: a fast, drop-in CrossViT (timm-compatible) with fused Triton / CUDA kernels.

    >>> import crossvit_fast
    >>> model = crossvit_fast.create_model("crossvit_tiny_240", backend="auto")
    >>> # timm's published weights (needs the `hub` extra): create_model(name, pretrained=True)
    >>> crossvit_fast.available_backends()["reference"][0]
    True

Importing this package never imports Triton or loads a compiled extension; backends load lazily
when a model first runs on a device.
"""

from .backends import BACKENDS, OPS, available_backends
from .checkpoint import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    from_timm,
    load_checkpoint,
    read_checkpoint,
)
from .config import CrossViTConfig
from .model import CrossViT
from .registry import create_model, list_models, model_config

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CHECKPOINT_SUFFIXES",
    "OPS",
    "CheckpointError",
    "CrossViT",
    "CrossViTConfig",
    "available_backends",
    "create_model",
    "from_timm",
    "list_models",
    "load_checkpoint",
    "model_config",
    "read_checkpoint",
]
