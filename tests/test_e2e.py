"""End to end through the real CLI and Flower's simulation runtime on Ray (tiny runs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedlr import config
from fedlr.data import load_federated_data
from fedlr.models import build_model
from fedlr.results import REQUIRED_METRICS
from tests.conftest import TINY, read_jsonl, run_cli

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    root = tmp_path_factory.mktemp("tiny")
    cfg_path = root / "tiny.toml"
    cfg_path.write_text(TINY)
    out = root / "run"
    return cfg_path, out, run_cli("run", str(cfg_path), "--out", str(out))


def _model_nbytes(cfg_path: Path) -> int:
    cfg = config.load(cfg_path)
    data = load_federated_data(cfg)
    model = build_model(cfg, data.input_shape, data.num_classes)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_run_writes_every_contract_file_and_learns(tiny) -> None:
    cfg_path, out, proc = tiny
    assert proc.returncode == 0, proc.stderr
    assert f"results: {out.resolve()}" in proc.stdout
    for name in ("config.toml", "metrics.jsonl", "summary.json", "plots/accuracy_vs_round.png",
                 "plots/accuracy_vs_bytes.png"):
        assert (out / name).is_file(), name
    assert config.load(out / "config.toml") == config.load(cfg_path)  # resolved config reproduces the run

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(set(REQUIRED_METRICS) <= set(r) for r in rows)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.1  # beats the untrained model
    assert all(r["clients"] == 2 for r in rows[1:])

    # Bytes are what travelled: FedAvg sends the whole model to and from each client.
    per_client = _model_nbytes(cfg_path)
    assert all(r["bytes_down"] == r["bytes_up"] == 2 * per_client for r in rows[1:])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedavg" and summary["rounds"] == 2
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
    assert summary["best_accuracy"] == max(r["test_accuracy"] for r in rows[1:])
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert "round 2/2  acc" in proc.stderr  # live per-round progress


def test_same_seed_gives_identical_metrics(tiny, tmp_path: Path) -> None:
    cfg_path, out, _ = tiny
    again = run_cli("run", str(cfg_path), "--out", str(tmp_path / "again"), "--set", "simulation.num_cpus=2")
    assert again.returncode == 0, again.stderr
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(read_jsonl(tmp_path / "again" / "metrics.jsonl")) == strip(read_jsonl(out / "metrics.jsonl"))


def test_client_exception_fails_the_run_naming_the_client(tiny_config: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(tiny_config), "--out", str(tmp_path / "f"), "--set", "clients_per_round=4",
                   "--set", "faults.client=3", "--set", "faults.round=2")
    assert proc.returncode == 1
    assert "\nfedlr: run failed: round 2 (1 failed, max_failures = 0): client 3 failed:\n" in proc.stderr
    assert "InjectedFault: faults.client = 3: injected failure in round 2" in proc.stderr
    rows = read_jsonl(tmp_path / "f" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]  # completed rounds are kept
    status = json.loads((tmp_path / "f" / "status.json").read_text())
    assert status["status"] == "failed" and "client 3 failed" in status["error"]


def test_sweep_and_report(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    proc = run_cli("sweep", str(tiny_config), "--grid", "lr=0.05,0.2", "--set", "rounds=1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = (out / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("run,lr,final_accuracy") and len(lines) == 3
    assert (out / "plots" / "accuracy_vs_total_bytes.png").is_file()
    report = run_cli("report", str(out))
    assert report.returncode == 0
    assert report.stdout.count("| fedavg | mnist1d | 1 |") == 2
    # Re-running the sweep trains nothing: both runs are cached by resolved config.
    again = run_cli("sweep", str(tiny_config), "--grid", "lr=0.05,0.2", "--set", "rounds=1", "--out", str(out))
    assert again.returncode == 0 and again.stderr.count("skipped") == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_same_app_runs_under_flwr_run(tiny, tmp_path: Path) -> None:
    """`flwr run .` (managed local SuperLink, simulation) runs the same ServerApp and
    ClientApp and writes the same metrics as `fedlr run`."""
    cfg_path, sim_out, _ = tiny
    out = tmp_path / "flwr"
    ports = (_free_port(), _free_port())
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
        "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1]),
    }
    root = Path(__file__).resolve().parents[1]
    flwr = Path(sys.executable).with_name("flwr")
    try:
        proc = subprocess.run(
            [str(flwr), "run", ".", "--stream", "--federation-config", "num-supernodes=4",
             "-c", f"config='{cfg_path}' out='{out}'"],
            cwd=root, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        subprocess.run(["pkill", "-f", f"control-api-address 127.0.0.1:{ports[1]}"], check=False)
    # flwr run exits 0 even when the run fails: trust status.json, not the exit code.
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed", proc.stdout[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(read_jsonl(out / "metrics.jsonl")) == strip(read_jsonl(sim_out / "metrics.jsonl"))
