"""The FedSVD study's table (experiments/fedsvd/README.md) from run.sh's two sweeps.

One row per method, one column per privacy setting (ε = 3, ε = 6, none): the
final test accuracy, the best over rounds in parentheses. Then, per run, what
the table rests on: the accuracy of W₀ before fine-tuning (round 0), the
largest client ε reported, the upload per round, and the largest
``orthonormality_error`` / ``reconstruction_error`` / ``aggregation_error``
over rounds (see ``strategies/fedsvd.py`` for what each means per method).

Usage: python experiments/fedsvd/table.py results/fedsvd
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlr import config as config_mod
from fedlr.config import LORA_METHODS
from fedlr.results import read_metrics, summarize

SETTINGS = ("3.0", "6.0", "none")


def _setting(cfg: config_mod.Config) -> str:
    return str(cfg["privacy.epsilon"]) if cfg["privacy.mechanism"] == "dpsgd" else "none"


def main(root: Path) -> str:
    runs = sorted(d.parent for d in root.glob("*/*/summary.json"))
    results: dict[tuple[str, str], tuple[dict, list[dict]]] = {}
    for run in runs:
        cfg = config_mod.load(run / "config.toml")
        rows = read_metrics(run)
        results[cfg["method"], _setting(cfg)] = (summarize(cfg, rows), rows)
    head = ["| method | " + " | ".join(f"ε = {s[:-2]}" if s != "none" else "no DP" for s in SETTINGS) + " |",
            "|---|" + "---:|" * len(SETTINGS)]
    for method in LORA_METHODS[::-1]:  # baselines first, as in the paper's tables
        cells = []
        for setting in SETTINGS:
            s = results.get((method, setting), (None,))[0]
            cells.append(f"{s['final_accuracy']:.3f} ({s['best_accuracy']:.3f})" if s else "–")
        head.append(f"| {method} | " + " | ".join(cells) + " |")
    detail = [
        "| run | W₀ acc | ε reported | up/round | max orthonormality err. | max reconstruction err. "
        "| max aggregation err. | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, setting), (s, rows) in sorted(results.items()):
        trained = rows[1:]
        worst = {k: max(r[k] for r in trained) for k in ("orthonormality_error", "reconstruction_error",
                                                          "aggregation_error")}
        eps = f"{s['epsilon']:.3f}" if "epsilon" in s else "–"
        detail.append(
            f"| {method}, {'no DP' if setting == 'none' else 'ε = ' + setting[:-2]} | {s['initial_accuracy']:.3f} "
            f"| {eps} | {s['total_bytes_up'] / s['rounds'] / 1e3:.1f} kB | {worst['orthonormality_error']:.1e} "
            f"| {worst['reconstruction_error']:.1e} | {worst['aggregation_error']:.1e} | {s['wall_s']:.0f} |"
        )
    return "\n".join(head) + "\n\n" + "\n".join(detail)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/fedsvd")))
