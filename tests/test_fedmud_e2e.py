"""FedMUD end to end through the ``fedlr`` CLI on Flower's Ray simulation
(Li et al., ICML 2025, arXiv 2505.23176; ``shared/specs/fedmud.md`` §3, §7).

Tiny on purpose (digits, 4 clients, 2 per round, 3 rounds): what it checks is
the protocol across real Ray actors — client state surviving in
``context.state`` while partitions move between actors (a lost base makes the
client fail the run), the measured bytes, AAD's exact merge — and that the
model learns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlr import config as config_mod
from fedlr.data import load_federated_data
from fedlr.models import build_model
from fedlr.results import REQUIRED_METRICS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_fedmud_run_through_the_cli(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("fedmud-e2e")
    cache = tmp_path_factory.mktemp("cache")
    overrides = {
        "method": "fedmud", "dataset": "digits", "seed": 0, "rounds": 3, "num_clients": 4, "clients_per_round": 2,
        "partition": "iid", "local_epochs": 2, "batch_size": 32, "lr": 0.01,
    }
    cfg = config_mod.resolve(overrides)
    path = tmp / "fedmud.toml"
    path.write_text(config_mod.dumps(cfg))
    out = tmp / "run"
    env = {**os.environ, "FEDLR_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedlr.cli", "run", str(path), "--out", str(out), "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    for name in ("config.toml", "metrics.jsonl", "summary.json", "plots/accuracy_vs_round.png",
                 "plots/accuracy_vs_bytes.png"):
        assert (out / name).is_file(), name
    assert config_mod.load(out / "config.toml") == cfg
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(k in r for r in rows for k in REQUIRED_METRICS)

    trained = rows[1:]
    assert all(0 <= r["aggregation_error"] <= 1e-5 for r in trained)  # AAD: exact up to float32
    # FedAvg would upload (and download) the whole plain model per client.
    data = load_federated_data(cfg)
    dense_bytes = 4 * sum(p.numel() for p in build_model(cfg, data.input_shape, data.num_classes).parameters())
    for r in trained:
        assert r["clients"] == 2
        assert 0 < r["bytes_up"] <= 2 * dense_bytes / 16
        assert 0 < r["bytes_down"] < 2 * dense_bytes  # catch-up logs are cheaper than W here

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedmud" and summary["rounds"] == 3
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["final_accuracy"] > rows[0]["test_accuracy"] + 0.2
