"""Accuracy and server utility against arrivals, one line per pricing scheme, from a ``fedlr sweep``
over ``pricing.scheme`` (DaringFed, Xin et al., IJCAI 2025, arXiv 2505.05842;
shared/specs/daringfed.md §9 "Real training", claims D2 and D3).

Usage: python experiments/daringfed/plot.py SWEEP_DIR [RUN_DIR ...] [--out PNG]

RUN_DIRs are extra single runs to include (e.g. ``pricing.tii = false``, the OII
oracle). Prints the Markdown table of experiments/daringfed/README.md and writes
a three-panel plot (default: SWEEP_DIR/plots/daringfed.png). Every number comes
from the runs' metrics.jsonl; the budget B is recomputed from each run's
config.toml by the strategy itself (it is not a per-arrival metric).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlr import config as config_mod  # noqa: E402
from fedlr.pricing import SCHEMES  # noqa: E402
from fedlr.results import read_metrics  # noqa: E402
from strategies import build_strategy  # noqa: E402

TARGET_SHARE = 0.95  # D3: arrivals until 95 % of full-information's final accuracy
LAST = 50  # arrivals averaged for the end-of-run accuracy


def label(cfg: config_mod.Config) -> str:
    return cfg["pricing.scheme"] + ("" if cfg["pricing.tii"] else " (OII oracle)")


def load_runs(dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """Rows and budget of every run, in the order of ``fedlr.pricing.SCHEMES``, oracle ablations last."""
    runs = []
    for run_dir in dirs:
        cfg = config_mod.load(run_dir / "config.toml")
        rows = [r for r in read_metrics(run_dir) if r["round"] >= 1]
        budget = build_strategy(cfg, {p: p for p in range(cfg["num_clients"])}).budget
        order = (not cfg["pricing.tii"], SCHEMES.index(cfg["pricing.scheme"]))
        runs.append((order, label(cfg), {"rows": rows, "budget": budget}))
    return {name: run for _, name, run in sorted(runs, key=lambda r: r[0])}


def arrivals_to(rows: list[dict[str, Any]], target: float) -> int | None:
    return next((r["round"] for r in rows if r["test_accuracy"] >= target), None)


def table(runs: dict[str, dict[str, Any]]) -> str:
    reference = runs["full-information"]["rows"]
    target = TARGET_SHARE * float(np.mean([r["test_accuracy"] for r in reference[-LAST:]]))
    lines = [
        f"| scheme | acc @100 | acc @200 | acc, last {LAST} | arrivals to {target:.3f} | server utility | "
        "participation | budget spent | |θ̂ − θ|, last 100 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        rows = run["rows"]
        acc = {r["round"]: r["test_accuracy"] for r in rows}
        end = float(np.mean([r["test_accuracy"] for r in rows[-LAST:]]))
        reached = arrivals_to(rows, target)
        theta = float(np.mean([r["theta_error"] for r in rows[-100:]]))
        last = rows[-1]
        lines.append(
            f"| {name} | {acc[100]:.3f} | {acc[200]:.3f} | {end:.3f} | {reached or 'never'} | "
            f"{last['server_utility']:.3f} | {last['participation_rate']:.3f} | "
            f"{last['budget_spent']:.2f} of {run['budget']:.2f} | {theta:.3f} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, run in runs.items():
        rows = run["rows"]
        x = [r["round"] for r in rows]
        style = "--" if "oracle" in name or name == "full-information" else "-"
        for ax, key in zip(axes, ("test_accuracy", "server_utility", "participation_rate"), strict=True):
            ax.plot(x, [r[key] for r in rows], style, label=name, lw=1.2)
    for ax, ylabel in zip(axes, ("test accuracy", "cumulative server utility", "participation rate"), strict=True):
        ax.set(xlabel="arrivals", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("runs", type=Path, nargs="*")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dirs = sorted(d for d in args.sweep.iterdir() if (d / "metrics.jsonl").is_file()) + list(args.runs)
    runs = load_runs(dirs)
    print(table(runs))
    out = args.out or args.sweep / "plots" / "daringfed.png"
    plot(runs, out)
    print(f"\nplot: {out}")


if __name__ == "__main__":
    main()
