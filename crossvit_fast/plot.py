"""`python -m crossvit_fast plot results.json out.png`: the speed-up chart of a bench_model run.

results.json is pytest-benchmark's `--benchmark-json` output of `benchmarks/bench_model.py`; each
benchmark's extra_info carries its implementation and its ratio to the reference eager / compiled
of the same run. One group of bars per (model, batch, dtype, mode), one bar per implementation,
height = speed-up over the reference eager (1.0 drawn as a line). Needs matplotlib (the `plot`
extra: `pip install crossvit_fast[plot]`).
"""

from __future__ import annotations

import json
from pathlib import Path


def speedups(results: dict) -> tuple[list[str], dict[str, list]]:
    """(group labels, {impl: [speed-up or None per group]}) from pytest-benchmark JSON."""
    rows = [b.get("extra_info", {}) for b in results.get("benchmarks", [])]
    rows = [r for r in rows if "impl" in r and r.get("ratio_vs_reference") is not None]
    groups, impls = [], []
    for r in rows:
        g = f"{r['model']}\nB={r['batch']} {r['dtype']} {r['mode']}"
        if g not in groups:
            groups.append(g)
        if r["impl"] not in impls:
            impls.append(r["impl"])
    table = {i: [None] * len(groups) for i in impls}
    for r in rows:
        g = f"{r['model']}\nB={r['batch']} {r['dtype']} {r['mode']}"
        table[r["impl"]][groups.index(g)] = r["ratio_vs_reference"]
    return groups, table


def main(args) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot needs matplotlib: pip install matplotlib (or crossvit_fast[plot])")
        return 2
    groups, table = speedups(json.loads(Path(args.results).read_text()))
    if not groups:
        print(f"{args.results}: no bench_model.py rows with a ratio to the reference")
        return 1
    width = 0.8 / max(len(table), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(len(table), 1) / 3), 4.5))
    for k, (impl, vals) in enumerate(table.items()):
        xs = [g + k * width for g, v in enumerate(vals) if v is not None]
        ax.bar(xs, [v for v in vals if v is not None], width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(
        [g + width * (len(table) - 1) / 2 for g in range(len(groups))], groups, fontsize=7
    )
    ax.set_ylabel("speed-up over reference eager (same run)")
    ax.set_title("crossvit_fast: whole-model images/s ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0
