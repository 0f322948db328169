"""Datasets and federated partitions, held in memory as NumPy arrays.

Offline sets: MNIST-1D generated procedurally with ``mnist1d.data.make_dataset``
(never its download path) and scikit-learn's bundled ``digits``. Online sets:
``hf:<hub id>`` through flwr-datasets. Partitioners come from flwr-datasets and
are applied in memory to a tiny index table, so every dataset uses the same code.

Generating MNIST-1D and running the partitioner takes seconds, so the result is
cached on disk (``$FEDLR_CACHE``, default ``~/.cache/fedlr``) under a hash of
the data-relevant keys, and memoised per process: each Ray actor loads it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlr.config import Config, parse_classes

DATA_KEYS = (
    "dataset", "seed", "num_clients", "partition", "alpha", "classes_per_client",
    "data.num_samples", "data.test_fraction", "data.min_partition_size", "data.classes",
)
# The keys that determine the whole dataset before any class selection or partitioning.
RAW_KEYS = ("dataset", "seed", "data.num_samples", "data.test_fraction")


class DatasetUnavailable(RuntimeError):
    """A dataset could not be obtained (typically: a hub dataset while offline)."""


@dataclass
class FederatedData:
    """Train/test arrays plus one index array per client (partition id)."""

    x_train: np.ndarray  # float32, (N, *input_shape)
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    partitions: list[np.ndarray]  # partition id -> indices into the train set
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def client(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.partitions[partition_id]
        return self.x_train[idx], self.y_train[idx]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLR_CACHE", Path.home() / ".cache" / "fedlr"))


def data_key(cfg: Config) -> str:
    """Hash of the keys that determine the data and its partitions."""
    payload = json.dumps({k: cfg[k] for k in DATA_KEYS}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- raw datasets
def _mnist1d(cfg: Config) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg["data.num_samples"]
    args.seed = cfg["seed"]
    # make_dataset reseeds NumPy's global RNG; keep the caller's state intact.
    state = np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    as_x = lambda a: a.astype(np.float32)[:, None, :]  # (N, 1, 40): one channel
    return as_x(d["x"]), d["y"].astype(np.int64), as_x(d["x_test"]), d["y_test"].astype(np.int64)


def _digits(cfg: Config) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=cfg["data.test_fraction"], stratify=y, random_state=cfg["seed"]
    )
    return x_tr, y_tr, x_te, y_te


def _hub_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """Convert a hub split to (x, y): the label column is the ClassLabel feature."""
    from datasets import ClassLabel, Image

    features = split.features
    label = next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
    label = label or next((k for k in ("label", "labels", "fine_label") if k in features), None)
    image = next((k for k, f in features.items() if isinstance(f, Image)), None)
    if label is None or image is None:
        raise DatasetUnavailable(
            f"dataset has columns {list(features)}; fedlr needs one image column and one class-label column"
        )
    split = split.with_format("numpy")
    x = np.asarray(split[image], dtype=np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else np.moveaxis(x, -1, 1)  # (N, C, H, W)
    return x, np.asarray(split[label], dtype=np.int64)


def _hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _force_hub_offline() -> None:
    """Use only the local Hugging Face cache. Without this, huggingface_hub
    retries an unreachable host for about 25 s before it gives up."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variable at import time; they may be imported already.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True


def _hub(cfg: Config) -> tuple[np.ndarray, ...]:
    hub_id = cfg["dataset"][3:]
    if not _hub_reachable():
        _force_hub_offline()
    try:
        from flwr_datasets import FederatedDataset
        from flwr_datasets.partitioner import IidPartitioner

        # flwr-datasets downloads the splits; fedlr partitions them in memory below.
        fds = FederatedDataset(dataset=hub_id, partitioners={"train": IidPartitioner(1)})
        train = fds.load_split("train")
        splits = list(fds.dataset.keys()) if fds.dataset is not None else []
        test = fds.load_split("test") if "test" in splits else None
    except DatasetUnavailable:
        raise
    except Exception as err:  # network, hub or parsing failures all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetUnavailable(
            f"dataset = 'hf:{hub_id}' could not be loaded from the Hugging Face Hub "
            f"(offline or unknown id?): {reason}"
        ) from None
    x, y = _hub_arrays(train)
    if test is not None:
        x_te, y_te = _hub_arrays(test)
    else:
        perm = np.random.default_rng(cfg["seed"]).permutation(len(y))
        n_test = int(len(y) * cfg["data.test_fraction"])
        x_te, y_te, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
    return x, y, x_te, y_te


