"""FedRE's server (Xiao et al., *FedRE: Robust and Effective Federated Learning
with Privacy Preference*, arXiv 2505.04889): variance-aware aggregation of
layer-wise LDP releases (``shared/specs/fedre.md`` §6) and the per-layer
budget log (§7).

Clients release global + ũ_k under ``privacy.mechanism = "ldp"``
(:mod:`clients.ldp_release`) with their public per-layer budgets. The server
recomputes each release's per-coordinate noise variance v_{k,l} from those
budgets (:func:`fedlr.privacy.ldp.noise_variance`) and, layer by layer, takes
w_l ← w_l + Σ_k a_{k,l}·ũ_{k,l} with a_{k,l} ∝ n_k/(v_{k,l} + τ_l²). The
weights use only public variances and released values, so the aggregation is
post-processing and costs no privacy. The baseline is any other method with
``privacy.mechanism = "ldp"``: n_k-weighted averaging of the same releases.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from fedlr.config import Config, parse_tiers
from fedlr.privacy.ldp import (
    LayerBudget,
    aggregation_weights,
    client_preference,
    estimate_tau2,
    group_by_layer,
    layer_bound,
    network_layer_of,
    noise_variance,
)
from strategies.base import ClientFailure, FedlrStrategy, sample_partitions


class FedRE(FedlrStrategy, FlowerFedAvg):
    """Variance-aware aggregation of layer-wise LDP releases (§6).

    Parameters
    ----------
    cfg : Config
        The resolved configuration (``privacy.*``: ``ldp_noise``, ``clip``,
        ``tau2``, ``epsilon``, ``tiers``, ``epsilon_total``).
    node_to_partition : dict[int, int]
        Flower node id → partition id.
    input_shape : tuple[int, ...]
        Shape of one input sample, to name the network's layers.
    num_classes : int
        Output classes of the network.

    Notes
    -----
    Per round and layer l over the replies S (spec §6): v_{k,l} from
    (ε_{k,l}, δ_{k,l}) and the layer's bound C_l = C·√(d_l/d); τ_l² by the
    method of moments (``privacy.tau2 = "estimate"``) or 0; then the weights
    and the update. ``metrics.jsonl`` gets ``tau2`` (per layer) and
    ``layer_epsilons``, the latest per-layer budgets of the client with the
    largest cumulative ε (§7), whose ε ``FedlrStrategy`` logs as ``epsilon``.
    With ``privacy.epsilon_total`` set, clients whose next release would
    exceed it are no longer sampled (``exhausted_clients``), and the run
    fails when fewer than ``clients_per_round`` remain.
    """

    def __init__(
        self, *, cfg: Config, node_to_partition: dict[int, int], input_shape: tuple[int, ...], num_classes: int
    ) -> None:
        super().__init__(cfg=cfg, node_to_partition=node_to_partition)
        self.layer_of = network_layer_of(cfg, input_shape, num_classes)
        tiers = parse_tiers(cfg["privacy.tiers"])
        masks = cfg["privacy.masks"].split(",")
        # ε_k of every client: public (its budgets travel in the clear, §4).
        num_clients = cfg["num_clients"]
        self.release_epsilon = {
            pid: cfg["privacy.epsilon"] * client_preference(cfg["seed"], pid, num_clients, tiers, masks).multiplier
            for pid in range(num_clients)
        }
        # Partition id → cumulative ε it reported, and its latest per-layer budgets.
        self.cumulative: dict[int, float] = {}
        self.layer_epsilons: dict[int, list[float]] = {}
        self._trained_on: ArrayRecord | None = None

    # ------------------------------------------------------------- sampling (§7)
    def sampled_partitions(self, server_round: int) -> list[int]:
        """Seeded sampling among the clients whose next release fits ``privacy.epsilon_total``."""
        cap = self.cfg["privacy.epsilon_total"]
        if cap <= 0:
            return super().sampled_partitions(server_round)
        eligible = [
            pid for pid, eps in self.release_epsilon.items() if self.cumulative.get(pid, 0.0) + eps <= cap * (1 + 1e-12)
        ]
        exhausted = sorted(set(self.release_epsilon) - set(eligible))
        k = self.cfg["clients_per_round"]
        if len(eligible) < k:
            raise ClientFailure(
                f"round {server_round}: only {len(eligible)} clients can release once more within "
                f"privacy.epsilon_total = {cap:g}, fewer than clients_per_round = {k}; exhausted: {exhausted}"
            )
        if exhausted:
            self.round_extra["exhausted_clients"] = exhausted
        # The same draw as FedlrStrategy's, over the eligible clients only.
        return sorted(eligible[i] for i in sample_partitions(self.cfg["seed"], server_round, len(eligible), k))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._trained_on = arrays  # the releases are global + ũ_k: keep the global to recover ũ_k
        return super().configure_train(server_round, arrays, config, grid)

    # ------------------------------------------------------------- aggregation (§6)
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w_l ← w_l + Σ_k a_{k,l}·ũ_{k,l} for every layer l (§6 steps 1–3).

        ``replies`` are already checked and sorted by partition id
        (``FedlrStrategy.check_replies``), which fixes the float summation order.
        """
        if self._trained_on is None:
            raise RuntimeError(f"round {server_round}: aggregate_train called before configure_train")
        replies = list(replies)
        contents = [m.content for m in replies]
        validate_message_reply_consistency(contents, weighted_by_key=self.weighted_by_key, check_arrayrecord=True)
        pids = [self.partition_of[m.metadata.src_node_id] for m in replies]
        global_state = {k: v.numpy() for k, v in self._trained_on.items()}
        uploads = [{k: v.numpy() for k, v in next(iter(c.array_records.values())).items()} for c in contents]
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        if set(uploads[0]) != set(global_state):
            raise ValueError(
                f"round {server_round}: clients sent arrays {sorted(uploads[0])}, "
                f"the global model has {sorted(global_state)}"
            )
        groups = group_by_layer(global_state, self.layer_of)
        for pid, record in zip(pids, metrics, strict=True):
            for key in ("ldp-epsilons", "ldp-deltas"):
                if len(record.get(key, [])) != len(groups):
                    raise ValueError(
                        f"round {server_round}: client {pid} sent {key} for {len(record.get(key, []))} layers, "
                        f"the model has {len(groups)}; was it trained with privacy.mechanism = 'ldp'?"
                    )
        num_examples = [float(r[self.weighted_by_key]) for r in metrics]
        noise, clip = self.cfg["privacy.ldp_noise"], self.cfg["privacy.clip"]
        total = sum(v.size for v in global_state.values())
        new_state = dict(global_state)
        tau2s = []
        for index, (layer, keys) in enumerate(groups.items()):
            size = sum(global_state[k].size for k in keys)
            bound = layer_bound(noise, clip, size, total)
            variances = [
                noise_variance(noise, LayerBudget(r["ldp-epsilons"][index], r["ldp-deltas"][index]), bound)
                for r in metrics
            ]
            released = np.stack([
                np.concatenate([(u[k].astype(np.float64) - global_state[k]).ravel() for k in keys]) for u in uploads
            ])
            tau2 = estimate_tau2(released, variances) if self.cfg["privacy.tau2"] == "estimate" else 0.0
            step = aggregation_weights(num_examples, variances, tau2) @ released
            offset = 0
            for k in keys:
                part = step[offset : offset + global_state[k].size].reshape(global_state[k].shape)
                new_state[k] = (global_state[k] + part).astype(global_state[k].dtype)
                offset += global_state[k].size
            tau2s.append(tau2)
        self._log_budgets(pids, metrics)
        self.round_extra["tau2"] = tau2s
        train_metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: torch.from_numpy(v) for k, v in new_state.items()}), train_metrics

    def _log_budgets(self, pids: list[int], metrics: list[MetricRecord]) -> None:
        """Record each client's cumulative ε and this release's ε_{k,l}; log the worst client's (§7)."""
        for pid, record in zip(pids, metrics, strict=True):
            self.cumulative[pid] = float(record["epsilon"])
            self.layer_epsilons[pid] = [float(e) for e in record["ldp-epsilons"]]
        worst = min(self.cumulative, key=lambda pid: (-self.cumulative[pid], pid))
        self.round_extra["layer_epsilons"] = list(self.layer_epsilons[worst])

    # ------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """Each client's cumulative ε and latest per-layer budgets."""
        return {
            "cumulative": dict(self.cumulative),
            "layer_epsilons": {pid: list(v) for pid, v in self.layer_epsilons.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.cumulative = {int(p): float(v) for p, v in state["cumulative"].items()}
        self.layer_epsilons = {int(p): [float(e) for e in v] for p, v in state["layer_epsilons"].items()}
