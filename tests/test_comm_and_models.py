"""Byte accounting equals the arrays' nbytes; models build and keep their contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlr import config
from fedlr.comm import record_nbytes
from fedlr.models import build_model


def test_record_bytes_equal_numpy_nbytes() -> None:
    arrays = {"a": np.zeros((3, 5), np.float32), "b": np.ones(7, np.float64), "c": np.arange(4, dtype=np.int64)}
    rec = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
        "more": ArrayRecord([np.zeros((2, 2), np.float16)]),
        "config": ConfigRecord({"x": 1}),
        "metrics": MetricRecord({"num-examples": 3}),
    })
    assert record_nbytes(rec) == sum(v.nbytes for v in arrays.values()) + 8


@pytest.mark.parametrize(
    ("dataset", "model", "shape"),
    [("mnist1d", "mlp", (1, 40)), ("mnist1d", "cnn1d", (1, 40)), ("digits", "cnn", (1, 8, 8)),
     ("digits", "cnn4", (1, 8, 8)), ("hf:cifar10", "cnn4", (3, 32, 32))],
)
@pytest.mark.parametrize("norm", ["none", "group", "batch"])
def test_models_forward_and_are_seeded(dataset: str, model: str, shape: tuple, norm: str) -> None:
    cfg = config.resolve({"dataset": dataset, "model": model, "norm": norm})
    net, twin = build_model(cfg, shape, 10), build_model(cfg, shape, 10)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    assert net(torch.zeros(4, *shape)).shape == (4, 10)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert has_bn == (norm == "batch" and model != "mlp")


def test_mlp_matches_the_fedmud_spec_size() -> None:
    net = build_model(config.resolve({}), (1, 40), 10)  # 40-256-256-10
    assert sum(p.numel() for p in net.parameters()) == 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
