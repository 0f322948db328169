"""Reliability: kill and resume, client failures within max_failures, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, read_jsonl, run_cli

pytestmark = pytest.mark.ray

# FedAdam keeps server state (moments) that a resume must restore exactly.
RESUMABLE = TINY.replace('method = "fedavg"', 'method = "fedadam"').replace("rounds = 2", "rounds = 5")


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def _kill_after_round(cfg: Path, out: Path, after_round: int) -> None:
    """Start a run and SIGKILL its whole process group (Ray included) as soon as
    ``after_round`` is in metrics.jsonl, i.e. while the next round is running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlr.cli", "run", str(cfg), "--out", str(out), "--quiet"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[1],
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").is_file() else []
            if rows and rows[-1]["round"] >= after_round:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(RESUMABLE)
    full = run_cli("run", str(cfg), "--out", str(tmp_path / "full"), "--quiet")
    assert full.returncode == 0, full.stderr

    killed = tmp_path / "killed"
    _kill_after_round(cfg, killed, after_round=2)
    rows = read_jsonl(killed / "metrics.jsonl")
    assert 2 <= rows[-1]["round"] < 5, "the kill must land before the run completes"
    assert json.loads((killed / "status.json").read_text())["status"] == "running"

    resumed = run_cli("run", "--resume", str(killed), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert _strip(read_jsonl(killed / "metrics.jsonl")) == _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    summary = json.loads((killed / "summary.json").read_text())
    reference = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "wall_s"} == {k: v for k, v in reference.items() if k != "wall_s"}

    again = run_cli("run", "--resume", str(killed))
    assert again.returncode == 0 and "already completed" in again.stdout


def test_hung_client_within_max_failures_is_dropped_and_recorded(tiny_config: Path, tmp_path: Path) -> None:
    proc = run_cli("run", str(tiny_config), "--out", str(tmp_path / "h"), "--set", "clients_per_round=4",
                   "--set", "faults.client=2", "--set", "faults.kind=hang", "--set", "max_failures=1",
                   "--set", "simulation.round_timeout=5")
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(tmp_path / "h" / "metrics.jsonl")
    assert rows[1]["failed_clients"] == [2] and rows[1]["clients"] == 3
    assert "failed_clients" not in rows[2] and rows[2]["clients"] == 4


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(TINY)
    proc = run_cli("run", "--resume", str(run_dir), "--set", "lr=0.3")
    assert proc.returncode == 2
    assert proc.stderr == (
        f"fedlr: error: --resume {run_dir}: the run used lr = 0.1 but the given config has 0.3; "
        "resume with the run's own config (omit CONFIG and --set)\n"
    )
    missing = run_cli("run", "--resume", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr == f"fedlr: error: --resume {tmp_path / 'nope'}: no config.toml there; not a fedlr run directory\n"


def test_unwritable_output_exits_2(tiny_config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_cli("run", str(tiny_config), "--out", str(blocker / "sub"))
    assert proc.returncode == 2
    assert proc.stderr == f"fedlr: error: --out {blocker / 'sub'}: cannot write there (Not a directory)\n"


def test_checkpoints_round_trip_and_torch_saved_ones_still_load(tmp_path: Path) -> None:
    import io

    import numpy as np
    import torch

    from fedlr.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    state = {"m": torch.ones(3), "log": [1, 2]}
    save_checkpoint(tmp_path, 7, arrays, state)
    got = load_checkpoint(tmp_path)
    assert got["round"] == 7 and np.array_equal(got["arrays"]["w"], arrays["w"])
    assert torch.equal(got["strategy"]["m"], state["m"]) and got["strategy"]["log"] == [1, 2]
    buf = io.BytesIO()
    torch.save({"round": 3, "arrays": arrays, "strategy": {}}, buf)  # what earlier versions wrote
    (tmp_path / CHECKPOINT).write_bytes(buf.getvalue())
    old = load_checkpoint(tmp_path)
    assert old["round"] == 3 and np.array_equal(old["arrays"]["w"], arrays["w"])


def test_several_clients_per_actor_call_change_no_metric(tiny_config: Path, tmp_path: Path) -> None:
    # Eight clients on two actors: four calls of two (fedlr.engine.plan_calls), against Flower's one per call.
    common = ("--set", "num_clients=8", "--set", "clients_per_round=8")
    calls = run_cli("run", str(tiny_config), "--out", str(tmp_path / "calls"), "--quiet", *common)
    single = run_cli("run", str(tiny_config), "--out", str(tmp_path / "single"), "--quiet", *common,
                     "--set", "simulation.clients_per_call=1")
    assert calls.returncode == 0 and single.returncode == 0, calls.stderr + single.stderr
    assert _strip(read_jsonl(tmp_path / "calls" / "metrics.jsonl")) == _strip(read_jsonl(tmp_path / "single" / "metrics.jsonl"))


def test_a_client_failing_inside_a_call_costs_only_itself(tiny_config: Path, tmp_path: Path) -> None:
    # Equal partitions on two actors: calls [0, 4], [1, 5], [2, 6], [3, 7]. Client 1
    # fails first in its call (client 5 is sent again), client 5 second.
    for failing in (1, 5):
        out = tmp_path / f"f{failing}"
        proc = run_cli("run", str(tiny_config), "--out", str(out), "--quiet", "--set", "num_clients=8",
                       "--set", "clients_per_round=8", "--set", f"faults.client={failing}", "--set", "max_failures=1")
        assert proc.returncode == 0, proc.stderr
        rows = read_jsonl(out / "metrics.jsonl")
        assert rows[1]["failed_clients"] == [failing] and rows[1]["clients"] == 7
        assert "failed_clients" not in rows[2] and rows[2]["clients"] == 8
