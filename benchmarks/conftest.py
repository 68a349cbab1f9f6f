"""Benchmarks run on a GPU: `pytest benchmarks/ --benchmark-only` (see README). Without one they
skip, since CPU timings of GPU kernels mean nothing.

`--bench-quick` keeps, per benchmark function (and value of `backward` where it has one), only
the first case at that function's largest batch: every benchmark once at a realistic size, in the
few minutes a lent GPU allows (benchmarks/gpu_session.sh). Most of a case's time is compiling the
reference and autotuning the kernels, not the timed calls, so fewer cases is the lever.
"""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="one case per benchmark (and per backward flag), at its largest batch",
    )


def _params(item) -> dict:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def _batch(item):
    p = _params(item)
    return p.get("batch", p.get("B"))


def quick_selection(items: list) -> tuple[list, list]:
    """(kept, deselected) under --bench-quick (see the module docstring)."""
    largest: dict = {}
    for item in items:
        fn, b = (item.path, item.originalname), _batch(item)
        if b is not None:
            largest[fn] = max(largest.get(fn, b), b)
    kept, dropped, seen = [], [], set()
    for item in items:
        fn = (item.path, item.originalname)
        key = (*fn, _params(item).get("backward"))
        if key in seen or _batch(item) != largest.get(fn):
            dropped.append(item)
        else:
            seen.add(key)
            kept.append(item)
    return kept, dropped


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-quick"):
        kept, dropped = quick_selection(items)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (none visible to torch)")
    for item in items:
        item.add_marker(skip)
