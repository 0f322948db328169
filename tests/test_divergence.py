"""A run whose global model goes non-finite stops as "diverged" instead of completing on NaN.

``FedlrStrategy.run_rounds`` drives FedAvg against the real dense client
(``clients.trainer.train_dense``) through Flower messages built in-process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from clients.trainer import train_dense
from fedlr import config as config_mod
from fedlr.data import load_federated_data
from fedlr.models import build_model
from strategies import build_strategy
from strategies.base import Diverged, non_finite_arrays
from tests.conftest import NODE_OFFSET, LocalGrid

pytestmark = pytest.mark.usefixtures("isolated_flower")


def run(lr: float) -> list[dict[str, Any]]:
    cfg = config_mod.resolve({
        "method": "fedavg", "dataset": "digits", "width": 16, "seed": 0, "rounds": 3, "num_clients": 4,
        "clients_per_round": 2, "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": lr,
    })
    data = load_federated_data(cfg)
    strategy = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
    model = build_model(cfg, data.input_shape, data.num_classes)
    rows: list[dict[str, Any]] = []
    strategy.run_rounds(
        LocalGrid(cfg, train_dense), ArrayRecord(model.state_dict()), lambda t, arrays: {"test_accuracy": 0.0},
        lambda t, arrays, row: rows.append(row),
    )
    return rows


def test_a_diverging_run_raises_before_recording_a_non_finite_round() -> None:
    with pytest.raises(Diverged, match=r"^round 1: the global model diverged \(non-finite values in net\.\d+\.weight"):
        run(lr=1e30)


def test_a_sane_run_is_not_flagged() -> None:
    assert [r["round"] for r in run(lr=0.05)] == [1, 2, 3]


def test_non_finite_arrays_names_exactly_the_bad_entries() -> None:
    arrays = ArrayRecord({"a": torch.zeros(3), "b": torch.tensor([1.0, np.inf]), "c": torch.tensor([np.nan])})
    assert non_finite_arrays(arrays) == ["b", "c"]
