"""What travels in one DaringFed arrival: the §7 wire format shared by the ServerApp and the ClientApp.

Reference: Xin et al., *DaringFed*, IJCAI 2025, arXiv 2505.05842, as formalized
by fedlr in ``shared/specs/daringfed.md`` §7. Plain dictionaries of scalars and
lists, so this module needs no Flower: ``strategies.daringfed`` wraps them in a
``ConfigRecord`` and ``clients.daringfed_trainer`` in a ``MetricRecord``.

Down (server → arriving client), with the global model as an ArrayRecord:
``{server-round: t, mu: μ_t, x: [π(join|τ^lo), π(join|τ^hi)], price: γ_t, signal: σ_t}``.
The state τ_t is never in it. Under the two oracle benchmarks the server first
asks for a type report, ``{server-round: t, request: "type-report"}``.

Up: declined ``{joined: 0}``; joined ``{joined: 1, num-examples, train_loss,
compute-time}`` plus the trained model. [fedlr] deviation from §7's ``t_obs``:
the completion time T_obs = T_cmp + T_com contains the upload time S/r_i(τ_t),
which a client could only compute from τ_t; so the client reports the
computation time T_cmp its own clock measured and the server, which allocated
τ_t and received the upload, adds T_com (§6). Every reply also carries
``eval-theta``, the client's true θ_{i,t}, for the ``theta_error`` log only
(see ``strategies.daringfed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedlr.pricing.game import HI, CostModel, Offer

__all__ = [
    "COMPUTE_TIME_KEY",
    "EVAL_THETA_KEY",
    "JOINED_KEY",
    "REQUEST_KEY",
    "THETA_REPORT_KEY",
    "TYPE_REPORT",
    "offer_payload",
    "read_offer",
    "upload_cost_model",
]

REQUEST_KEY = "request"
TYPE_REPORT = "type-report"  # oracle benchmarks only: the client states its θ (complete information, §8)
THETA_REPORT_KEY = "theta"  # the type report's answer, GHz
JOINED_KEY = "joined"
COMPUTE_TIME_KEY = "compute-time"  # T_cmp measured by the client, seconds
EVAL_THETA_KEY = "eval-theta"  # ground truth for evaluation logging only, GHz


def offer_payload(offer: Offer, signal: int) -> dict[str, float | int | list[float]]:
    """The public offer (μ_t, x per state, γ_t) and the signal σ_t as config entries (§7).

    fedlr's designs have two signals with σ = 1 the "join" recommendation, so
    the scheme π is fully given by x = π(σ = 1 | τ) per state.
    """
    if offer.pi.shape != (2, 2):
        raise ValueError(f"the §7 payload carries binary schemes with two signals, got shape {offer.pi.shape}")
    return {
        "mu": float(offer.prior[HI]),
        "x": [float(v) for v in offer.pi[:, 1]],
        "price": float(offer.price),
        "signal": int(signal),
    }


def read_offer(config: Mapping[str, Any]) -> tuple[Offer, int]:
    """Inverse of :func:`offer_payload`: the committed :class:`Offer` and the received signal."""
    mu = float(config["mu"])
    x = np.asarray(config["x"], dtype=float)
    offer = Offer(prior=np.array([1.0 - mu, mu]), pi=np.column_stack([1.0 - x, x]), price=float(config["price"]))
    return offer, int(config["signal"])


def upload_cost_model(arrays: Mapping[str, Any]) -> CostModel:
    """Cost model with S = 32 × the number of entries of ``arrays``, the dense model a participant uploads (§2).

    Both sides derive it from the global model of the message, so they agree
    without exchanging it; ``arrays`` maps names to anything with a ``shape``.
    """
    return CostModel.for_model(sum(math.prod(a.shape) for a in arrays.values()))
