"""Loading weights: timm / IBM checkpoint files and live timm models.

Checkpoint files are read without running code: `.safetensors` through the `safetensors` library
(which validates the header: dtypes, shapes, offsets inside the file and not overlapping), the
others through `torch.load(weights_only=True)`. Any file that cannot be read gives one
`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import CrossViTConfig, mlp_ratio_for
from .model import CrossViT

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CheckpointError",
    "from_timm",
    "load_checkpoint",
    "read_checkpoint",
]

# The accepted checkpoint files (suffixes compared case-insensitively): safetensors, and the
# torch.save / pickle-zip formats (.bin is what the Hugging Face hub calls pytorch_model.bin).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not hold a state_dict."""


def _what_is_wrong(path: str, exc: BaseException) -> str:
    if os.path.getsize(path) == 0:
        return "the file is empty"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state_dict in a checkpoint file, on the CPU, keys as saved.

    `.safetensors` through `safetensors.torch.load_file`; `.pth` / `.pt` / `.bin` through
    `torch.load(weights_only=True)` (no pickled code runs). Raises FileNotFoundError, or one
    CheckpointError naming the file and the problem (unknown suffix, empty, truncated or corrupt
    data, invalid safetensors header, not a dict of tensors).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = Path(path).suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint suffix {Path(path).suffix!r}; expected one of "
            f"{' '.join(CHECKPOINT_SUFFIXES)} (any case)"
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError, OSError, dtype unknown to this torch, ...
            raise CheckpointError(
                f"{path}: not a valid safetensors file ({_what_is_wrong(path, exc)})"
            ) from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # EOFError, UnpicklingError, zip errors, IndexError, ...
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint for torch.load(weights_only=True) "
                f"({_what_is_wrong(path, exc)})"
            ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(
            f"{path}: expected a state_dict (dict of name -> tensor), got {type(sd).__name__}"
        )
    sd = _normalise_keys(sd)
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: expected a state_dict (dict of tensors); entries {bad[:5]} are not tensors"
        )
    return sd


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
    """Load a timm or IBM CrossViT checkpoint file (`CHECKPOINT_SUFFIXES`) into `model`.

    Returns `load_state_dict`'s (missing, unexpected) keys. An unreadable file raises
    CheckpointError (see `read_checkpoint`); weights that do not fit the model raise RuntimeError
    naming the file and the mismatched keys.
    """
    sd = read_checkpoint(path)
    try:
        return model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        raise RuntimeError(f"{os.fspath(path)}: does not fit this model: {exc}") from None


