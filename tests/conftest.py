"""Test setup shared by every test module.

Without a CUDA GPU, Triton kernels are tested in Triton's CPU interpreter: TRITON_INTERPRET must
be set before Triton is first imported (`import torch` does not import it), so it is set here.
Tests pick their device with the `device` fixture / `DEVICE`: "cuda" when a GPU is present,
otherwise "cpu" (Triton ops then run interpreted).
"""

from __future__ import annotations

import os

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
