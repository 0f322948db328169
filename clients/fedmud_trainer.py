"""FedMUD's client (Li et al., ICML 2025, arXiv 2505.23176): sync W, re-draw
the round's factors, train them, send them (``shared/specs/fedmud.md`` §3 steps 4–5).

A client keeps its dense base W between rounds in ``context.state``, which
Flower persists per node (and ``clients.client_app`` saves in the run directory
for ``--resume``): the same partition may land on a different Ray actor each
round, so nothing about a client may live in the actor. What does live
in the actor is the decomposed model object (built once per process, its
weights overwritten in place for each message) and W_1 as built from the run
seed, which a client that has never trained starts from.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from torch import Tensor, nn

from clients.ldp_release import open_release
from clients.local_training import train_local
from clients.trainer import TRAIN_STREAM, _limit_threads, device
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.lowrank.fedmud import MUDLayout, build_mud_model
from fedlr.lowrank.mud import FACTOR_NAMES, model_deltas, mud_layers, reset_round, update_gain
from fedlr.training import derive_seed

# Keys of this client's entries in ``context.state``.
BASE_KEY = "fedmud-base"
HELD_KEY = "fedmud-held"
INITIAL_ROUND = 1  # W_1 is what every process builds from the run seed

_MODELS: dict[tuple[Any, ...], tuple[nn.Module, MUDLayout, dict[str, Tensor]]] = {}


def _mud_model(
    cfg: Config, input_shape: tuple[int, ...], num_classes: int, dev: torch.device
) -> tuple[nn.Module, MUDLayout, dict[str, Tensor]]:
    """The decomposed model of this process, its layout, and W_1 (on CPU)."""
    keys = ("model", "norm", "width", "seed", "fedmud.decomposition", "fedmud.aggregation", "fedmud.ratio",
            "fedmud.init_scale", "fedmud.target", "fedmud.skip")
    key = (*(cfg[k] for k in keys), input_shape, num_classes, str(dev))
    if key not in _MODELS:
        model = build_mud_model(cfg, input_shape, num_classes)
        layout = MUDLayout.of(model)
        state = model.state_dict()
        initial = {k: state[k].detach().clone() for k in layout.base_keys if k in state}
        _MODELS[key] = (model.to(dev), layout, initial)
    return _MODELS[key]


def _load(model: nn.Module, layout: MUDLayout, arrays: dict[str, Tensor]) -> None:
    """Overwrite everything but the trainable factors in place (the caller resets
    those); a missing or unknown entry is a protocol error."""
    missing, unexpected = model.load_state_dict(arrays, strict=False)
    if unexpected or not set(missing) <= set(layout.factor_keys):
        raise ValueError(f"the server sent unexpected arrays {unexpected} or lacked {missing}")


def _sync(model: nn.Module, layout: MUDLayout, initial: dict[str, Tensor], content: RecordDict, context: Context) -> None:
    """Bring W and the dense entries to the server's round-t model (§3 step 4 "sync").

    Either the server sent the plain W_t, or the logged (θ̄_s, σ_s) of every
    round s this client missed, applied in order, each with *its own* round's
    frozen factors (§8 "Merge seed"). The merge uses the server's own
    ``model_deltas``, so the client's W equals the server's bit for bit.
    """
    config = content["config"]
    server_round = int(config["server-round"])
    if "arrays" in content.array_records:
        _load(model, layout, content["arrays"].to_torch_state_dict())
    else:
        held = int(context.state[HELD_KEY]["round"]) if HELD_KEY in context.state else INITIAL_ROUND
        first = int(config["catch-up-from"])
        if not first <= held <= server_round:
            # Never train on a W that differs from the server's: the run would go on silently wrong.
            raise RuntimeError(
                f"round {server_round}: this client holds W_{held} but the server sent the rounds since {first}; "
                "its saved state (context.state) is lost or from another run"
            )
        base = context.state[BASE_KEY].to_torch_state_dict() if BASE_KEY in context.state else initial
        _load(model, layout, {**base, **content["dense"].to_torch_state_dict()})
        with torch.no_grad():
            for s, seed in zip(config["log-rounds"], config["log-seeds"], strict=True):
                # A client can be ahead of the server's checkpoint: it trained
                # (and saved W_s) in the round a crash cut short. Skip what it has.
                if s < held:
                    continue
                deltas = model_deltas(layout.specs, content[f"log-{s}"].to_torch_state_dict(), int(seed), int(s))
                for name, layer in mud_layers(model):
                    layer.weight += deltas[name].to(layer.weight)
    state = model.state_dict()
    context.state[BASE_KEY] = ArrayRecord({k: state[k].detach().cpu() for k in layout.base_keys})
    context.state[HELD_KEY] = ConfigRecord({"round": server_round})


def train_fedmud(cfg: Config, partition_id: int, content: RecordDict, context: Context) -> RecordDict:
    """One FedMUD client round: sync, re-draw, train, reply (§3 steps 4–5).

    Parameters
    ----------
    cfg : Config
        Resolved configuration (``fedmud.*``, ``lr``, ``local_epochs``, ...).
    partition_id : int
        This client's partition.
    content : RecordDict
        The server's message: ``config`` (``server-round``, ``round-seed`` and,
        for a catch-up, ``catch-up-from``/``log-rounds``/``log-seeds``) and
        either ``arrays`` (the plain W_t; for ``target="weight"`` the factors
        and dense entries) or ``dense`` plus one ``log-<s>`` per missed round.
    context : Context
        The node's context; ``context.state`` keeps W between rounds.

    Returns
    -------
    RecordDict
        ``arrays`` (trainable factors and dense entries only; frozen factors
        and W never travel) and ``metrics`` (``num-examples`` and
        ``train_loss``, or under DP-SGD the client's cumulative ``epsilon``;
        under LDP the released factors, ``epsilon`` and the per-layer budgets).
    """
    _limit_threads(cfg)
    dev = device()
    data = load_federated_data(cfg)
    model, layout, initial = _mud_model(cfg, data.input_shape, data.num_classes, dev)
    config = content["config"]
    server_round = int(config["server-round"])
    if layout.target == "weight":
        # FedLMT trains its persistent factors directly: no base, nothing to reset.
        _load(model, layout, content["arrays"].to_torch_state_dict())
    else:
        _sync(model, layout, initial, content, context)
        # Frozen factors from σ_t, trainable ones zero: ΔW starts at 0 (§3 step 4 "re-draw").
        reset_round(model, int(config["round-seed"]), server_round)
    # Layer-wise LDP (privacy.mechanism = "ldp", clients.ldp_release): budgets
    # from the round-start model, which is public (W_t and σ_t's factors).
    release = open_release(cfg, partition_id, server_round, model, context)
    if release is not None:
        state = model.state_dict()
        start = {k: state[k].detach().cpu().clone() for k in layout.upload_keys}
        # Clip and noise the factors in ΔW units (update_gain): in factor units the
        # frozen factors would multiply the noise and the run diverges.
        gains = {f"{name}.{factor}": update_gain(layer) for name, layer in mud_layers(model) for factor in FACTOR_NAMES}
    x, y = (torch.from_numpy(a).to(dev) for a in data.client(partition_id))
    num_examples = len(y)
    # Plain SGD with a fresh optimizer (§3 step 4 "train"), or DP-SGD under
    # privacy.mechanism = "dpsgd": only the factors and dense entries require grad.
    train_metrics = train_local(
        cfg, model, x, y, context=context, seed=derive_seed(cfg["seed"], TRAIN_STREAM, server_round, partition_id)
    )
    state = model.state_dict()
    upload = {k: state[k].detach().cpu() for k in layout.upload_keys}
    if release is not None:
        upload, train_metrics = release.privatize(upload, start, gains)
    arrays = ArrayRecord(upload)
    if dev.type == "cuda":
        # Several clients share one GPU by fractional num_gpus: give memory back.
        del x, y
        torch.cuda.empty_cache()
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, **train_metrics})})
