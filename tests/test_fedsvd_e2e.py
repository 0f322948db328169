"""FedSVD with DP-SGD end to end through the ``fedlr`` CLI on Flower's Ray simulation
(Lee et al., NeurIPS 2025, arXiv 2505.12805; ``shared/specs/fedsvd.md`` §2, §3, §7).

Tiny on purpose (digits 5-9 on a W₀ pretrained on 0-4, 4 clients, 2 per round,
2 rounds, ε = 6): it checks what only real Ray actors exercise — the pretrained
W₀ cached before Ray and loaded by every actor, the privacy ledger in each
client's ``context.state`` while partitions move between actors, and the
per-round diagnostics and ε reaching ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlr import config as config_mod
from fedlr.results import REQUIRED_METRICS
from tests.conftest import read_jsonl, run_cli

CONFIG = """\
method = "fedsvd"
dataset = "digits"
model = "mlp"
width = 32
seed = 1
rounds = 2
num_clients = 4
clients_per_round = 2
partition = "iid"
batch_size = 32
lr = 0.5

[data]
classes = "5-9"

[fedsvd]
rank = 4
pretrain_epochs = 5

[privacy]
mechanism = "dpsgd"
epsilon = 6.0
"""


@pytest.mark.ray
def test_fedsvd_with_dp_sgd_through_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "fedsvd.toml"
    path.write_text(CONFIG)
    out = tmp_path / "run"
    proc = run_cli("run", str(path), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]

    for name in ("config.toml", "metrics.jsonl", "summary.json", "plots/accuracy_vs_round.png",
                 "plots/accuracy_vs_bytes.png"):
        assert (out / name).is_file(), name
    cfg = config_mod.load(out / "config.toml")
    assert cfg == config_mod.load(path)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(set(REQUIRED_METRICS) <= set(r) for r in rows)
    trained = rows[1:]
    for r in trained:
        assert r["clients"] == 2
        assert r["orthonormality_error"] <= 1e-4  # FedSVD re-factorizes every round (svd_period = 1)
        assert r["reconstruction_error"] <= 1e-4
        assert "train_loss" not in r  # not sent under DP
        # Up: B only, 4·Σ d_out·r bytes per client (layers 64→32 and 32→32, r = 4); down: A and B.
        assert r["bytes_up"] == 2 * 4 * (32 * 4 + 32 * 4)
        assert r["bytes_down"] == 2 * 4 * (32 * 4 + 32 * 4 + 4 * 64 + 4 * 32)
    assert 0 < trained[0]["epsilon"] <= trained[1]["epsilon"] <= 6.0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "fedsvd" and summary["rounds"] == 2
    assert summary["epsilon"] == trained[1]["epsilon"]