def _p(module: Any) -> float:
    """The rate of a timm Dropout / DropPath (0.0 for Identity or a missing module; a number
    as it is: our own modules hold their rates as floats)."""
    if isinstance(module, (int, float)) and not isinstance(module, bool):
        return float(module)
    for attr in ("p", "drop_prob"):
        v = getattr(module, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def _short(rate: float) -> float:
    """The shortest decimal that rounds to the same float32 as `rate`: timm's drop-path rates are
    float32 linspace values (0.1 comes back as 0.10000000149011612), so the maximum reads back
    as the configured 0.1."""
    f32 = torch.tensor(rate, dtype=torch.float32).item()
    for digits in range(1, 10):
        r = float(f"{rate:.{digits}g}")
        if torch.tensor(r, dtype=torch.float32).item() == f32:
            return r
    return rate


def from_timm(timm_model: torch.nn.Module, backend: str = "auto") -> CrossViT:
    """Build our CrossViT from a timm `CrossVit` instance: same config (architecture, dropout
    and drop-path rates, MLP widths exactly as timm built them), weights copied, same device,
    dtype and train/eval mode."""
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
    # MLP widths: timm builds int(dim * ratio); recover a ratio that rebuilds exactly that width
    # (hidden / dim does not always: 152 * (106 / 152) < 106).
    hidden = []
    for i in range(nb):
        widths = {b.mlp.fc1.out_features for st in stages for b in st.blocks[i]}
        if len(widths) != 1:
            raise ValueError(f"branch {i}: blocks have different MLP widths {sorted(widths)}")
        hidden.append(widths.pop())
    # Rates: dropouts are uniform in timm's CrossVit; drop-path is timm's linear schedule, whose
    # largest value is drop_path_rate (the last stage's fusion always gets it).
    attn0 = blk0[0].attn
    drop_paths = [_p(m) for m in timm_model.modules() if type(m).__name__ == "DropPath"]
    rate = _short(max(drop_paths)) if drop_paths else 0.0
    head0 = timm_model.head[0]
    cfg = CrossViTConfig(
        img_size=tuple(sizes),
        patch_size=tuple(ps(i) for i in range(nb)),
        embed_dim=dims,
        depth=tuple(depth),
        num_heads=tuple(b.attn.num_heads for b in blk0),
        mlp_ratio=tuple(mlp_ratio_for(d, h) for d, h in zip(dims, hidden)),
        qkv_bias=blk0[0].attn.qkv.bias is not None,
        multi_conv=multi_conv,
        crop_scale=bool(getattr(timm_model, "crop_scale", False)),
        drop_rate=_p(getattr(timm_model, "head_drop", None)),
        pos_drop_rate=_p(getattr(timm_model, "pos_drop", None)),
        proj_drop_rate=_p(getattr(attn0, "proj_drop", None)),
        attn_drop_rate=_p(getattr(attn0, "attn_drop", None)),
        drop_path_rate=rate,
        global_pool=timm_model.global_pool,
        num_classes=head0.out_features if isinstance(head0, torch.nn.Linear) else 0,
        in_chans=(pe[0].proj[0] if multi_conv else pe[0].proj).in_channels,
        norm_eps=blk0[0].norm1.eps,
    )
    assert cfg.mlp_hidden == tuple(hidden), (cfg.mlp_hidden, hidden)
    ref = timm_model.cls_token_0
    model = CrossViT(cfg, backend=backend).to(device=ref.device, dtype=ref.dtype)
    mismatch = _rate_mismatch(model, timm_model)
    if mismatch:
        raise ValueError(f"from_timm: the timm model's rates are not timm's schedule: {mismatch}")
    model.load_state_dict(timm_model.state_dict(), strict=True)
    return model.train(timm_model.training)


def _rate_mismatch(ours: CrossViT, timm_model: torch.nn.Module) -> str | None:
    """The first module whose dropout / drop-path rate differs between the two models."""
    for s, (a, b) in enumerate(zip(ours.blocks, timm_model.blocks)):
        for i, (sa, sb) in enumerate(zip(a.blocks, b.blocks)):
            for j, (x, y) in enumerate(zip(sa, sb)):
                got = (x.drop_path, x.attn.attn_drop, x.attn.proj_drop, x.mlp.drop)
                # timm's Block: drop_path1 / mlp.drop1 (our own modules: drop_path / mlp.drop)
                dp = getattr(y, "drop_path1", getattr(y, "drop_path", None))
                mlp_drop = getattr(y.mlp, "drop1", getattr(y.mlp, "drop", None))
                want = (_p(dp), _p(y.attn.attn_drop), _p(y.attn.proj_drop), _p(mlp_drop))
                if not all(
                    math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-9) for g, w in zip(got, want)
                ):
                    return f"blocks.{s}.blocks.{i}.{j}: ours {got}, timm {want}"
        for i, (fa, fb) in enumerate(zip(a.fusion, b.fusion)):
            fa, fb = (fa, fb) if isinstance(fb, torch.nn.Sequential) else ([fa], [fb])
            for x, y in zip(fa, fb):
                if not math.isclose(x.drop_path, _p(y.drop_path), rel_tol=1e-6, abs_tol=1e-9):
                    return f"blocks.{s}.fusion.{i}: ours {x.drop_path}, timm {_p(y.drop_path)}"
    return None
