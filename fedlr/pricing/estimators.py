"""DaringFed online estimators: what the server learns about clients and its own state (§6).

Reference: Xin et al., *DaringFed*, IJCAI 2025, arXiv 2505.05842. The paper's
estimator was not available; these are fedlr's estimators of
``shared/specs/daringfed.md`` §6. The server never reads θ_{i,t}: it sees only
a participant's reported completion time, from which :func:`recover_theta`
inverts the time model.

Every estimator has ``state_dict()``/``load_state_dict()`` over plain Python
floats and NumPy arrays, so a run can be checkpointed and resumed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri

from fedlr.pricing.game import (
    HI,
    THETA_SUPPORT_GHZ,
    ClientProfile,
    CostModel,
    Offer,
    compute_cost,
    join_probability,
    state_costs,
    upload_time,
)

__all__ = [
    "THETA_EDGES",
    "THETA_GRID",
    "ClientEstimate",
    "ClientTypeEstimator",
    "PriorEstimator",
    "ServerBeliefs",
    "TypeDistributionEstimator",
    "recover_theta",
]

# F̂ lives on 16 equal cells of the θ support (§6).
THETA_EDGES = np.linspace(*THETA_SUPPORT_GHZ, 17)
THETA_GRID = 0.5 * (THETA_EDGES[1:] + THETA_EDGES[:-1])
# Equal-mass points of N(0, 1): a returning client's computation-cost belief for
# the distributional design is k̂ + σ̂_k·z_m on these 16 quantiles.
_NORMAL_POINTS = ndtri((np.arange(THETA_GRID.size) + 0.5) / THETA_GRID.size)


def recover_theta(t_obs: float, tau_mhz: float, profile: ClientProfile, cost_model: CostModel) -> float:
    """θ_obs = W_i/(T_obs − S/r_i(τ_t)) from a participant's reported completion time (§6), in GHz.

    [fedlr] choice: the result is projected onto the physical support
    [0.5, 2] GHz; with 5 % timing noise T_obs − S/r can come out tiny or
    negative, which means "at least as fast as the fastest CPU".
    """
    lo, hi = THETA_SUPPORT_GHZ
    compute_s = t_obs - upload_time(tau_mhz, profile, cost_model)
    if compute_s * hi * 1e9 <= profile.workload:
        return hi
    return float(np.clip(profile.workload / (compute_s * 1e9), lo, hi))


@dataclass(frozen=True, eq=False)
class ClientEstimate:
    """The server's belief about an arriving client's computation cost (§5, §6).

    Parameters
    ----------
    theta_hat
        θ̂_i in GHz (the F̂ mean for a client never seen).
    compute_cost_hat
        k_i(θ̂_i).
    delta
        Cost margin δ = 2σ̂_k of the ``"ce"`` design.
    type_costs, type_weights
        Belief over computation costs for the ``"distributional"`` design.
    seen
        Whether the client has participated before.
    """

    theta_hat: float
    compute_cost_hat: float
    delta: float
    type_costs: np.ndarray
    type_weights: np.ndarray
    seen: bool


def _check_shape(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.array(value, dtype=float)
    if array.shape != shape:
        raise ValueError(f"state_dict[{name!r}] has shape {array.shape}, expected {shape}")
    return array


class PriorEstimator:
    """Published prior μ̂ ← (1 − ρ)·μ̂ + ρ·1[τ_t = τ^hi], ρ = 0.05 (§6).

    The server allocates τ_t itself, so it observes the state at every
    arrival, joined or not.

    Parameters
    ----------
    mu0
        Initial μ̂; [fedlr] choice: 0.5, the uninformative prior.
    rate
        ρ, the exponential forgetting rate.
    """

    def __init__(self, mu0: float = 0.5, rate: float = 0.05) -> None:
        self.rate = rate
        self._mu = float(mu0)

    @property
    def mu(self) -> float:
        return self._mu

    def update(self, state: int) -> None:
        self._mu = (1.0 - self.rate) * self._mu + self.rate * float(state == HI)

    def state_dict(self) -> dict[str, float]:
        return {"mu": self._mu}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._mu = float(state["mu"])


class TypeDistributionEstimator:
    """F̂ over 16 θ cells: Dirichlet(1) counts, forgetting 0.99, inverse-propensity weights (§6).

    Participants are a censored sample (expensive types decline), so a
    participant in cell m counts 1/P(join | θ_m) under the design that was
    committed for it (§11 "Censoring").

    [fedlr] choices: forgetting discounts the data, not the Dirichlet(1)
    prior (α ← 1 + λ(α − 1) + w·e_m), so F̂ stays positive in cells the
    designs never recruit; propensities are floored at ``propensity_floor``
    so that one surprising participant cannot dominate F̂. F̂ is the posterior
    mean α/Σα.
    """

    def __init__(self, forgetting: float = 0.99, propensity_floor: float = 0.25) -> None:
        self.forgetting = forgetting
        self.propensity_floor = propensity_floor
        self._alpha = np.ones(THETA_GRID.size)

    @property
    def probs(self) -> np.ndarray:
        return self._alpha / self._alpha.sum()

    def mean(self) -> float:
        """E_F̂[θ] in GHz."""
        return float(self.probs @ THETA_GRID)

    @staticmethod
    def cell(theta_ghz: float) -> int:
        """Index of the θ cell containing ``theta_ghz`` (the support's edges included)."""
        return int(np.clip(np.searchsorted(THETA_EDGES, theta_ghz, side="right") - 1, 0, THETA_GRID.size - 1))

    def update(self, theta_obs: float, propensity: np.ndarray) -> None:
        """Add one participant with recovered type ``theta_obs``; ``propensity[m]`` = P(join | θ_m)."""
        m = self.cell(theta_obs)
        self._alpha = 1.0 + self.forgetting * (self._alpha - 1.0)
        self._alpha[m] += 1.0 / max(float(propensity[m]), self.propensity_floor)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"alpha": self._alpha.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._alpha = _check_shape("alpha", state["alpha"], (THETA_GRID.size,))


class ClientTypeEstimator:
    """Per-client θ̂_i ← 0.8·θ̂_i + 0.2·θ_obs and the running spread σ̂_k of its cost residuals (§6).

    The residual is k_i(θ_obs) − k_i(θ̂_prev), the cost error the design would
    have made. [fedlr] choice: σ̂_k is the running (Welford) standard deviation
    shrunk towards the population spread σ_F with ``prior_strength``
    pseudo-observations, σ̂_k² = (n₀σ_F² + M₂)/(n₀ + n − 1), so one or two
    lucky residuals cannot collapse the margin; it tends to the plain running
    sd as n grows.

    Parameters
    ----------
    num_clients
        Size of the client population (ids 0 … N − 1).
    smoothing
        Weight of the new observation, 0.2.
    prior_strength
        n₀, pseudo-observations of σ_F in σ̂_k.
    """

    def __init__(self, num_clients: int, smoothing: float = 0.2, prior_strength: float = 2.0) -> None:
        self.smoothing = smoothing
        self.prior_strength = prior_strength
        self._theta_hat = np.full(num_clients, np.nan)
        self._count = np.zeros(num_clients)
        self._resid_mean = np.zeros(num_clients)
        self._resid_m2 = np.zeros(num_clients)

    def seen(self, client: int) -> bool:
        return bool(self._count[client] > 0)

    def theta_hat(self, client: int) -> float:
        return float(self._theta_hat[client])

    def residual_sd(self, client: int, population_sd: float) -> float:
        """σ̂_k of ``client``, shrunk towards ``population_sd``; the population value if never seen."""
        n = self._count[client]
        if n == 0:
            return population_sd
        pooled = self.prior_strength * population_sd**2 + self._resid_m2[client]
        return math.sqrt(pooled / (self.prior_strength + n - 1.0))

    def update(self, client: int, theta_obs: float, theta_prev: float, residual: float) -> None:
        """Fold in one participation: θ̂ from ``theta_prev`` (the estimate the design used) and a residual."""
        self._theta_hat[client] = (1.0 - self.smoothing) * theta_prev + self.smoothing * theta_obs
        self._count[client] += 1
        d = residual - self._resid_mean[client]
        self._resid_mean[client] += d / self._count[client]
        self._resid_m2[client] += d * (residual - self._resid_mean[client])

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "theta_hat": self._theta_hat.copy(),
            "count": self._count.copy(),
            "resid_mean": self._resid_mean.copy(),
            "resid_m2": self._resid_m2.copy(),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        shape = self._theta_hat.shape
        self._theta_hat = _check_shape("theta_hat", state["theta_hat"], shape)
        self._count = _check_shape("count", state["count"], shape)
        self._resid_mean = _check_shape("resid_mean", state["resid_mean"], shape)
        self._resid_m2 = _check_shape("resid_m2", state["resid_m2"], shape)


class ServerBeliefs:
    """Everything the server has learned: μ̂, F̂ and every client's θ̂_i, σ̂_k (§6).

    The server-side interface of the estimators. It reads only what the
    server holds: the state τ_t it allocated, the committed offer, a
    participant's reported completion time (through :func:`recover_theta`)
    and public profiles.

    Parameters
    ----------
    num_clients
        Size of the client population.
    mu0
        Initial published prior μ̂.
    margin_sds
        δ = ``margin_sds``·σ̂_k, 2 in §6.
    """

    def __init__(self, num_clients: int, mu0: float = 0.5, margin_sds: float = 2.0) -> None:
        self.margin_sds = margin_sds
        self.prior = PriorEstimator(mu0)
        self.types = TypeDistributionEstimator()
        self.clients = ClientTypeEstimator(num_clients)

    @property
    def mu(self) -> float:
        """μ_t, the prior the server publishes with the next offer."""
        return self.prior.mu

    def client_estimate(self, client: int, profile: ClientProfile, cost_model: CostModel) -> ClientEstimate:
        """θ̂, k̂, δ and a type belief for an arriving client (§5, §6).

        Never seen: θ̂ = E_F̂[θ], δ = 2·sd_F̂[k_i(θ)], type belief (k_i(θ_m), F̂_m).
        Seen: θ̂_i, δ = 2σ̂_k, and [fedlr] choice for the distributional design:
        16 equal-mass points of N(k̂, σ̂_k²), clipped to the range of k_i on the
        support (the spec leaves a returning client's belief open).
        """
        grid_costs = compute_cost(THETA_GRID, profile.workload, cost_model)
        weights = self.types.probs
        population_sd = float(np.sqrt(weights @ (grid_costs - weights @ grid_costs) ** 2))
        if not self.clients.seen(client):
            theta_hat = self.types.mean()
            return ClientEstimate(
                theta_hat, compute_cost(theta_hat, profile.workload, cost_model), self.margin_sds * population_sd,
                grid_costs, weights, False,
            )
        theta_hat = self.clients.theta_hat(client)
        k_hat = compute_cost(theta_hat, profile.workload, cost_model)
        sd = self.clients.residual_sd(client, population_sd)
        type_costs = np.clip(k_hat + sd * _NORMAL_POINTS, grid_costs.min(), grid_costs.max())
        weights = np.full(type_costs.size, 1.0 / type_costs.size)
        return ClientEstimate(theta_hat, k_hat, self.margin_sds * sd, type_costs, weights, True)

    def observe_state(self, state: int) -> None:
        """Record the state τ_t the server allocated at this arrival (updates μ̂)."""
        self.prior.update(state)

    def observe_participant(
        self, client: int, theta_obs: float, offer: Offer, profile: ClientProfile, cost_model: CostModel
    ) -> None:
        """Record a participant's recovered type ``theta_obs`` under the ``offer`` it accepted.

        Updates θ̂_i and σ̂_k from the residual against the estimate used for
        the design, then F̂ with propensity P(join | θ_m) under ``offer``.
        """
        theta_prev = self.clients.theta_hat(client) if self.clients.seen(client) else self.types.mean()
        k_obs, k_prev = compute_cost(np.array([theta_obs, theta_prev]), profile.workload, cost_model)
        residual = float(k_obs - k_prev)
        self.clients.update(client, theta_obs, theta_prev, residual)
        grid_costs = compute_cost(THETA_GRID, profile.workload, cost_model)
        self.types.update(theta_obs, join_probability(offer, grid_costs, state_costs(profile, cost_model)))

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {
            "prior": self.prior.state_dict(),
            "types": self.types.state_dict(),
            "clients": self.clients.state_dict(),
        }

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        self.prior.load_state_dict(state["prior"])
        self.types.load_state_dict(state["types"])
        self.clients.load_state_dict(state["clients"])
