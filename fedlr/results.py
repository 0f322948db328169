"""Run directories: resolved config, per-round metrics, summary, plots, progress.

Layout (``shared/CONTRACT.md``)::

    DIR/config.toml      the fully resolved configuration
    DIR/metrics.jsonl    one JSON object per round, appended as the round completes
    DIR/summary.json     one JSON object for the run
    DIR/plots/*.png      accuracy against round and against cumulative bytes
    DIR/status.json      running / completed / failed (with the error)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedlr import config as config_mod
from fedlr.config import Config

REQUIRED_METRICS = ("round", "test_accuracy", "test_loss", "bytes_up", "bytes_down", "clients", "wall_s")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Replace ``path`` atomically: a crash leaves the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunRecorder:
    """Writes one run's outputs as it progresses and prints a live line per round."""

    def __init__(self, out: str | Path, cfg: Config, quiet: bool = False) -> None:
        self.out = Path(out)
        self.cfg = cfg
        self.quiet = quiet
        (self.out / "plots").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        prefetch_pyplot()

    # -------------------------------------------------------------- lifecycle
    def start(self, resume_rows: list[dict[str, Any]] | None = None) -> None:
        """Write the config; on resume keep the rows already recorded."""
        write_atomic(self.out / "config.toml", config_mod.dumps(self.cfg))
        self.rows = list(resume_rows or [])
        write_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        self.set_status("running")
        if self.rows:
            self.t0 -= self.rows[-1]["wall_s"]  # wall_s keeps counting from the first session

    def set_status(self, status: str, error: str | None = None) -> None:
        payload: dict[str, Any] = {"status": status}
        if error:
            payload["error"] = error
        write_atomic(self.out / "status.json", json.dumps(payload, indent=2) + "\n")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics durably, then print the progress line."""
        missing = [k for k in REQUIRED_METRICS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        self.rows.append(row)
        with (self.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if not self.quiet:
            print(progress_line(row, self.cfg["rounds"]), file=sys.stderr, flush=True)

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` and the plots; mark the run completed."""
        summary = summarize(self.cfg, self.rows, extra)
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plot_run(self.rows, self.out / "plots", title=f"{self.cfg['method']} on {self.cfg['dataset']}")
        self.set_status("completed")
        return summary


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def progress_line(row: dict[str, Any], rounds: int) -> str:
    parts = [
        f"round {row['round']:>{len(str(rounds))}}/{rounds}",
        f"acc {row['test_accuracy']:.4f}",
        f"loss {row['test_loss']:.4f}",
        f"up {_mb(row['bytes_up'])}",
        f"down {_mb(row['bytes_down'])}",
    ]
    if "epsilon" in row:
        parts.append(f"eps {row['epsilon']:.3f}")
    if "server_utility" in row:
        parts.append(f"price {row['price']:.4f} util {row['server_utility']:.4f}")
    parts.append(f"{row['wall_s']:.1f}s")
    return "  ".join(parts)


def summarize(cfg: Config, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    trained = [r for r in rows if r["round"] >= 1]
    accs = [r["test_accuracy"] for r in trained] or [rows[-1]["test_accuracy"]]
    summary: dict[str, Any] = {
        "method": cfg["method"],
        "dataset": cfg["dataset"],
        "rounds": len(trained),
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "initial_accuracy": rows[0]["test_accuracy"] if rows and rows[0]["round"] == 0 else None,
        "total_bytes_up": sum(r["bytes_up"] for r in rows),
        "total_bytes_down": sum(r["bytes_down"] for r in rows),
        "wall_s": rows[-1]["wall_s"] if rows else 0.0,
    }
    if any("epsilon" in r for r in rows):
        summary["epsilon"] = max(r.get("epsilon", 0.0) for r in rows)
    # DaringFed (shared/specs/daringfed.md §2): both are cumulative, so the last arrival's value is the run's.
    for key in ("server_utility", "participation_rate"):
        if key in rows[-1]:
            summary[key] = rows[-1][key]
    if extra:
        summary.update(extra)
    return summary


# ------------------------------------------------------------------- plots
def prefetch_pyplot() -> None:
    """Import matplotlib in the background: a run draws its plots at the end, and
    the import (≈ 0.6 s) then overlaps the wait for the client actors instead."""

    def load() -> None:
        try:
            _pyplot()
        except Exception:  # noqa: BLE001 - a failed prefetch only means plot_run imports it itself
            pass

    threading.Thread(target=load, name="fedlr-pyplot-prefetch", daemon=True).start()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(rows: list[dict[str, Any]], plots: Path, title: str = "") -> None:
    """``accuracy_vs_round.png`` and ``accuracy_vs_bytes.png`` for one run."""
    plot_curves({title or "run": rows}, plots)


def plot_curves(runs: dict[str, list[dict[str, Any]]], plots: Path) -> None:
    """Overlay several runs' accuracy curves (against round and cumulative bytes)."""
    plt = _pyplot()
    plots.mkdir(parents=True, exist_ok=True)
    for x_key, fname, xlabel in (
        ("round", "accuracy_vs_round.png", "round"),
        ("cum_bytes", "accuracy_vs_bytes.png", "cumulative bytes (up + down)"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in runs.items():
            cum, xs = 0, []
            for r in rows:
                cum += r["bytes_up"] + r["bytes_down"]
                xs.append(r["round"] if x_key == "round" else cum)
            ax.plot(xs, [r["test_accuracy"] for r in rows], marker=".", label=label)
        if x_key == "cum_bytes":
            ax.set_xscale("symlog")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        # Fixed margins that fit these labels at this size: tight_layout draws
        # every tick label once more to measure it (half of the plotting time
        # at the end of each run).
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.96)
        fig.savefig(plots / fname, dpi=110)
        plt.close(fig)


def plot_tradeoff(points: list[dict[str, Any]], out: Path, x_key: str, label_key: str) -> None:
    """Scatter of final accuracy against a cost (``x_key``), one point per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        if p.get(x_key) is None or p.get("final_accuracy") is None:
            continue
        ax.scatter(p[x_key], p["final_accuracy"])
        ax.annotate(str(p[label_key]), (p[x_key], p["final_accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(x_key)
    ax.set_ylabel("final test accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
