"""Datasets and partitioners: coverage, disjointness, heterogeneity, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlr import config
from fedlr.data import DatasetUnavailable, load_federated_data, partition_indices
from tests.conftest import run_cli


def _labels(n: int = 3000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def _cfg(**kw) -> dict:
    return config.resolve(kw)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_the_train_set(partition: str) -> None:
    y = _labels()
    parts = partition_indices(y, _cfg(partition=partition, num_clients=20, alpha=0.3, classes_per_client=3))
    assert len(parts) == 20
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))  # disjoint
    if partition != "pathological":  # pathological drops nothing either, but only if every class is assigned
        assert sorted(flat.tolist()) == list(range(len(y)))
    assert all(len(p) > 0 for p in parts)


def test_iid_sizes_are_balanced() -> None:
    parts = partition_indices(_labels(), _cfg(partition="iid", num_clients=30))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = _labels()

    def mean_tv(alpha: float) -> float:
        parts = partition_indices(y, _cfg(partition="dirichlet", num_clients=20, alpha=alpha))
        glob = np.bincount(y, minlength=10) / len(y)
        return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=10) / len(p) - glob).sum() for p in parts]))

    assert mean_tv(0.1) > mean_tv(1.0) > mean_tv(100.0)
    assert mean_tv(100.0) < 0.15


def test_pathological_limits_classes_per_client() -> None:
    y = _labels()
    parts = partition_indices(y, _cfg(partition="pathological", num_clients=20, classes_per_client=2))
    assert max(len(set(y[p].tolist())) for p in parts) == 2


def test_same_seed_same_partitions_other_seed_differs() -> None:
    y = _labels()
    a = partition_indices(y, _cfg(partition="dirichlet", num_clients=10, seed=3))
    b = partition_indices(y, _cfg(partition="dirichlet", num_clients=10, seed=3))
    c = partition_indices(y, _cfg(partition="dirichlet", num_clients=10, seed=4))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_too_many_clients_for_dirichlet_is_a_clear_error() -> None:
    y = _labels(50)
    with pytest.raises(DatasetUnavailable, match=r"^partition = 'dirichlet' failed for 40 clients"):
        partition_indices(y, _cfg(partition="dirichlet", num_clients=40, alpha=0.05, **{"data.min_partition_size": 2}))


def test_digits_is_offline_scaled_and_stratified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLR_CACHE", str(tmp_path))
    data = load_federated_data(_cfg(dataset="digits", num_clients=10, partition="iid"))
    assert data.x_train.shape == (1437, 1, 8, 8) and data.x_test.shape == (360, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert np.bincount(data.y_test).min() >= 35  # stratified: every digit in the test set


def test_mnist1d_is_procedural_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLR_CACHE", str(tmp_path))
    cfg = _cfg(num_clients=5, clients_per_round=2, **{"data.num_samples": 500})
    state = np.random.get_state()
    data = load_federated_data(cfg)
    assert np.array_equal(np.random.get_state()[1], state[1])  # global RNG untouched
    assert data.x_train.shape == (400, 1, 40) and data.x_test.shape == (100, 1, 40)
    cached = list(tmp_path.glob("data-*.npz"))
    assert len(cached) == 1
    from fedlr import data as data_mod

    data_mod._MEMO.clear()
    again = load_federated_data(cfg)  # from the disk cache
    assert np.array_equal(again.x_train, data.x_train)
    assert all(np.array_equal(p, q) for p, q in zip(again.partitions, data.partitions))


def test_hub_dataset_offline_fails_fast_in_one_line(tiny_config: Path, tmp_path: Path) -> None:
    # A fresh process, as a user runs it: no HF_HUB_OFFLINE set, no network here.
    import time

    t0 = time.monotonic()
    proc = run_cli("run", str(tiny_config), "--set", "dataset=hf:ylecun/mnist", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "fedlr: run failed: dataset = 'hf:ylecun/mnist' could not be loaded from the Hugging Face Hub (offline or unknown id?): "
    )
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 20  # no 25 s of retries against an unreachable host
