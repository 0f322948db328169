"""The client of FedSVD, FFA-LoRA and FedAvg-LoRA (Lee et al., *FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA*, NeurIPS 2025,
arXiv 2505.12805; ``shared/specs/fedsvd.md`` §2 "Client", §3).

Each process builds the pretrained W₀ with adapters once (``fedlr.pretrain``:
the same cached file the server loaded, the same seeded A₀) and keeps the
model object; each message only overwrites the factors that travelled. W₀,
the biases and the head are frozen, so they never change in that object;
FFA-LoRA's A is frozen too and never sent, so it stays A₀.

Training is :func:`clients.local_training.train_local`: plain SGD with a
global gradient-norm clip (``fedsvd.max_grad_norm``, spec §4), or DP-SGD on
the trained factors only, with the noise calibrated once per run and the
client's ledger in ``context.state`` (spec §3).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from torch import nn

from clients.ldp_release import open_release
from clients.local_training import train_local
from clients.trainer import TRAIN_STREAM, _limit_threads, device
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.lowrank.lora import TRAINED_FACTORS, load_lora_state, lora_state
from fedlr.pretrain import PRETRAIN_KEYS, build_lora_model
from fedlr.training import derive_seed

_MODELS: dict[tuple[Any, ...], nn.Module] = {}


def _lora_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int, dev: torch.device) -> nn.Module:
    """This process's W₀ + adapters for the method (built once, reused for every message)."""
    keys = (*PRETRAIN_KEYS, "fedsvd.pretrained", "method", "fedsvd.rank", "fedsvd.alpha")
    key = (*(cfg[k] for k in keys), input_shape, num_classes, str(dev))
    if key not in _MODELS:
        _MODELS[key] = build_lora_model(cfg, input_shape, num_classes).to(dev)
    return _MODELS[key]


def train_lora(cfg: Config, partition_id: int, content: RecordDict, context: Context) -> RecordDict:
    """One client round of a LoRA method: load the factors, train, reply (spec §2).

    Parameters
    ----------
    cfg : Config
        Resolved configuration (``method``, ``fedsvd.*``, ``privacy.*``,
        ``lr``, ``local_epochs``, ``batch_size``, ...).
    partition_id : int
        This client's partition.
    content : RecordDict
        The server's message: ``config`` (``server-round``) and ``arrays``, the
        factors the method sends down (``strategies.fedsvd.DOWNLOAD_FACTORS``).
    context : Context
        The node's context; under DP-SGD ``context.state`` keeps σ and the
        privacy ledger between rounds.

    Returns
    -------
    RecordDict
        ``arrays``: the trained factors only (B; A and B for ``fedavg-lora``),
        and ``metrics``: ``num-examples`` and ``train_loss``, or under DP-SGD
        the client's cumulative ``epsilon`` instead of the loss.

    Raises
    ------
    fedlr.privacy.BudgetExceededError
        Under DP-SGD, before training, if this round would exceed the budget.
    """
    _limit_threads(cfg)
    dev = device()
    data = load_federated_data(cfg)
    model = _lora_model(cfg, data.input_shape, data.num_classes, dev)
    load_lora_state(model, content["arrays"].to_torch_state_dict())
    x, y = (torch.from_numpy(a).to(dev) for a in data.client(partition_id))
    num_examples = len(y)
    server_round = int(content["config"]["server-round"])
    release = open_release(cfg, partition_id, server_round, model, context)  # None unless privacy.mechanism = "ldp"
    start = lora_state(model, TRAINED_FACTORS[cfg["method"]]) if release is not None else {}
    train_metrics = train_local(
        cfg, model, x, y, context=context, max_grad_norm=cfg["fedsvd.max_grad_norm"],
        seed=derive_seed(cfg["seed"], TRAIN_STREAM, server_round, partition_id),
    )
    upload = {k: v.cpu() for k, v in lora_state(model, TRAINED_FACTORS[cfg["method"]]).items()}
    if release is not None:  # layer-wise LDP on the trained factors (clients.ldp_release)
        upload, train_metrics = release.privatize(upload, start)
    arrays = ArrayRecord(upload)
    if dev.type == "cuda":
        # Several clients share one GPU by fractional num_gpus: give memory back.
        del x, y
        torch.cuda.empty_cache()
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, **train_metrics})})
