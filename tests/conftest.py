"""Test setup shared by every test module.

Without a CUDA GPU, Triton kernels are tested in Triton's CPU interpreter: TRITON_INTERPRET must
be set before Triton is first imported (`import torch` does not import it), so it is set here.
Tests pick their device with the `device` fixture / `DEVICE`: "cuda" when a GPU is present,
otherwise "cpu" (Triton ops then run interpreted).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def cuda_emulator():
    """The CUDA backend's extension built from the same csrc/ sources for the CPU emulator
    (csrc/emu: each CUDA block runs on one host thread), for `build.use_extension`. Building it
    takes ~1 min of one core (cached in build/emu); CROSSVIT_FAST_TEST_EMU=0 skips what needs it."""
    if os.environ.get("CROSSVIT_FAST_TEST_EMU", "1") == "0":
        pytest.skip("CROSSVIT_FAST_TEST_EMU=0: emulator tests disabled")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (the CUDA kernels' CPU emulator is built with one)")
    from torch.utils import cpp_extension

    csrc = REPO / "csrc"
    directory = Path(os.environ.get("CROSSVIT_FAST_EMU_BUILD_DIR", REPO / "build" / "emu"))
    directory.mkdir(parents=True, exist_ok=True)
    mod = cpp_extension.load(
        name="crossvit_fast_emu",
        sources=[str(csrc / "emu" / "emu_build.cpp"), str(csrc / "bindings.cpp")],
        extra_cflags=["-DCVF_EMULATE", "-O1", f"-I{sysconfig.get_paths()['include']}"],
        build_directory=str(directory),
    )
    assert mod.emulated
    return mod


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models: a second intra-op thread adds synchronisation, not speed, and on a busy
    2-core machine each op then waits for a descheduled thread (runs ~10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def available_backend_names(device_type: str) -> list[str]:
    """The backends that can run on `device_type` here (triton on CPU: interpreter only)."""
    from crossvit_fast import backends

    return [b for b in backends.BACKENDS if backends.backend_availability(b, device_type)[0]]


def tiny_config(**overrides):
    """A CrossViT with few, short token rows: the fast backends run in Triton's CPU interpreter
    here. 2 + 4 tokens per branch at widths 32 / 64."""
    from crossvit_fast import CrossViTConfig

    return CrossViTConfig(**{**TINY_KWARGS, **overrides})


# tiny_config's fields (also written as JSON for the benchmark smoke, tests/test_bench_model.py).
TINY_KWARGS = dict(
    img_size=(32, 16),
    patch_size=(8, 8),
    embed_dim=(32, 64),
    depth=((1, 1, 0),),
    num_heads=(2, 2),
    mlp_ratio=(2.0, 2.0),
    num_classes=5,
)

# Widths 32 / 64 over 16 / 4 patches, unequal heads and MLP ratios, two blocks in branch 1.
SMALL_KWARGS = dict(
    TINY_KWARGS,
    img_size=(48, 32),
    patch_size=(12, 16),
    depth=((1, 2, 0),),
    num_heads=(2, 4),
    mlp_ratio=(2.0, 3.0),
)

# Every rate timm's CrossVit takes, each a distinct non-zero value: what from_timm must carry.
TIMM_RATES = dict(
    drop_rate=0.1,
    pos_drop_rate=0.05,
    proj_drop_rate=0.2,
    attn_drop_rate=0.15,
    drop_path_rate=0.3,
)


def run_python(*args: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`python *args` (this interpreter) in a child process, its stdout / stderr captured as
    text; `kwargs` (cwd, env) go to subprocess.run."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


# The repository root (the child processes run from it, importing this checkout).
REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    """This environment for a child Python (torchrun, `python -m crossvit_fast`): the
    repository importable, one OpenMP thread (the children share this machine's cores)."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def popen_in_session(cmd: list[str]) -> subprocess.Popen:
    """`cmd` started from the repository in a session (process group) of its own, with
    `child_env()`, its stdout and stderr piped as text (what the preemption tests signal)."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# -- `train` runs -----------------------------------------------------------------------------------

# One stage of the default training model's widths: the per-step cost of these runs is mostly
# per-op overhead, so fewer blocks is what makes them quick.
TRAIN_TINY = dict(
    img_size=[[16, 16], [12, 12]],
    patch_size=[4, 6],
    embed_dim=[48, 96],
    depth=[[1, 1, 0]],
    num_heads=[3, 3],
    mlp_ratio=[2.0, 2.0],
    num_classes=10,
)


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory) -> str:
    import json

    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TRAIN_TINY))
    return str(path)


@pytest.fixture
def quick(tiny_json) -> list[str]:
    """`train` options of a run of a few seconds: 48 digits in batches of 8 -> 6 steps / epoch.
    On the CPU even where a GPU exists: bit-exact resume relies on deterministic kernels."""
    return [
        "--model",
        tiny_json,
        "--train-samples",
        "48",
        "--val-samples",
        "16",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--no-progress",
    ]


def write_image_folder(root, per_class: int = 6, size=(20, 14), classes=("blue", "red")) -> None:
    """A two-colour ImageFolder of PNGs (plus a non-image file that must be ignored)."""
    import os

    from PIL import Image

    colours = {"blue": (20, 30, 220), "red": (230, 20, 10), "green": (20, 200, 30)}
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            img = Image.new("RGB", size, tuple(max(0, v - 9 * i) for v in colours[c]))
            img.save(root / c / f"{i}.png")
    (root / classes[-1] / "notes.txt").write_text("not an image")


# Three branches (timm allows any number): widths and patch grids that differ per branch.
THREE_BRANCHES = dict(
    img_size=(48, 32, 32),
    patch_size=(12, 16, 8),
    embed_dim=(32, 64, 48),
    depth=((1, 1, 1, 0),),
    num_heads=(2, 2, 3),
    mlp_ratio=(2.0, 2.0, 2.0),
)
