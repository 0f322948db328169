"""Game-only DaringFed study: estimator convergence and server utility of every scheme (§9 "Synthetic").

Xin et al., *DaringFed*, IJCAI 2025, arXiv 2505.05842, as formalized in
``shared/specs/daringfed.md``; the simulation is :func:`fedlr.pricing.simulate_scheme`
(no FL training, no Flower: §11 "Overhead"). Every scheme of a seed faces the same
arrivals, states, signal uniforms and timing noise (§7).

Usage: python experiments/daringfed/synthetic.py [--clients 100] [--arrivals 5000] [--seeds 10] [--out PNG]

Prints the Markdown tables of experiments/daringfed/README.md and writes a
four-panel plot: estimation errors against arrivals (D1), cumulative utility,
participation and budget spent per scheme (D2). ``persuasion (OII oracle)`` is
persuasion told the true θ (``tii = False``), the upper reference when the
budget cap binds; ``full-information`` is not one then (``tests/test_pricing.py``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedlr.pricing import SCHEMES, SimulationConfig, SimulationResult, simulate_scheme  # noqa: E402

OII = "persuasion (OII oracle)"
BASELINES = ("no-signal", "full-disclosure", "fixed-price")
WINDOW = 100  # arrivals per point of the error curves
# SimulationResult fields of the estimates' errors (§9 D1) and their labels.
ERRORS = (("theta_error", "|θ̂ − θ| (GHz)"), ("mu_error", "|μ̂ − μ|"), ("type_error", "‖F̂ − F‖₁"))


def run_all(config: SimulationConfig, seeds: range) -> dict[str, list[SimulationResult]]:
    """Every scheme and the OII oracle on each seed."""
    runs = {scheme: [simulate_scheme(scheme, config, seed) for seed in seeds] for scheme in SCHEMES}
    runs[OII] = [simulate_scheme("persuasion", replace(config, tii=False), seed) for seed in seeds]
    return runs


def window_means(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means over consecutive windows of ``WINDOW`` arrivals, at the windows' last arrival."""
    n = values.shape[-1] // WINDOW
    return WINDOW * np.arange(1, n + 1), values[..., : n * WINDOW].reshape(*values.shape[:-1], n, WINDOW).mean(-1)


def utility_table(runs: dict[str, list[SimulationResult]]) -> str:
    lines = [
        "| scheme | cumulative utility (mean ± sd) | participation | budget spent |",
        "|---|---:|---:|---:|",
    ]
    final = {s: np.array([r.cumulative_utility[-1] for r in rs]) for s, rs in runs.items()}
    for scheme, results in runs.items():
        part = np.mean([r.participation_rate[-1] for r in results])
        spent = np.mean([r.spent[-1] / r.budget for r in results])
        lines.append(f"| {scheme} | {final[scheme].mean():.2f} ± {final[scheme].std():.2f} | {part:.3f} | {spent:.1%} |")
    mean = {s: values.mean() for s, values in final.items()}
    best = max(BASELINES, key=mean.get)
    ordered = (final["persuasion"] > np.max([final[b] for b in BASELINES], axis=0)) & (final["persuasion"] < final[OII])
    regimes = sum((Counter(r.regime_counts()) for r in runs["persuasion"]), Counter())
    lines += [
        "",
        f"Gain of persuasion over the best non-oracle scheme ({best}): "
        f"{(mean['persuasion'] / mean[best] - 1):.1%}. "
        f"Price of TII (OII oracle − persuasion): {mean[OII] - mean['persuasion']:.2f} "
        f"({1 - mean['persuasion'] / mean[OII]:.1%} of the oracle's utility). "
        f"Baselines < persuasion < OII oracle on {ordered.sum()} of {ordered.size} seeds.",
        "",
        "Regimes committed by persuasion (all seeds): " + ", ".join(f"{k} {v}" for k, v in sorted(regimes.items())),
    ]
    return "\n".join(lines)


def error_table(results: list[SimulationResult]) -> str:
    """Estimation errors of persuasion's server, early against late (§9 D1, §10 estimators)."""
    horizon = results[0].theta_error.size
    lines = ["| estimate | arrivals 1–200 | last 200 arrivals |", "|---|---:|---:|"]
    for name, label in ERRORS:
        values = np.array([getattr(r, name) for r in results])
        early, late = values[:, :200].mean(), values[:, horizon - 200:].mean()
        lines.append(f"| {label} | {early:.3f} | {late:.3f} |")
    return "\n".join(lines)


def plot(runs: dict[str, list[SimulationResult]], out: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0, 0]
    persuasion = runs["persuasion"]
    for name, label in ERRORS:
        x, y = window_means(np.array([getattr(r, name) for r in persuasion]).mean(axis=0))
        ax.loglog(x, y, marker=".", label=label)
    x = np.array([WINDOW, x[-1]], dtype=float)
    ax.loglog(x, 0.5 * np.sqrt(WINDOW / x), "k--", lw=0.8, label="∝ 1/√n")
    ax.set(xlabel="arrivals", ylabel=f"mean error over {WINDOW} arrivals", title="D1: estimates (persuasion)")
    ax.legend(fontsize=7)
    for ax, key, ylabel in (
        (axes[0, 1], "cumulative_utility", "cumulative server utility"),
        (axes[1, 0], "participation_rate", "participation rate"),
        (axes[1, 1], "spent", "budget spent / B"),
    ):
        for scheme, results in runs.items():
            values = np.array([getattr(r, key) / (r.budget if key == "spent" else 1.0) for r in results])
            ax.plot(np.arange(1, values.shape[1] + 1), values.mean(axis=0), label=scheme,
                    ls="--" if scheme in (OII, "full-information") else "-")
        ax.set(xlabel="arrivals", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0, 1].set_title("D2: server utility (mean over seeds)")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--arrivals", type=int, default=5000)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synthetic.png"))
    args = parser.parse_args()
    config = SimulationConfig(num_clients=args.clients, horizon=args.arrivals)
    runs = run_all(config, range(args.seeds))
    print(f"N = {args.clients} clients, T = {args.arrivals} arrivals, seeds 0–{args.seeds - 1}\n")
    print(utility_table(runs) + "\n")
    print(error_table(runs["persuasion"]))
    plot(runs, args.out)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
