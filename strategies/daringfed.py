"""DaringFed's server: online FL with Bayesian-persuasion pricing of every arriving client.

Reference: Y. Xin, J. Lu, S. Cao, G. Li, H. Wang, G. Wen, *DaringFed: A Dynamic
Bayesian Persuasion Pricing for Online Federated Learning under Two-sided
Incomplete Information*, IJCAI 2025, arXiv 2505.05842. The paper's equations
were not available: section numbers (§) refer to fedlr's formalization in
``shared/specs/daringfed.md``, and the game itself lives in :mod:`fedlr.pricing`.

One round is one arrival t = 1…T (``rounds``). The server

1. takes the arriving client i_t and the bandwidth state τ_t it allocates from
   :func:`fedlr.pricing.draw_arrivals` (seeded, a pure function of the run's
   config, so every scheme and a resumed run see the same sequences, §7);
2. commits to a signaling scheme and a price under the cap γ_max,t from public
   data and its beliefs (:func:`fedlr.pricing.server_design`), draws σ_t from
   π_t(·|τ_t) and sends (μ_t, x, γ_t, σ_t) with the global model (§3, §7);
3. on "join", pays γ_t, mixes w ← (1 − α_t)·w + α_t·w_i with
   α_t = min(1, 0.5·D_i/D̄) (§3 step 6), recovers θ_obs from the reported
   computation time plus the upload time it knows, and updates θ̂_i, σ̂_k, F̂;
   in every case it updates μ̂ from τ_t (§6).

Who knows what (§2, §7): this module never computes a client's CPU frequency
θ_{i,t} (no call reaches ``client_theta`` or ``theta_paths``) and never sends
τ_t. Two exceptions are explicit: the oracle benchmarks (``full-information``, ``persuasion`` with
``pricing.tii = false``) assume complete information and *ask* the client for
θ in a type report before the offer; and :meth:`DaringFed._log_estimation`
reads the client's ``eval-theta`` only to log ``theta_error``, which
``tests/test_daringfed_strategy.py`` checks changes nothing the server does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedlr.config import Config
from fedlr.models import build_model
from fedlr.pricing import (
    HI,
    TAU_MHZ,
    THETA_GRID,
    ClientEstimate,
    Design,
    Offer,
    ServerBeliefs,
    SimulationConfig,
    calibrate,
    compute_cost,
    draw_arrivals,
    draw_signal,
    full_information_design,
    make_profile,
    mixing_weight,
    oii_design,
    per_arrival_cap,
    recover_theta,
    server_design,
    server_values,
    state_costs,
    upload_time,
)
from fedlr.pricing.protocol import (
    COMPUTE_TIME_KEY,
    EVAL_THETA_KEY,
    JOINED_KEY,
    REQUEST_KEY,
    THETA_REPORT_KEY,
    TYPE_REPORT,
    offer_payload,
    upload_cost_model,
)
from strategies.base import ClientFailure, FedlrStrategy


@dataclass(frozen=True)
class _Arrival:
    """What the server committed to at arrival t, kept until the reply comes back."""

    t: int
    partition: int
    state: int
    offer: Offer
    regime: str
    estimate: ClientEstimate
    gamma_max: float


class DaringFed(FedlrStrategy, FlowerFedAvg):
    """Online FL where each arriving client is offered a persuasion-priced contract (§3–§8).

    Parameters
    ----------
    cfg : Config
        The resolved configuration: ``rounds`` (= T arrivals), ``num_clients``,
        ``seed``, ``local_epochs`` and ``pricing.*``.
    node_to_partition : dict[int, int]
        Flower node id → partition id.
    input_shape : tuple[int, ...]
        Shape of one input sample; with ``num_classes`` it sets the model size
        S = 32 × #params of the upload (§2).
    num_classes : int
        Output classes of the network.
    partition_sizes : list[int]
        D_i of every partition, what each client reports at registration (§2).

    Notes
    -----
    The public world is rebuilt from the config exactly as the clients build
    their half: profiles from ``make_profile(seed, i, D_i, local_epochs)``, the
    cost model from the model size; server value ϑ, ψ and budget B from
    :func:`fedlr.pricing.calibrate` with the true μ (``pricing.mu``), as the
    game-only simulation does. ``metrics.jsonl`` gets, per arrival:
    ``partition``, ``joined``, ``price``, ``gamma_max``, ``regime``,
    ``server_utility`` (cumulative Σ a_t(V(τ_t) − γ_t)),
    ``participation_rate`` (joins / arrivals so far), ``budget_spent``,
    ``mu_hat`` (the μ_t published), ``mu_error`` = |μ_t − μ|, ``theta_error``
    = |θ̂_i − θ_{i,t}| of the estimate the design used, and ``sim_time`` (the
    Poisson clock, s). ``clients`` is 1 if the client trained, else 0.
    """

    def __init__(
        self,
        *,
        cfg: Config,
        node_to_partition: dict[int, int],
        input_shape: tuple[int, ...],
        num_classes: int,
        partition_sizes: list[int],
    ) -> None:
        super().__init__(cfg=cfg, node_to_partition=node_to_partition)
        if len(partition_sizes) != cfg["num_clients"]:
            raise ValueError(f"{len(partition_sizes)} partition sizes for num_clients = {cfg['num_clients']}")
        seed, horizon, mu = cfg["seed"], cfg["rounds"], cfg["pricing.mu"]
        self.cost_model = upload_cost_model(build_model(cfg, input_shape, num_classes).state_dict())
        self.profiles = [make_profile(seed, i, d, cfg["local_epochs"]) for i, d in enumerate(partition_sizes)]
        self.comm_costs = np.array([state_costs(p, self.cost_model) for p in self.profiles])
        self.mean_examples = float(np.mean(partition_sizes))
        vartheta, psi, self.budget = calibrate(
            self.profiles, self.cost_model, mu, horizon, THETA_GRID,
            cfg["pricing.value_factor"], cfg["pricing.psi_share"], cfg["pricing.budget_factor"], cfg["pricing.eps_loc"],
        )
        self.values = server_values(vartheta, psi, cfg["pricing.eps_loc"])
        self.gamma_cap = cfg["pricing.gamma_cap"] or math.inf  # 0 means no cap beyond the budget
        # The same streams as the game-only simulation of this seed (fedlr.pricing.simulate).
        self.arrivals = draw_arrivals(
            SimulationConfig(num_clients=cfg["num_clients"], horizon=horizon, mu=mu,
                             arrival_rate=cfg["pricing.arrival_rate"]),
            seed,
        )
        self.beliefs = ServerBeliefs(cfg["num_clients"])
        self.budget_left = self.budget
        self.cumulative_utility = 0.0
        self.joins = 0
        self._pending: _Arrival | None = None
        self._global: ArrayRecord | None = None

    # ------------------------------------------------------------- arrivals (§2)
    def sampled_partitions(self, server_round: int) -> list[int]:
        """The one client arriving at t = ``server_round``, uniform over clients and seeded (§2, §7)."""
        return [int(self.arrivals.clients[server_round - 1])]

    # ------------------------------------------------------------- down (§3 steps 1–3, §7)
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The offer and signal for the arriving client, with the global model, in one message."""
        t = server_round
        (partition,) = self.sampled_partitions(t)
        state = int(self.arrivals.states[t - 1])
        gamma_max = per_arrival_cap(self.budget_left, t, self.cfg["rounds"], self.gamma_cap)
        mu = self.beliefs.mu
        estimate = self.beliefs.client_estimate(partition, self.profiles[partition], self.cost_model)
        design = self._design(t, partition, state, mu, estimate, gamma_max, grid)
        offer = design.offer(mu)
        signal = draw_signal(offer.pi, state, float(self.arrivals.signal_u[t - 1]))
        self._pending = _Arrival(t, partition, state, offer, design.regime, estimate, gamma_max)
        self._global = arrays
        payload = ConfigRecord({**config, "server-round": t, **offer_payload(offer, signal)})
        content = RecordDict({"arrays": arrays, "config": payload})
        return [Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[partition])]

    def _design(
        self, t: int, partition: int, state: int, mu: float, estimate: ClientEstimate, gamma_max: float, grid: Grid
    ) -> Design:
        """The committed design of ``pricing.scheme`` (§5, §8).

        ``persuasion`` and the three baselines see only the server's estimate.
        The oracle benchmarks need the true cost, which the server obtains the
        only way it could: the client tells it (:meth:`_type_report`).
        """
        scheme = self.cfg["pricing.scheme"]
        comm_costs = self.comm_costs[partition]
        oracle = scheme == "full-information" or not self.cfg["pricing.tii"]
        if not oracle:
            return server_design(
                scheme, mu, estimate, comm_costs, self.values, gamma_max, self.budget / self.cfg["rounds"],
                self.cfg["pricing.tii_design"],
            )
        theta = self._type_report(t, partition, grid)
        costs = compute_cost(theta, self.profiles[partition].workload, self.cost_model) + comm_costs
        if scheme == "full-information":
            return full_information_design(state, costs, self.values, gamma_max)
        return oii_design(mu, costs, self.values, gamma_max)

    def _type_report(self, t: int, partition: int, grid: Grid) -> float:
        """θ_{i,t} as the arriving client states it: complete information, oracle benchmarks only (§8).

        A message without arrays before the offer; a failure or a missing reply
        fails the run like any client failure.
        """
        request = ConfigRecord({"server-round": t, REQUEST_KEY: TYPE_REPORT})
        sent = [Message(RecordDict({"config": request}), dst_node_id=self.node_of[partition],
                        message_type=MessageType.TRAIN)]
        replies = list(grid.send_and_receive(sent, timeout=self.cfg["simulation.round_timeout"]))
        (reply,) = self.check_replies(t, sent, replies)
        return float(reply.content["metrics"][THETA_REPORT_KEY])

    # ------------------------------------------------------------- up (§3 step 6, §6)
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Pay and mix in a participant, update the estimators, log the arrival.

        A declined reply (``joined = 0``, no arrays) is a normal outcome: the
        global model stays as it is because nobody trained. Anything else
        that does not match the protocol raises :class:`ClientFailure`.
        """
        arrival, arrays = self._pending, self._global
        if arrival is None or arrays is None or arrival.t != server_round:
            raise RuntimeError(f"round {server_round}: aggregate_train without a matching configure_train")
        self._pending = None
        metrics, upload = self._reply(arrival, list(replies))
        joined = int(metrics[JOINED_KEY])
        profile = self.profiles[arrival.partition]
        utility, train_metrics = 0.0, None
        if joined:
            self.budget_left -= arrival.offer.price
            utility = float(self.values[arrival.state] - arrival.offer.price)
            arrays = self._mix(arrays, upload, mixing_weight(profile.num_examples, self.mean_examples))
            # T_obs = T_cmp (the client's clock) + T_com = S/r_i(τ_t) (the server allocated τ_t), §6.
            tau = float(TAU_MHZ[arrival.state])
            completion = float(metrics[COMPUTE_TIME_KEY]) + upload_time(tau, profile, self.cost_model)
            theta_obs = recover_theta(completion, tau, profile, self.cost_model)
            self.beliefs.observe_participant(arrival.partition, theta_obs, arrival.offer, profile, self.cost_model)
            train_metrics = MetricRecord({"train_loss": float(metrics["train_loss"])})
        self.beliefs.observe_state(arrival.state)
        self.cumulative_utility += utility
        self.joins += joined
        self.round_extra.update(
            partition=arrival.partition,
            joined=joined,
            clients=joined,  # replaces run_rounds' count of replies: a declined reply trained nothing
            price=arrival.offer.price,
            gamma_max=arrival.gamma_max,
            regime=arrival.regime,
            server_utility=self.cumulative_utility,
            participation_rate=self.joins / server_round,
            budget_spent=self.budget - self.budget_left,
            sim_time=float(self.arrivals.times[server_round - 1]),
        )
        self._log_estimation(arrival, metrics)
        return arrays, train_metrics

    def _reply(self, arrival: _Arrival, replies: list[Message]) -> tuple[MetricRecord, ArrayRecord | None]:
        """The arriving client's metrics and upload, after checking the §7 reply shape."""
        where = f"round {arrival.t}: client {arrival.partition}"
        senders = [self.partition_of[m.metadata.src_node_id] for m in replies]
        if senders != [arrival.partition]:
            raise ClientFailure(f"round {arrival.t}: expected one reply from client {arrival.partition}, got {senders}")
        content = replies[0].content
        if len(content.metric_records) != 1:
            raise ClientFailure(f"{where} replied {len(content.metric_records)} metric records, expected 1")
        metrics = next(iter(content.metric_records.values()))
        joined = metrics.get(JOINED_KEY)
        if joined not in (0, 1):
            raise ClientFailure(f"{where} replied {JOINED_KEY} = {joined!r}, expected 0 or 1")
        if len(content.array_records) != joined:
            raise ClientFailure(
                f"{where} replied {JOINED_KEY} = {joined} with {len(content.array_records)} array records"
            )
        if not joined:
            return metrics, None
        expected = self.profiles[arrival.partition].num_examples
        if int(metrics["num-examples"]) != expected:
            raise ClientFailure(f"{where} trained on {int(metrics['num-examples'])} examples, registered {expected}")
        return metrics, next(iter(content.array_records.values()))

    def _mix(self, arrays: ArrayRecord, upload: ArrayRecord | None, alpha: float) -> ArrayRecord:
        """w ← (1 − α)·w + α·w_i (§3 step 6), in float64, cast back to each array's dtype."""
        if upload is None or set(upload) != set(arrays):
            raise ClientFailure(f"the upload's arrays {sorted(upload or {})} are not the model's {sorted(arrays)}")
        mixed: dict[str, torch.Tensor] = {}
        for key, array in arrays.items():
            w, w_i = array.numpy(), upload[key].numpy()
            mixed[key] = torch.from_numpy(((1.0 - alpha) * w.astype(np.float64) + alpha * w_i).astype(w.dtype))
        return ArrayRecord(mixed)

    # ------------------------------------------------------------- evaluation only
    def _log_estimation(self, arrival: _Arrival, metrics: MetricRecord) -> None:
        """``theta_error`` and ``mu_error`` for ``metrics.jsonl``; nothing here feeds back.

        The errors need ground truth that the server's decisions must not use:
        θ_{i,t} from the reply's ``eval-theta`` (the simulation's truth, sent
        for logging) and μ from ``pricing.mu``. They are written to
        ``round_extra`` and nowhere else.
        """
        mu_published = float(arrival.offer.prior[HI])
        self.round_extra.update(
            mu_hat=mu_published,
            mu_error=abs(mu_published - self.cfg["pricing.mu"]),
            theta_error=abs(arrival.estimate.theta_hat - float(metrics[EVAL_THETA_KEY])),
        )

    # ------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """The estimators (μ̂, F̂, θ̂_i, σ̂_k), the budget left, cumulative utility and joins."""
        return {
            "beliefs": self.beliefs.state_dict(),
            "budget_left": self.budget_left,
            "cumulative_utility": self.cumulative_utility,
            "joins": self.joins,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.beliefs.load_state_dict(state["beliefs"])
        self.budget_left = float(state["budget_left"])
        self.cumulative_utility = float(state["cumulative_utility"])
        self.joins = int(state["joins"])
