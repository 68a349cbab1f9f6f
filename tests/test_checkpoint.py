"""Checkpoint files: every accepted suffix (any case) loads; every unreadable file gives one
CheckpointError that names the file and what is wrong with it."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import crossvit_fast
from crossvit_fast import CrossViT
from crossvit_fast.checkpoint import CHECKPOINT_SUFFIXES, CheckpointError, read_checkpoint

from .conftest import tiny_config


def small() -> CrossViT:
    return CrossViT(tiny_config(), backend="reference")


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return small().state_dict()


def _assert_same(model: CrossViT, sd: dict, what: str) -> None:
    got = model.state_dict()
    assert list(got) == list(sd), what
    for k, v in got.items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=f"{what}: {k}")


@pytest.mark.parametrize(
    "name", ["w.pth", "w.pt", "w.bin", "W.PTH", "w.Pt", "w.safetensors", "W.SafeTensors"]
)
def test_every_suffix_in_any_case_loads(tmp_path, sd, name):
    path = tmp_path / name
    if name.lower().endswith(".safetensors"):
        save_file(sd, path)
    else:
        torch.save(sd, path)
    model = small()
    assert crossvit_fast.load_checkpoint(model, path) is not None
    _assert_same(model, sd, name)


def test_accepted_suffixes_are_stated_once():
    assert CHECKPOINT_SUFFIXES == (".pth", ".pt", ".bin", ".safetensors")


def test_ibm_spelling_wrapped_and_ddp_prefix(tmp_path, sd):
    # IBM's release checkpoints: ParameterList spelling (pos_embed.0), wrapped in {"model": ...};
    # DDP checkpoints: "module." prefixes.
    ibm = {
        "module." + k.replace("pos_embed_", "pos_embed.").replace("cls_token_", "cls_token."): v
        for k, v in sd.items()
    }
    torch.save({"model": ibm, "epoch": 3}, tmp_path / "ibm.pth")
    model = small()
    crossvit_fast.load_checkpoint(model, tmp_path / "ibm.pth")
    _assert_same(model, sd, "ibm")
    assert set(read_checkpoint(tmp_path / "ibm.pth")) == set(sd)


def _safetensors_parts(sd: dict, path) -> tuple[dict, bytes]:
    save_file(sd, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _bad_files(tmp_path, sd) -> dict[str, bytes]:
    """name -> bytes of a file that must be refused."""
    header, data = _safetensors_parts(sd, tmp_path / "ok.safetensors")
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    overlap = json.loads(json.dumps(header))
    overlap[b]["data_offsets"] = [
        overlap[a]["data_offsets"][0],
        overlap[a]["data_offsets"][0]
        + (overlap[b]["data_offsets"][1] - overlap[b]["data_offsets"][0]),
    ]
    beyond = json.loads(json.dumps(header))
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    beyond[names[-1]]["data_offsets"][1] = end + 4096
    bad_dtype = json.loads(json.dumps(header))
    bad_dtype[a]["dtype"] = "F33"
    torch.save(sd, tmp_path / "ok.pth")
    pth = (tmp_path / "ok.pth").read_bytes()
    rnd = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=rnd, dtype=torch.uint8).tolist())
    return {
        "empty.pth": b"",
        "noise.pth": noise,
        "truncated.pth": pth[: len(pth) // 2],
        "text.pt": b"not a checkpoint\n",
        "empty.safetensors": b"",
        "noise.safetensors": noise,
        "truncated.safetensors": _with_header(header, data[: len(data) // 2]),
        "overlap.safetensors": _with_header(overlap, data),
        "beyond_end.safetensors": _with_header(beyond, data),
        "bad_dtype.safetensors": _with_header(bad_dtype, data),
        "huge_header.safetensors": struct.pack("<Q", 1 << 40) + data,
        "json_garbage.safetensors": struct.pack("<Q", 5) + b"{abc}" + data,
    }


BAD = [
    "empty.pth",
    "noise.pth",
    "truncated.pth",
    "text.pt",
    "empty.safetensors",
    "noise.safetensors",
    "truncated.safetensors",
    "overlap.safetensors",
    "beyond_end.safetensors",
    "bad_dtype.safetensors",
    "huge_header.safetensors",
    "json_garbage.safetensors",
]


@pytest.mark.parametrize("name", BAD)
def test_unreadable_file_is_one_error_naming_the_file(tmp_path, sd, name):
    path = tmp_path / name
    path.write_bytes(_bad_files(tmp_path, sd)[name])
    with pytest.raises(CheckpointError) as info:
        crossvit_fast.load_checkpoint(small(), path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    # says what is wrong: the format it was read as, and the reader's reason
    assert ("safetensors" in msg) == name.endswith(".safetensors"), msg
    assert len(msg) > len(str(path)) + 30, msg
    if name.startswith("empty"):
        assert "the file is empty" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: expected a state_dict .* got list"):
        read_checkpoint(tmp_path / "list.pth")
    torch.save({"a": torch.zeros(1), "b": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"mixed\.pth: .*\['b'\] are not tensors"):
        read_checkpoint(tmp_path / "mixed.pth")


class _Anything:
    pass


def test_pickled_code_is_refused(tmp_path):
    torch.save({"a": _Anything()}, tmp_path / "code.pth")  # unpickling it would run code
    with pytest.raises(CheckpointError, match=r"code\.pth: not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "code.pth")


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(
        CheckpointError,
        match=r"w\.txt: unknown checkpoint suffix '\.txt'; "
        r"expected one of \.pth \.pt \.bin \.safetensors",
    ):
        read_checkpoint(tmp_path / "w.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        read_checkpoint(tmp_path / "missing.pth")
    os.mkdir(tmp_path / "dir.pth")
    with pytest.raises(FileNotFoundError, match=r"dir\.pth"):
        read_checkpoint(tmp_path / "dir.pth")


def test_weights_of_another_model_name_the_file(tmp_path):
    torch.save(CrossViT(tiny_config(embed_dim=(32, 32))).state_dict(), tmp_path / "other.pth")
    with pytest.raises(
        RuntimeError, match=r"(?s)other\.pth: does not fit this model: .*size mismatch"
    ):
        crossvit_fast.load_checkpoint(small(), tmp_path / "other.pth")