# ------------------------------------------------------- tasks (class subsets)
_RAW: dict[tuple, tuple[np.ndarray, ...]] = {}


def _raw(cfg: Config) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) of the whole dataset; the last one is
    kept in memory, so the federated task and a pretraining task of the same
    dataset (fedlr.pretrain) generate MNIST-1D only once per process."""
    key = tuple(cfg[k] for k in RAW_KEYS)
    if key not in _RAW:
        _RAW.clear()
        _RAW[key] = {"mnist1d": _mnist1d, "digits": _digits}.get(cfg["dataset"], _hub)(cfg)
    return _RAW[key]


def select_classes(x: np.ndarray, y: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The examples of ``classes``, relabelled by position: ``classes[i]`` becomes ``i``."""
    lookup = np.full(max(int(y.max()), *classes) + 1, -1, dtype=np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    keep = lookup[y] >= 0
    return x[keep], lookup[y[keep]]


def load_task(cfg: Config, classes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) restricted to ``classes`` (all if empty).

    A task is a set of classes of one dataset. ``data.classes`` selects the
    federated task; ``fedlr.pretrain`` loads the disjoint source task of LoRA
    fine-tuning with the same function, so both see the same split of every example.
    """
    x_tr, y_tr, x_te, y_te = _raw(cfg)
    if not classes:
        return x_tr, y_tr, x_te, y_te
    absent = sorted(set(classes) - set(np.unique(y_tr).tolist()))
    if absent:
        raise DatasetUnavailable(
            f"classes {absent} do not occur in the training set of {cfg['dataset']!r} (its classes: "
            f"{sorted(np.unique(y_tr).tolist())})"
        )
    return (*select_classes(x_tr, y_tr, classes), *select_classes(x_te, y_te, classes))


# ------------------------------------------------------------------ partitions
def partition_indices(y: np.ndarray, cfg: Config) -> list[np.ndarray]:
    """Split the train labels ``y`` into ``num_clients`` index arrays.

    The flwr-datasets partitioners run on an in-memory table of (label, index)
    rows; the data itself never goes through Arrow. Indices are shuffled first
    (seeded) because ``IidPartitioner`` takes contiguous shards.
    """
    import datasets as hf_datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    hf_datasets.disable_progress_bars()
    n, seed = cfg["num_clients"], cfg["seed"]
    order = np.random.default_rng(seed).permutation(len(y))
    table = hf_datasets.Dataset.from_dict({"label": y[order], "index": order})
    kind = cfg["partition"]
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=n)
    elif kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=cfg["alpha"],
            min_partition_size=cfg["data.min_partition_size"], self_balancing=False, seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=n, partition_by="label",
            num_classes_per_partition=cfg["classes_per_client"], seed=seed,
        )
    partitioner.dataset = table
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)) for i in range(n)]
    except ValueError as err:
        raise DatasetUnavailable(f"partition = {kind!r} failed for {n} clients: {err}") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise DatasetUnavailable(
            f"partition = {kind!r} left {len(empty)} of {n} clients without data (first: {empty[0]}); "
            "use fewer clients, a larger alpha or data.min_partition_size >= 1"
        )
    return parts


# --------------------------------------------------------------------- loading
_MEMO: dict[str, FederatedData] = {}


def load_federated_data(cfg: Config) -> FederatedData:
    """The dataset and its partitions for ``cfg`` (memoised, disk-cached)."""
    key = data_key(cfg)
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / f"data-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            parts = np.split(z["part_index"], z["part_offsets"][1:-1])
            data = FederatedData(z["x_train"], z["y_train"], z["x_test"], z["y_test"], parts, int(z["num_classes"]))
    else:
        classes = parse_classes(cfg["data.classes"])
        x_tr, y_tr, x_te, y_te = load_task(cfg, classes)
        num_classes = len(classes) or int(max(y_tr.max(), y_te.max()) + 1)
        if cfg["partition"] == "pathological" and cfg["classes_per_client"] > num_classes:
            raise DatasetUnavailable(
                f"classes_per_client = {cfg['classes_per_client']}: the dataset has only {num_classes} classes"
            )
        parts = partition_indices(y_tr, cfg)
        data = FederatedData(x_tr, y_tr, x_te, y_te, parts, num_classes)
        _save_atomic(path, data)
    _MEMO[key] = data
    return data


def _save_atomic(path: Path, data: FederatedData) -> None:
    """Write the cache so that a concurrent reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = np.cumsum([0] + [len(p) for p in data.partitions])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(
            fh, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
            part_index=np.concatenate(data.partitions), part_offsets=offsets, num_classes=data.num_classes,
        )
    os.replace(tmp, path)
