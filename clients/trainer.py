"""Client-side work for each method, with per-process caches.

Inside a Ray actor this module is imported once, so the dataset, the client's
tensors and the model object persist across messages: each message only loads
weights in place and trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from torch import nn

import importlib

from clients.local_training import train_local
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.models import build_model
from fedlr.training import derive_seed, local_sgd

TRAIN_STREAM = 2  # seed stream of local batch order (see strategies.base.SAMPLING_STREAM)

_MODELS: dict[tuple[Any, ...], nn.Module] = {}
_THREADS_SET = False


def device() -> torch.device:
    """CUDA when Ray gave this actor a GPU (with num_gpus = 0 Ray hides all GPUs)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(cfg: Config, input_shape: tuple[int, ...], num_classes: int, dev: torch.device) -> nn.Module:
    key = (cfg["model"], cfg["norm"], cfg["width"], cfg["seed"], input_shape, num_classes, str(dev))
    if key not in _MODELS:
        _MODELS[key] = build_model(cfg, input_shape, num_classes).to(dev)
    return _MODELS[key]


def _limit_threads(cfg: Config) -> None:
    # Torch defaults to one thread per core in every actor; with several actors
    # per machine that oversubscribes the CPUs. Use the actor's CPU share.
    global _THREADS_SET
    if not _THREADS_SET:
        torch.set_num_threads(max(1, int(cfg["simulation.num_cpus"])))
        _THREADS_SET = True


def train_dense(cfg: Config, partition_id: int, content: RecordDict, context: Context) -> RecordDict:
    """Dense local training (FedAvg, FedProx, FedAdam, FedRE): load the global model,
    run local SGD (or DP-SGD, ``privacy.mechanism``) on this partition, return
    the new weights, ``num-examples`` and ``train_loss`` (under DP: ``epsilon``)."""
    _limit_threads(cfg)
    dev = device()
    data = load_federated_data(cfg)
    model = _model(cfg, data.input_shape, data.num_classes, dev)
    model.load_state_dict(content["arrays"].to_torch_state_dict())
    x, y = (torch.from_numpy(a).to(dev) for a in data.client(partition_id))
    num_examples = len(y)
    config = content["config"]
    server_round = int(config["server-round"])
    release = None
    if cfg["privacy.mechanism"] == "ldp":
        # Imported here: the LDP code pulls in SciPy, which every other actor would load for nothing.
        from clients.ldp_release import open_release

        release = open_release(cfg, partition_id, server_round, model, context)
    train_metrics = train_local(
        cfg, model, x, y, context=context,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=derive_seed(cfg["seed"], TRAIN_STREAM, server_round, partition_id),
    )
    upload = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if release is not None:
        # LDP: send global + ũ (same format for every server) and the budgets instead of the unprotected loss.
        upload, train_metrics = release.privatize(upload, content["arrays"].to_torch_state_dict())
    arrays = ArrayRecord(upload)
    if dev.type == "cuda":
        # Several clients share one GPU by fractional num_gpus: give memory back.
        del x, y
        torch.cuda.empty_cache()
    metrics = MetricRecord({"num-examples": num_examples, **train_metrics})
    return RecordDict({"arrays": arrays, "metrics": metrics})


# method -> "module:function" of its client-side training; a method's trainer
# receives the node's Context so it can keep per-client state (``context.state``)
# across rounds. Imported on first use: every Ray actor imports this module at
# start-up, and the other methods' dependencies (SciPy's optimizers for
# DaringFed, the LoRA and MUD codecs) would add a second to each actor's start.
Trainer = Callable[[Config, int, RecordDict, Context], RecordDict]
TRAINERS: dict[str, str] = {
    "fedavg": "clients.trainer:train_dense", "fedprox": "clients.trainer:train_dense",
    "fedadam": "clients.trainer:train_dense", "fedre": "clients.trainer:train_dense",
    "fedmud": "clients.fedmud_trainer:train_fedmud",
    "fedsvd": "clients.fedsvd_trainer:train_lora", "ffa-lora": "clients.fedsvd_trainer:train_lora",
    "fedavg-lora": "clients.fedsvd_trainer:train_lora",
    "daringfed": "clients.daringfed_trainer:train_daringfed",
}


def trainer_for(method: str) -> Trainer:
    """The client-side training function of ``method``."""
    module, name = TRAINERS[method].split(":")
    return getattr(importlib.import_module(module), name)


DENSE_METHODS = frozenset(m for m, ref in TRAINERS.items() if ref == "clients.trainer:train_dense")


def warm(cfg: Config) -> None:
    """Do, when a Ray actor is created, what its first message would otherwise wait for:
    torch's thread count, the method's trainer imports, the dataset cache and
    (dense methods) the model, so the first round trains instead of importing."""
    _limit_threads(cfg)
    trainer_for(cfg["method"])
    data = load_federated_data(cfg)
    if cfg["method"] in DENSE_METHODS:
        dev = device()
        model = _model(cfg, data.input_shape, data.num_classes, dev)
        # One step at lr = 0 on two examples: torch builds its kernels and autograd
        # graph on the first backward pass (≈ 0.5 s here), which round 1 would wait
        # for. The weights do not move and every message loads its own anyway.
        x, y = (torch.from_numpy(a[:2]).to(dev) for a in data.client(0))
        local_sgd(model, x, y, epochs=1, batch_size=2, lr=0.0, seed=0)
        if dev.type == "cuda":
            # Actors share a GPU by fractional num_gpus: keep only the model resident.
            del x, y
            torch.cuda.empty_cache()


def train(cfg: Config, partition_id: int, content: RecordDict, context: Context) -> RecordDict:
    """Run this client's local training for ``cfg['method']``."""
    return trainer_for(cfg["method"])(cfg, partition_id, content, context)
