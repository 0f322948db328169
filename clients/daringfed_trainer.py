"""DaringFed's client: decide from the offer and the signal, then train or decline.

Reference: Xin et al., *DaringFed: A Dynamic Bayesian Persuasion Pricing for
Online Federated Learning under Two-sided Incomplete Information*, IJCAI 2025,
arXiv 2505.05842, as formalized by fedlr in ``shared/specs/daringfed.md``.

The client's side of two-sided incomplete information (§2, §7): its CPU
frequency θ_{i,t} exists only here, regenerated from (run seed, partition id,
arrival t) by :func:`fedlr.pricing.client_theta`; the bandwidth state τ_t is
never received, only the public offer and the signal. The decision is
:func:`fedlr.pricing.join_decision`, the same function the game-only oracle
plays (§7). A participant trains with the dense trainer of FedAvg.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, MetricRecord, RecordDict

from clients.trainer import train_dense
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.pricing import client_theta, join_decision, make_profile
from fedlr.pricing.protocol import (
    COMPUTE_TIME_KEY,
    EVAL_THETA_KEY,
    JOINED_KEY,
    REQUEST_KEY,
    THETA_REPORT_KEY,
    TYPE_REPORT,
    read_offer,
    upload_cost_model,
)

# Seed stream of the client's timing noise, keyed like fedlr.pricing.game's
# per-client streams (101 profile, 102 θ path) as (seed, client, stream, t).
TIMING_STREAM = 103


def measured_compute_time(
    seed: int, partition_id: int, t: int, workload: float, theta_ghz: float, noise: float
) -> float:
    """T_cmp = W_i/θ_{i,t} as the client's clock measures it, with relative error N(0, noise²) (§6).

    Seeded by (seed, partition id, t), so a resumed run measures the same time.
    """
    z = np.random.default_rng([seed, partition_id, TIMING_STREAM, t]).standard_normal()
    return workload / (theta_ghz * 1e9) * (1.0 + noise * z)


def train_daringfed(cfg: Config, partition_id: int, content: RecordDict, context: Context) -> RecordDict:
    """One arrival of client ``partition_id`` (§3 steps 4–6, §7).

    Reads the offer (μ_t, π_t, γ_t) and the signal σ_t, forms its posterior and
    joins iff γ_t ≥ E_{μ_σ}[c_i(θ_{i,t}, τ)]. Declining replies ``{joined: 0}``
    and no arrays; joining trains like FedAvg's client and adds ``joined = 1``
    and the measured computation time. Both add ``eval-theta`` for the
    server's error log. Under the oracle benchmarks a type report request is
    answered with θ_{i,t} itself.
    """
    config = content["config"]
    t = int(config["server-round"])
    # Private. It travels only in an oracle's type report and as the logging-only eval-theta
    # (fedlr.pricing.protocol); no decision of the server depends on the latter.
    theta = client_theta(cfg["seed"], partition_id, t)
    if config.get(REQUEST_KEY) == TYPE_REPORT:
        return RecordDict({"metrics": MetricRecord({THETA_REPORT_KEY: theta})})
    num_examples = len(load_federated_data(cfg).partitions[partition_id])
    profile = make_profile(cfg["seed"], partition_id, num_examples, cfg["local_epochs"])
    offer, signal = read_offer(config)
    if not join_decision(offer, signal, theta, profile, upload_cost_model(content["arrays"])):
        return RecordDict({"metrics": MetricRecord({JOINED_KEY: 0, EVAL_THETA_KEY: theta})})
    reply = train_dense(cfg, partition_id, content, context)
    compute_time = measured_compute_time(
        cfg["seed"], partition_id, t, profile.workload, theta, cfg["pricing.time_noise"]
    )
    metrics = reply["metrics"]
    metrics[JOINED_KEY] = 1
    metrics[COMPUTE_TIME_KEY] = compute_time
    metrics[EVAL_THETA_KEY] = theta
    return reply
