"""The naming rule of the README's layout section holds across the tree.

One row of the README's op table per op of the table (`crossvit_fast.backends.OPS`); every file a
row names exists; each op's reference is `ops/reference.py::<op>`; each Triton kernel module is
named after an op; no package or csrc file is over 600 lines; the package's top-level imports
have no cycle. Pure file and AST checks: no kernel runs, Triton is not imported.
"""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest

from crossvit_fast import backends
from crossvit_fast.ops import reference

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crossvit_fast"
MAX_LINES = 600


def _op_table() -> dict[str, list[str]]:
    """op name -> the cells of its README row (first column split on commas)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for op in re.findall(r"`([a-z_]+)`", cells[0]):
            rows[op] = cells[1:]
    return rows


def _named_files(cell: str) -> list[Path]:
    """The files a table cell names (backquoted paths with a suffix), resolved in the tree."""
    out: list[Path] = []
    for name in re.findall(r"`([\w/.]+\.(?:py|cu))`", cell):
        if name.startswith("ops/test_") or name.startswith("test_"):
            out.append(ROOT / "tests" / name)
        elif name.startswith("bench_"):
            out.append(ROOT / "benchmarks" / name)
        elif name.startswith("csrc/"):
            out.append(ROOT / name)
        elif name.startswith("ops/"):
            out.append(PACKAGE / name)
        else:  # a bare file name: in the directory of the cell's previous file
            out.append((out[-1].parent if out else ROOT / "csrc") / name)
    return out


def test_readme_table_has_one_row_per_op():
    assert sorted(_op_table()) == sorted(backends.OPS)


@pytest.mark.parametrize("op", backends.OPS)
def test_every_file_the_table_names_exists(op):
    cells = _op_table()[op]
    files = [f for cell in cells for f in _named_files(cell)]
    assert files, f"README row of {op} names no file"
    missing = [str(f.relative_to(ROOT)) for f in files if not f.exists()]
    assert not missing, f"README row of {op} names missing files: {missing}"


@pytest.mark.parametrize("op", backends.OPS)
def test_reference_defines_every_op(op):
    assert callable(getattr(reference, op, None)), f"ops/reference.py has no function {op}"


@pytest.mark.parametrize(
    "op", [op for op in backends.OPS if (PACKAGE / "ops" / "triton" / f"{op}.py").exists()]
)
def test_every_kernel_op_has_its_own_test_module(op):
    assert (ROOT / "tests" / "ops" / f"test_{op}.py").exists(), f"no tests/ops/test_{op}.py"


def test_triton_kernel_modules_are_named_after_ops():
    from crossvit_fast.ops import triton as triton_backend

    helpers = {
        "__init__",
        "utils",
        "cross_attention_rows",
        "gemm",
        "norm_rows",
    }  # shared pieces, README says which
    for path in (PACKAGE / "ops" / "triton").glob("*.py"):
        if path.stem in helpers:
            continue
        assert path.stem in backends.OPS, f"{path.name} is not named after an op"
        assert path.stem in triton_backend._KERNEL_MODULES, f"{path.name} is not in the table"
        assert re.search(rf'^OPS = \{{"{path.stem}": ', path.read_text(), re.M), (
            f"{path.name} does not export OPS = {{'{path.stem}': ...}}"
        )


@pytest.mark.parametrize(
    "path",
    sorted([*PACKAGE.rglob("*.py"), *(ROOT / "csrc").rglob("*.cu"), *(ROOT / "csrc").rglob("*.h")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_source_file_over_600_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES})"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules) -> set[str]:
    """The modules of `modules` a file imports at module level (not inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module (after pkg)
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in out if m in modules}


def test_no_import_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _top_level_imports(p, modules) - {m} for m, p in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle to break; edges from a
    # submodule up to its package are (they run the package's __init__ first).
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                if not all(
                    b.startswith(a + ".") or a.startswith(b + ".")
                    for a, b in itertools.pairwise(cycle)
                ):
                    pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
