"""Loading weights: timm / IBM checkpoints (.pth, .pt, .safetensors) and live timm models."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from torch import Tensor

from .config import CrossViTConfig
from .model import CrossViT

__all__ = ["from_timm", "load_checkpoint", "read_safetensors"]

# safetensors dtype tags -> torch dtypes (the format: 8-byte little-endian header length, a JSON
# header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes). Read here so
# that the package needs no extra dependency.
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a .safetensors file into CPU tensors (no code execution, no dependency)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {len(raw)})")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        t = (
            torch.frombuffer(bytearray(data[start:end]), dtype=dtype)
            if end > start
            else torch.empty(0, dtype=dtype)
        )
        out[name] = t.reshape(info["shape"])
    return out


def _normalise_keys(sd: dict[str, Any]) -> dict[str, Any]:
    """Unwrap {'model': ...}/{'state_dict': ...}, strip DDP's 'module.' prefix, and accept IBM's
    ParameterList spelling `pos_embed.0` / `cls_token.0` (timm's `pos_embed_0` / `cls_token_0`)."""
    for key in ("model", "state_dict", "model_state_dict"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith(("pos_embed.", "cls_token.")):
            k = k.replace(".", "_")
        out[k] = v
    return out


def load_checkpoint(model: CrossViT, path: str | os.PathLike, strict: bool = True):
    """Load a timm or IBM CrossViT checkpoint into `model`.

    `.safetensors` is parsed directly; `.pth` / `.pt` go through `torch.load(weights_only=True)`
    (no pickled code runs). Returns `load_state_dict`'s (missing, unexpected) keys.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        sd = read_safetensors(path)
    elif path.endswith((".pth", ".pt", ".bin")):
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: expected a .pth, .pt or .safetensors checkpoint")
    if not isinstance(sd, dict):
        raise ValueError(
            f"{path}: expected a state_dict (dict of tensors), got {type(sd).__name__}"
        )
    return model.load_state_dict(_normalise_keys(sd), strict=strict)


def from_timm(timm_model: torch.nn.Module, backend: str = "auto") -> CrossViT:
    """Build our CrossViT from a timm `CrossVit` instance: same config, weights copied, same
    device and dtype, same train/eval mode."""
    try:
        nb = timm_model.num_branches
        sizes = [tuple(s) for s in timm_model.img_size_scaled]
        pe = timm_model.patch_embed
        stages = timm_model.blocks
    except AttributeError as exc:
        raise TypeError(f"expected a timm CrossVit model, got {type(timm_model).__name__}") from exc

    def ps(i):  # patch size of branch i
        p = pe[i].patch_size
        return p[0] if isinstance(p, (tuple, list)) else p

    dims = tuple(getattr(timm_model, f"cls_token_{i}").shape[-1] for i in range(nb))
    multi_conv = isinstance(pe[0].proj, torch.nn.Sequential)
    depth = []
    for st in stages:
        fusion0 = st.fusion[0]
        fd = len(fusion0) if isinstance(fusion0, torch.nn.Sequential) else 0
        depth.append(tuple(len(b) for b in st.blocks) + (fd,))
    blk0 = [stages[0].blocks[i][0] for i in range(nb)]
    head0 = timm_model.head[0]
    cfg = CrossViTConfig(
        img_size=tuple(sizes),
        patch_size=tuple(ps(i) for i in range(nb)),
        embed_dim=dims,
        depth=tuple(depth),
        num_heads=tuple(b.attn.num_heads for b in blk0),
        mlp_ratio=tuple(b.mlp.fc1.out_features / d for b, d in zip(blk0, dims)),
        qkv_bias=blk0[0].attn.qkv.bias is not None,
        multi_conv=multi_conv,
        crop_scale=bool(getattr(timm_model, "crop_scale", False)),
        global_pool=timm_model.global_pool,
        num_classes=head0.out_features if isinstance(head0, torch.nn.Linear) else 0,
        in_chans=(pe[0].proj[0] if multi_conv else pe[0].proj).in_channels,
        norm_eps=blk0[0].norm1.eps,
    )
    ref = timm_model.cls_token_0
    model = CrossViT(cfg, backend=backend).to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(timm_model.state_dict(), strict=True)
    return model.train(timm_model.training)
