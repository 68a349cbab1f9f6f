"""Benchmarks run on a GPU: `pytest benchmarks/ --benchmark-only` (see README). Without one they
skip, since CPU timings of GPU kernels mean nothing."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible to torch)")
    for item in items:
        item.add_marker(skip)
