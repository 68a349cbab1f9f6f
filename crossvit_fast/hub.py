"""Pretrained weights: timm's published CrossViT checkpoints on the Hugging Face hub, or a file.

`create_model(name, pretrained=...)` resolves `pretrained` here:

* `True`: timm's weights for that name, repo `timm/<name>.in1k`, file `model.safetensors`;
* `"org/repo"` (or timm's spelling `"hf-hub:org/repo"`): `model.safetensors` of that hub repo;
* a path to a checkpoint file (`CHECKPOINT_SUFFIXES`, e.g. a downloaded `model.safetensors`).

Downloads go through `huggingface_hub` (the optional `hub` extra:
`pip install "crossvit_fast[hub]"`), so its cache and settings apply unchanged: `HF_HOME` /
`HF_HUB_CACHE` say where the cache is, `HF_HUB_OFFLINE=1` reads only the cache, a cached file is
never downloaded again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import Tensor

from .checkpoint import CHECKPOINT_SUFFIXES, read_checkpoint

__all__ = ["WEIGHTS_FILE", "pretrained_file", "pretrained_state_dict"]

WEIGHTS_FILE = "model.safetensors"  # what timm publishes in each timm/<name>.<tag> repo
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_local(source: str) -> bool:
    """A path, not a hub repo id: it exists, or it looks like a file path."""
    return (
        os.path.exists(source)
        or source.lower().endswith(CHECKPOINT_SUFFIXES)
        or source.startswith(("/", ".", "~"))
        or os.sep in source.replace("/", "", 1)  # more than one separator: not org/repo
    )


def _download(repo_id: str) -> str:
    """The local path of `repo_id`'s weights file, from the hub cache or downloaded into it."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise ImportError(
            f"pretrained weights from the Hugging Face hub ({repo_id}) need huggingface_hub: "
            'pip install "crossvit_fast[hub]" (or pass pretrained="/path/to/model.safetensors")'
        ) from None
    try:
        return hf_hub_download(repo_id, WEIGHTS_FILE)
    except Exception as exc:  # offline and not cached, no such repo or file, network errors
        offline = constants.is_offline_mode()
        where = constants.HF_HUB_CACHE
        how = (
            f"HF_HUB_OFFLINE is set and {repo_id}/{WEIGHTS_FILE} is not in the cache ({where}). "
            "To get it, run once with network access (unset HF_HUB_OFFLINE), or on a machine "
            f"that has it: `hf download {repo_id} {WEIGHTS_FILE}` and copy the cache folder, or "
            f"pass pretrained='/path/to/{WEIGHTS_FILE}'"
            if offline
            else f"{type(exc).__name__}: {exc}. The file is cached under {where} once "
            f"downloaded; to use a copy you already have, pass pretrained='/path/to/{WEIGHTS_FILE}'"
        )
        raise RuntimeError(
            f"cannot get pretrained weights {repo_id}/{WEIGHTS_FILE}: {how}"
        ) from exc


def pretrained_file(source: bool | str | os.PathLike, default_repo: str | None) -> str:
    """The checkpoint file `pretrained=source` names (downloading it if it is a hub repo)."""
    if source is True:
        if default_repo is None:
            raise ValueError("pretrained=True: this model has no published weights")
        return _download(default_repo)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ValueError(
            "pretrained: expected True, a hub repo id 'org/repo' or a checkpoint path, "
            f"got {source!r}"
        )
    if source.startswith("hf-hub:"):
        return _download(source[len("hf-hub:") :])
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
        return str(path)
    if _REPO_ID.match(source):
        return _download(source)
    raise ValueError(
        f"pretrained={source!r}: neither a checkpoint file ({' '.join(CHECKPOINT_SUFFIXES)}) "
        "nor a hub repo id 'org/repo'"
    )


def pretrained_state_dict(
    source: bool | str | os.PathLike, default_repo: str | None
) -> tuple[dict[str, Tensor], str]:
    """(state_dict, the file it came from) for `create_model(..., pretrained=source)`."""
    path = pretrained_file(source, default_repo)
    return read_checkpoint(path), path
