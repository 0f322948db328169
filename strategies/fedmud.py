"""FedMUD (Li et al., *The Panaceas for Improving Low-Rank Decomposition in
Communication-Efficient Federated Learning*, ICML 2025, arXiv 2505.23176): the
server side of the per-round protocol of ``shared/specs/fedmud.md`` §3.

Clients train only low-rank (``lowrank``) or block-Kronecker (``bkd``) factors
of the round's update ΔW on top of a frozen dense base W, plus the dense
(non-decomposed) parameters, and upload just those. The server averages them,
merges W_{t+1} = W_t + ΔW(θ̄_t; σ_t) into the plain model and keeps a log of
the averaged factors, so that a client coming back after missing rounds
downloads the factors it missed ("catch-up") whenever that is cheaper than
W_t itself.

The global model that flows through :meth:`FedlrStrategy.run_rounds` stays the
plain model's state dict (what ``fedlr.models.build_model`` creates), so
server-side evaluation and checkpoints are the same as for FedAvg.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from torch import Tensor, nn

from fedlr.config import Config
from fedlr.lowrank.fedmud import MUDLayout, build_mud_model, round_seed
from fedlr.lowrank.mud import aggregate_factors, aggregation_error, model_deltas, model_factors
from strategies.base import FedlrStrategy

# The round whose global W a client holds before it ever trains: W_1, which
# every process builds from the run seed (fedlr.models.build_model).
INITIAL_ROUND = 1


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _subset(arrays: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: arrays[k] for k in keys})


class FedMUD(FedlrStrategy, FlowerFedAvg):
    """FedMUD's server: factor averaging, the W merge and per-client catch-up (§3).

    Parameters
    ----------
    cfg : Config
        The resolved configuration; ``fedmud.*`` selects decomposition
        (``lowrank``/``bkd``), aggregation (``naive``/``aad``), ratio,
        init_scale, target (``update`` = MUD, ``weight`` = FedLMT, §2.4) and skip.
    node_to_partition : dict[int, int]
        Flower node id → partition id.
    input_shape : tuple[int, ...]
        Shape of one input sample, to build the model.
    num_classes : int
        Output classes of the model.

    Notes
    -----
    Per round t (§3): σ_t = ``round_seed(seed, t)``; each sampled client gets
    either the plain W_t or, if fewer bytes, the dense entries plus the logged
    (θ̄_s, σ_s) for every round s from the one whose W it holds to t−1. Replies
    carry the trainable factors, the dense entries and ``num-examples``; the
    server takes the ``num-examples``-weighted mean of both. With ``aad`` the
    merged update equals the weighted mean of the clients' updates exactly,
    which ``aggregation_error`` (in ``metrics.jsonl``) measures every round.
    """

    def __init__(
        self, *, cfg: Config, node_to_partition: dict[int, int], input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(cfg=cfg, node_to_partition=node_to_partition)
        model = build_mud_model(cfg, input_shape, num_classes)
        self.layout = MUDLayout.of(model)
        # FedLMT (target="weight"): the global model *is* its factors, which
        # persist across rounds and cannot be recovered from the product U V.
        self.factors: dict[str, np.ndarray] = (
            {k: v.numpy() for k, v in model_factors(model).items()} if self.layout.target == "weight" else {}
        )
        # Round s → θ̄_s, only the rounds a catch-up can still use (max_catch_up).
        self.log: dict[int, dict[str, np.ndarray]] = {}
        # Partition id → the round t whose W_t the client holds (absent: W_1).
        self.holds: dict[int, int] = {}
        self._trained_on: ArrayRecord | None = None

    def build_global_model(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, ArrayRecord]:
        """The plain model; for FedLMT its layer weights are U V from the start.

        FedLMT's initial factors are a rank-r truncation of the seed-built W
        (``fedlr.lowrank.mud``), so round 0 must evaluate that, not W itself.
        MUD starts from the seed-built W unchanged.
        """
        model, arrays = super().build_global_model(input_shape, num_classes)
        if self.layout.target == "weight":
            state = model.state_dict()
            # Naive factors have no frozen part: the seed and round are not used.
            for name, weight in model_deltas(self.layout.specs, self.factors, 0, 0).items():
                state[f"{name}.weight"] = weight
            model.load_state_dict(state)
            arrays = ArrayRecord(state)
        return model, arrays

    # ------------------------------------------------------------- down (§3.3)
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client, each with its own payload (§3 steps 1–3).

        ``grid`` is not needed: sampling is fedlr's (seeded, by partition id)
        and each message names its node.
        """
        self._trained_on = arrays
        base_config = {**config, "server-round": server_round, "round-seed": round_seed(self.cfg["seed"], server_round)}
        log_records: dict[int, ArrayRecord] = {}  # built once per round, shared by the messages
        messages = []
        for pid in self.sampled_partitions(server_round):
            records, extra = self._payload(pid, server_round, arrays, log_records)
            content = RecordDict({**records, "config": ConfigRecord({**base_config, **extra})})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[pid]))
        return messages

    def _payload(
        self, partition_id: int, server_round: int, arrays: ArrayRecord, log_records: dict[int, ArrayRecord]
    ) -> tuple[dict[str, ArrayRecord], dict[str, Any]]:
        """The arrays ``partition_id`` needs to hold W_t, and their config entries."""
        layout = self.layout
        if layout.target == "weight":
            # FedLMT's model is its factors plus the dense entries: nothing to catch up.
            factors = {k: torch.from_numpy(v) for k, v in self.factors.items()}
            return {"arrays": ArrayRecord({**factors, **_subset(arrays, layout.dense_keys).to_torch_state_dict()})}, {}
        held = self.holds.get(partition_id, INITIAL_ROUND)
        missed = list(range(held, server_round))
        if len(missed) > layout.max_catch_up:
            return {"arrays": arrays}, {}
        for s in missed:
            if s not in log_records:
                log_records[s] = _record(self.log[s])
        records = {"dense": _subset(arrays, layout.dense_keys), **{f"log-{s}": log_records[s] for s in missed}}
        seeds = [round_seed(self.cfg["seed"], s) for s in missed]
        return records, {"catch-up-from": held, "log-rounds": missed, "log-seeds": seeds}

    # --------------------------------------------------------------- up (§3.6)
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average factors and dense entries, merge W, log θ̄_t (§3 step 6).

        ``replies`` are already checked and sorted by partition id
        (``FedlrStrategy.check_replies``), which fixes the float summation order.
        """
        if self._trained_on is None:
            raise RuntimeError(f"round {server_round}: aggregate_train called before configure_train")
        replies = list(replies)
        uploads = [
            {k: v.numpy() for k, v in record.items()}
            for record in self.reply_arrays(server_round, replies, set(self.layout.upload_keys))
        ]
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in replies]
        mean = aggregate_factors(uploads, weights)
        seed = round_seed(self.cfg["seed"], server_round)
        theta = {k: mean[k] for k in self.layout.factor_keys}
        specs = self.layout.specs

        def deltas(factors: dict[str, Tensor | np.ndarray]) -> dict[str, Tensor]:
            return model_deltas(specs, factors, seed, server_round)

        state = self._trained_on.to_torch_state_dict()
        if self.layout.target == "update":
            applied = deltas(theta)
            client_deltas = [deltas(u) for u in uploads]
            new_weights = {name: state[f"{name}.weight"] + applied[name] for name in specs}
            self.log[server_round] = {k: v.numpy() for k, v in theta.items()}
            # Entries older than this can never again be cheaper than W itself.
            self.log = {s: f for s, f in self.log.items() if s > server_round - self.layout.max_catch_up}
        else:
            # FedLMT: the layer weights are U V; updates are measured against the previous U V.
            previous = deltas(self.factors)
            new_weights = deltas(theta)
            applied = {name: new_weights[name] - previous[name] for name in specs}
            client_deltas = [{name: w - previous[name] for name, w in deltas(u).items()} for u in uploads]
            self.factors = {k: v.numpy() for k, v in theta.items()}
        self.round_extra["aggregation_error"] = aggregation_error(applied, client_deltas, weights)

        for name, weight in new_weights.items():
            state[f"{name}.weight"] = weight
        for key in self.layout.dense_keys:
            state[key] = mean[key].to(state[key].dtype)  # keeps integer buffers integer
        for msg in replies:
            self.holds[self.partition_of[msg.metadata.src_node_id]] = server_round
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
        return ArrayRecord(state), metrics

    # ------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """The factor log, which W each client holds, and FedLMT's factors.

        Clients keep their W in ``context.state``, which ``clients.client_app``
        persists in the run directory, so after ``--resume`` they hold what
        this map says (or, if they trained in the round that was cut short,
        one round more, which the client's catch-up tolerates).
        """
        return {
            "log": {s: dict(f) for s, f in self.log.items()},
            "holds": dict(self.holds),
            "factors": dict(self.factors),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.log = {int(s): dict(f) for s, f in state["log"].items()}
        self.holds = {int(p): int(t) for p, t in state["holds"].items()}
        self.factors = dict(state["factors"])

    def summary_extra(self) -> dict[str, Any]:
        """``summary.json`` entries: the realized ratio after ratio forcing (§2.3)."""
        return {"realized_ratio": self.layout.realized_ratio}
