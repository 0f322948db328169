"""The FedMUD ablation table of README.md from run directories.

Adds to ``fedlr report`` what the ablation is about: upload compression
against the FedAvg run of the same dataset and partition, the realized ratio
(spec §2.3) and the mean ``aggregation_error`` (§7). Run names follow
``run_ablation.sh``: ``<dataset>-<partition>-<variant>``.

Usage: python experiments/fedmud/table.py results/fedmud-ablation
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlr import config as config_mod
from fedlr.data import load_federated_data
from fedlr.lowrank.fedmud import MUDLayout, build_mud_model
from fedlr.results import read_metrics, summarize


def realized_ratio(run: Path) -> float | None:
    cfg = config_mod.load(run / "config.toml")
    if cfg["method"] != "fedmud":
        return None
    data = load_federated_data(cfg)
    return MUDLayout.of(build_mud_model(cfg, data.input_shape, data.num_classes)).realized_ratio


def main(root: Path) -> str:
    runs = sorted(d for d in root.iterdir() if (d / "summary.json").is_file())
    rows = {}
    for run in runs:
        metrics = read_metrics(run)
        s = summarize(config_mod.load(run / "config.toml"), metrics)
        errors = [r["aggregation_error"] for r in metrics if "aggregation_error" in r]
        rows[run.name] = (s, sum(errors) / len(errors) if errors else None, realized_ratio(run))
    lines = [
        "| dataset | partition | variant | final acc | best acc | up/round | down/round | up vs FedAvg "
        "| realized ratio | mean agg. error | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (s, err, ratio) in rows.items():
        dataset, partition, variant = name.split("-", 2)
        fedavg = rows.get(f"{dataset}-{partition}-fedavg")
        n = s["rounds"]
        up, down = s["total_bytes_up"] / n, s["total_bytes_down"] / n
        factor = f"{fedavg[0]['total_bytes_up'] / fedavg[0]['rounds'] / up:.1f}x" if fedavg else "–"
        lines.append(
            f"| {dataset} | {partition} | {variant} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} "
            f"| {up / 1e3:.1f} kB | {down / 1e3:.1f} kB | {factor} | {'–' if ratio is None else f'{ratio:.4f}'} "
            f"| {'–' if err is None else f'{err:.1e}'} | {s['wall_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/fedmud-ablation")))
