"""The model of a run: the default config, `--model` resolution and `--init` weights."""

from __future__ import annotations

import json
import os

from torch import nn

from ..config import CrossViTConfig
from ..registry import list_models, model_config
from .errors import TrainError

__all__ = ["DEFAULT_CONFIG", "DIGITS_LR", "FINETUNE_LR_FACTOR", "load_init", "resolve_config"]

# The default model, sized for the built-in digits so that the default run reaches > 0.9
# validation accuracy on a 2-core CPU in well under a minute: the 8x8 digits are upsampled to
# 16x16; branch 0 sees 16 patches of 4x4 px (2x2 digit pixels each), branch 1 resizes to 12x12 and
# sees 4 patches of 6x6 px: the same 1 : 0.75 scale pair as timm's 240 / 224 variants, and three
# stages of (1, 2) blocks + fusion like every timm CrossViT.
DEFAULT_CONFIG = CrossViTConfig(
    img_size=(16, 12),
    patch_size=(4, 6),
    embed_dim=(48, 96),
    depth=((1, 2, 0),) * 3,
    num_heads=(3, 3),
    mlp_ratio=(2.0, 2.0),
    num_classes=10,
)
DIGITS_LR = 2e-3
# With --init the default peak LR is this fraction of the from-scratch default: fine-tuning
# starts near a good solution, and the full LR would mostly undo the pretraining.
FINETUNE_LR_FACTOR = 0.1


def _config_from_fields(fields: dict, where: str) -> CrossViTConfig:
    """CrossViTConfig fields, or exactly timm's `CrossVit(...)` keyword arguments (`img_scale`, a
    square `img_size`, 3-entry `mlp_ratio`, ...), whichever the JSON object is."""
    try:
        return CrossViTConfig(**fields)
    except (TypeError, ValueError) as exc:
        first = exc
    try:
        return CrossViTConfig.from_timm(**fields)
    except (TypeError, ValueError) as exc:
        raise TrainError(
            f"{where}: neither CrossViTConfig fields ({first}) nor timm CrossVit arguments ({exc})"
        ) from exc


def resolve_config(model: str | None, num_classes: int, drop_path: float | None) -> tuple:
    """(name, CrossViTConfig) for --model, with the data's class count (and --drop-path)."""
    if model is None:
        name, cfg = "default", DEFAULT_CONFIG
    elif model in list_models():
        name, cfg = model, model_config(model)
    elif model.endswith(".json") or os.path.isfile(model):
        name = os.path.basename(model)
        try:
            with open(model) as f:
                fields = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainError(f"--model {model}: cannot read the JSON config: {exc}") from exc
        if not isinstance(fields, dict):
            raise TrainError(f"--model {model}: expected a JSON object of CrossViTConfig fields")
        cfg = _config_from_fields(fields, f"--model {model}")
    else:
        raise TrainError(
            f"--model {model!r}: expected a registered name ({', '.join(list_models())}) or a "
            "JSON config file"
        )
    overrides = {"num_classes": num_classes}
    if drop_path is not None:
        overrides["drop_path_rate"] = drop_path
    try:
        return name, cfg.replace(**overrides)
    except ValueError as exc:
        raise TrainError(f"--model {model}: {exc}") from exc


class _Capture(nn.Module):
    """Stands in for the model in `load_checkpoint`, keeping the state dict it would load: that
    function owns the file formats and key spellings (timm, IBM, DDP prefixes, a crossvit_fast
    checkpoint's "model" entry); what is done with a head of another class count is ours."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.state = dict(state_dict)
        return nn.modules.module._IncompatibleKeys([], [])


def _read_init(spec: str, name: str, cfg: CrossViTConfig) -> tuple[dict, str]:
    if spec == "pretrained":
        if name not in list_models():
            raise TrainError(
                f"--init pretrained: needs --model set to a registered name ({', '.join(list_models())})"
            )
        import crossvit_fast

        try:
            hub = crossvit_fast.create_model(
                name, pretrained=True, num_classes=cfg.num_classes, backend="reference"
            )
        except (TypeError, ValueError) as exc:
            if "pretrained" in str(exc):
                raise TrainError(
                    "--init pretrained: this crossvit_fast cannot load hub weights "
                    "(create_model(..., pretrained=True) is not supported); download the "
                    f"weights and pass --init PATH instead ({exc})"
                ) from exc
            raise TrainError(f"--init pretrained: {exc}") from exc
        except (OSError, RuntimeError, ImportError) as exc:
            raise TrainError(
                f"--init pretrained: cannot load the weights of {name}: {exc}"
            ) from exc
        return hub.state_dict(), f"the pretrained weights of {name}"
    from ..checkpoint import load_checkpoint

    path = os.path.join(spec, "model.safetensors") if os.path.isdir(spec) else spec
    capture = _Capture()
    try:
        load_checkpoint(capture, path)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TrainError(f"--init {spec}: {exc}") from exc
    return capture.state, path


def load_init(net: nn.Module, spec: str, name: str, cfg: CrossViTConfig) -> str:
    """Load --init weights into `net` (a bare CrossViT): a timm / IBM .pth / .safetensors file, a
    crossvit_fast training checkpoint, an `export` directory, or "pretrained" (the hub weights of
    the registered --model). Heads of another class count are not loaded: `net`'s freshly
    initialised heads stay (timm's `reset_classifier`). Returns what was done, for the log."""
    state, where = _read_init(spec, name, cfg)
    own = net.state_dict()
    reset = sorted(
        k
        for k, v in state.items()
        if k.startswith("head.") and k in own and tuple(v.shape) != tuple(own[k].shape)
    )
    old_classes = state["head.0.bias"].shape[0] if "head.0.bias" in reset else None
    for k in reset:
        del state[k]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches outside the heads
        raise TrainError(f"--init {spec}: the weights do not fit model {name}: {exc}") from exc
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise TrainError(
            f"--init {spec}: the weights do not fit model {name}: missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
            + (" ..." if len(missing) > 5 or len(unexpected) > 5 else "")
        )
    if reset or not any(k.startswith("head.") for k in state):
        was = f"{old_classes} -> " if old_classes is not None else ""
        return f"init from {where} (heads reset: {was}{cfg.num_classes} classes)"
    return f"init from {where}"
