"""Accuracy and attack similarity against the per-release ε, one line per allocation,
from a ``fedlr sweep`` over ``privacy.epsilon`` and ``privacy.allocation``
(FedRE, Xiao et al., arXiv 2505.04889; shared/specs/fedre.md §9 claims F1, F2).

Usage: python experiments/fedre/plot.py SWEEP_DIR [OUT.png]

Prints the Markdown table of README.md and writes the two-panel plot
(default: SWEEP_DIR/plots/fedre_tradeoff.png). Attack numbers come from each
run's summary.json (``privacy.attack = true``); ``layer_epsilons`` from the
last row of its metrics.jsonl.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedlr.results import read_metrics  # noqa: E402

ATTACK_KEYS = ("attack_similarity", "attack_similarity_other", "attack_mse_sensitive", "attack_mse_other")


def load_runs(sweep: Path) -> list[dict]:
    """One dict per completed run: the grid point, its summary and its last layer budgets."""
    runs = []
    with (sweep / "sweep.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["status"] != "completed":
                continue
            summary = json.loads((sweep / row["run"] / "summary.json").read_text())
            last = read_metrics(sweep / row["run"])[-1]
            runs.append({
                "epsilon": float(row["privacy.epsilon"]),
                "allocation": row["privacy.allocation"],
                "final_accuracy": summary["final_accuracy"],
                "best_accuracy": summary["best_accuracy"],
                "layer_epsilons": last["layer_epsilons"],
                **{k: summary[k] for k in ATTACK_KEYS},
            })
    return sorted(runs, key=lambda r: (r["epsilon"], r["allocation"]))


def table(runs: list[dict]) -> str:
    lines = [
        "| ε per release | allocation | final acc | best acc | ε_l (last round, worst client) "
        "| cos sim. sensitive | cos sim. other | MSE sensitive | MSE other |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        layers = ", ".join(f"{e:.3g}" for e in r["layer_epsilons"])
        lines.append(
            f"| {r['epsilon']:g} | {r['allocation']} | {r['final_accuracy']:.3f} | {r['best_accuracy']:.3f} | {layers} "
            f"| {r['attack_similarity']:.3f} | {r['attack_similarity_other']:.3f} "
            f"| {r['attack_mse_sensitive']:.3f} | {r['attack_mse_other']:.3f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for allocation, marker in (("uniform", "o"), ("sensitivity", "s")):
        points = [r for r in runs if r["allocation"] == allocation]
        eps = [r["epsilon"] for r in points]
        axes[0].plot(eps, [r["final_accuracy"] for r in points], marker=marker, label=allocation)
        axes[1].plot(eps, [r["attack_similarity"] for r in points], marker=marker, label=allocation)
    for ax, ylabel in zip(axes, ("final test accuracy", "attack cosine similarity (sensitive region)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("ε per release")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("FedRE layer-wise LDP on digits (method fedre, analytic Gaussian, C = 0.2)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    sweep = Path(argv[0])
    out = Path(argv[1]) if len(argv) == 2 else sweep / "plots" / "fedre_tradeoff.png"
    runs = load_runs(sweep)
    plot(runs, out)
    print(table(runs))
    print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
