"""DaringFed stage game: model primitives, utilities and the client's best response.

Reference: Y. Xin, J. Lu, S. Cao, G. Li, H. Wang, G. Wen, *DaringFed: A Dynamic
Bayesian Persuasion Pricing for Online Federated Learning under Two-sided
Incomplete Information*, IJCAI 2025, arXiv 2505.05842. The paper's formulas were
not available: every section number (§) below refers to fedlr's own
formalization in ``shared/specs/daringfed.md``, never to the paper's equations.

Who knows what (§2, §7):

- public: the client's registration :class:`ClientProfile` (workload W_i,
  transmit power p_i, channel gain g_i, #examples D_i), the cost model, and the
  committed :class:`Offer` (prior μ_t, scheme π_t, price γ_t) with the signal σ_t;
- client-private: its CPU frequency θ_{i,t} (GHz);
- server-private: the uplink bandwidth state τ_t (MHz).

Each function takes only what its owner holds. :func:`join_decision`, the
client's whole participation rule, never sees τ; nothing the server calls to
design an offer takes θ. States are indexed ``(τ^lo, τ^hi) = (LO, HI) = (0, 1)``
and a binary prior is written μ = P(τ^hi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AR_COEF",
    "AR_NOISE_SD",
    "HI",
    "LO",
    "NOISE_PSD",
    "TAU_MHZ",
    "THETA_SUPPORT_GHZ",
    "TIE_SLACK",
    "ClientProfile",
    "CostModel",
    "Offer",
    "StageOutcome",
    "best_response",
    "calibrate",
    "client_theta",
    "communication_cost",
    "completion_time",
    "compute_cost",
    "draw_signal",
    "expected_cost",
    "expected_outcome",
    "join_decision",
    "join_probability",
    "join_threshold",
    "make_profile",
    "mixing_weight",
    "path_loss_gain",
    "per_arrival_cap",
    "play_stage",
    "posterior",
    "prior_expected_cost",
    "server_values",
    "state_costs",
    "theta_paths",
    "upload_time",
    "uplink_rate",
]

# The two bandwidth states (§2), indexed LO = 0, HI = 1.
TAU_MHZ = np.array([0.5, 2.0])
LO, HI = 0, 1
THETA_SUPPORT_GHZ = (0.5, 2.0)
# AR(1) type process θ_{t+1} = a·θ_t + (1 − a)·θ̄ + N(0, s²) (§2).
AR_COEF = 0.9
AR_NOISE_SD = 0.1
# N₀ = −174 dBm/Hz in W/Hz.
NOISE_PSD = 10.0 ** ((-174.0 - 30.0) / 10.0)
# Ties go to "join", the server-preferred action (§3 step 5); the slack absorbs
# the rounding between the server's design and the client's Bayes update.
TIE_SLACK = 1e-9
BITS_PER_PARAM = 32
# Generator streams keyed by (seed, client_id, stream) so that the server (profile)
# and the ClientApp (θ path) regenerate the same draws independently (§7).
PROFILE_STREAM = 101
THETA_STREAM = 102


# --------------------------------------------------------------------------- model (§2)


@dataclass(frozen=True)
class CostModel:
    """Constants of the separable cost c_i(θ, τ) = k_i(θ) + h_i(τ) (§2).

    Parameters
    ----------
    model_bits
        S, the upload size in bits (32 × #params).
    kappa
        κ, effective switched capacitance of the client CPU.
    omega_energy
        ω_E, weight of energy (1/J).
    omega_time
        ω_T, weight of time (1/s).
    noise_psd
        N₀, noise power spectral density (W/Hz).
    """

    model_bits: float
    kappa: float = 1e-28
    omega_energy: float = 1.0
    omega_time: float = 0.1
    noise_psd: float = NOISE_PSD

    @classmethod
    def for_model(cls, num_params: int, **kwargs: float) -> CostModel:
        """Cost model for a network of ``num_params`` float32 parameters (S = 32·#params)."""
        return cls(model_bits=float(BITS_PER_PARAM * num_params), **kwargs)


@dataclass(frozen=True)
class ClientProfile:
    """What a client reports at registration; public to the server (§2).

    Parameters
    ----------
    workload
        W_i = L·c_i·D_i, CPU cycles of one local round.
    tx_power
        p_i, uplink transmit power (W).
    channel_gain
        g_i, linear channel gain (path loss).
    num_examples
        D_i, local dataset size (also sets the online mixing weight, §3 step 6).
    """

    workload: float
    tx_power: float
    channel_gain: float
    num_examples: int


def path_loss_gain(distance_km: float | np.ndarray) -> float | np.ndarray:
    """Linear channel gain of the path loss 128.1 + 37.6·log₁₀ d dB, d in km (§2)."""
    return 10.0 ** (-(128.1 + 37.6 * np.log10(distance_km)) / 10.0)


def make_profile(seed: int, client_id: int, num_examples: int, local_epochs: int = 1) -> ClientProfile:
    """Draw a client's public profile with the §2 defaults.

    c_i ~ U[0.5, 1.5]·10⁶ cycles/sample, p_i = 0.2 W, d_i ~ U[0.1, 0.5] km. The
    draw is keyed by ``(seed, client_id)`` so the server and the client derive
    the same profile without exchanging it.
    """
    rng = np.random.default_rng([seed, client_id, PROFILE_STREAM])
    cycles_per_sample = rng.uniform(0.5e6, 1.5e6)
    distance_km = rng.uniform(0.1, 0.5)
    return ClientProfile(
        workload=float(local_epochs * cycles_per_sample * num_examples),
        tx_power=0.2,
        channel_gain=float(path_loss_gain(distance_km)),
        num_examples=int(num_examples),
    )


def compute_cost(theta_ghz: float | np.ndarray, workload: float, cost_model: CostModel) -> float | np.ndarray:
    """Computation cost k_i(θ) = ω_E·κ·W_i·θ² + ω_T·W_i/θ (§2), θ in GHz.

    Energy grows and time shrinks with θ, so k is convex with its minimum at
    θ* = (ω_T/(2 ω_E κ))^{1/3}: a faster CPU is not always cheaper.
    """
    theta_hz = np.asarray(theta_ghz, dtype=float) * 1e9
    energy = cost_model.kappa * workload * theta_hz**2
    cost = cost_model.omega_energy * energy + cost_model.omega_time * workload / theta_hz
    return float(cost) if cost.ndim == 0 else cost


def uplink_rate(
    tau_mhz: float | np.ndarray, tx_power: float, channel_gain: float, noise_psd: float
) -> float | np.ndarray:
    """Shannon rate r_i(τ) = τ·log₂(1 + p_i g_i/(N₀ τ)) in bit/s, τ in MHz (§2)."""
    bandwidth_hz = np.asarray(tau_mhz, dtype=float) * 1e6
    rate = bandwidth_hz * np.log2(1.0 + tx_power * channel_gain / (noise_psd * bandwidth_hz))
    return float(rate) if rate.ndim == 0 else rate


def upload_time(tau_mhz: float | np.ndarray, profile: ClientProfile, cost_model: CostModel) -> float | np.ndarray:
    """Upload time T_com = S/r_i(τ) in seconds (§2, §6)."""
    return cost_model.model_bits / uplink_rate(tau_mhz, profile.tx_power, profile.channel_gain, cost_model.noise_psd)


def communication_cost(
    tau_mhz: float | np.ndarray, profile: ClientProfile, cost_model: CostModel
) -> float | np.ndarray:
    """Communication cost h_i(τ) = (ω_E·p_i + ω_T)·S/r_i(τ) (§2)."""
    power_weight = cost_model.omega_energy * profile.tx_power + cost_model.omega_time
    return power_weight * upload_time(tau_mhz, profile, cost_model)


def state_costs(profile: ClientProfile, cost_model: CostModel) -> np.ndarray:
    """h_i over the states ``(τ^lo, τ^hi)``; public, since the server knows the profile (§2).

    h_i(τ^lo) > h_i(τ^hi) always (the rate grows with bandwidth), which is what
    makes c_hi < c_lo in the §3 threshold.
    """
    return np.asarray(communication_cost(TAU_MHZ, profile, cost_model), dtype=float)


def completion_time(theta_ghz: float, tau_mhz: float, profile: ClientProfile, cost_model: CostModel) -> float:
    """Noise-free round time T_cmp + T_com = W_i/θ + S/r_i(τ) in seconds (§6)."""
    return float(profile.workload / (theta_ghz * 1e9) + upload_time(tau_mhz, profile, cost_model))


def server_values(vartheta: float, psi: float, eps_loc: float = 0.1) -> np.ndarray:
    """Server value V(τ) = ϑ(1 − ε_loc) − ψ·τ[MHz] over ``(τ^lo, τ^hi)`` (§2).

    ψ prices the bandwidth the server spends, so V^hi < V^lo: the server prefers
    recruiting in the state where the client's upload is dearer to it.
    """
    return vartheta * (1.0 - eps_loc) - psi * TAU_MHZ


def prior_expected_cost(profile: ClientProfile, cost_model: CostModel, mu: float, theta_grid: np.ndarray) -> float:
    """E[c_i] under a uniform type belief on ``theta_grid`` and the prior μ (§2 defaults).

    [fedlr] choice: "prior-expected" is taken before any observation, so θ is
    averaged under the type prior the server holds at start (uniform on the
    support), which keeps the calibration a function of public data only.
    """
    h = state_costs(profile, cost_model)
    k = compute_cost(theta_grid, profile.workload, cost_model)
    return float(np.mean(k) + mu * h[HI] + (1.0 - mu) * h[LO])


def calibrate(
    profiles: list[ClientProfile] | tuple[ClientProfile, ...],
    cost_model: CostModel,
    mu: float,
    horizon: int,
    theta_grid: np.ndarray,
    value_factor: float = 1.5,
    psi_share: float = 0.2,
    budget_factor: float = 0.5,
    eps_loc: float = 0.1,
) -> tuple[float, float, float]:
    """Server value and budget from the §2 defaults.

    ϑ(1 − ε_loc) = ``value_factor`` × the median prior-expected cost,
    ψ·τ^hi = ``psi_share``·ϑ(1 − ε_loc), and B = ``budget_factor``·T·(median
    prior-expected cost).

    Returns
    -------
    vartheta, psi, budget
    """
    median_cost = float(np.median([prior_expected_cost(p, cost_model, mu, theta_grid) for p in profiles]))
    value_base = value_factor * median_cost
    return value_base / (1.0 - eps_loc), psi_share * value_base / TAU_MHZ[HI], budget_factor * horizon * median_cost


def per_arrival_cap(budget_left: float, t: int, horizon: int, gamma_cap: float = math.inf) -> float:
    """γ_max,t = min(γ_cap, B_remaining/(T − t + 1)) for arrival t ∈ {1, …, T} (§2).

    Since a payment never exceeds the cap, B_remaining/(T − t + 1) is
    non-decreasing in t and total spending never exceeds B.
    """
    if not 1 <= t <= horizon:
        raise ValueError(f"arrival t={t} outside 1..{horizon}")
    return min(gamma_cap, max(budget_left, 0.0) / (horizon - t + 1))


def mixing_weight(num_examples: int, mean_examples: float) -> float:
    """Online aggregation weight α_t = min(1, 0.5·D_i/D̄) of w ← (1 − α_t)w + α_t w_i (§3 step 6)."""
    return min(1.0, 0.5 * num_examples / mean_examples)


# --------------------------------------------------------------------------- client type process (§2)


def theta_paths(
    seed: int,
    client_ids: np.ndarray | list[int],
    horizon: int,
    theta_bar_range: tuple[float, float] = THETA_SUPPORT_GHZ,
) -> tuple[np.ndarray, np.ndarray]:
    """Private CPU frequencies θ_{i,t}, t = 1…T, of the given clients (§2).

    θ̄_i ~ U[``theta_bar_range``] and θ_{i,t+1} = 0.9·θ_{i,t} + 0.1·θ̄_i + N(0, 0.1²),
    clipped to [0.5, 2] GHz, in global arrival time t (a client's frequency keeps
    drifting while other clients arrive). [fedlr] choice: θ_{i,1} is drawn from
    the unclipped stationary law N(θ̄_i, 0.1²/(1 − 0.9²)) and clipped, so the
    population is stationary from the first arrival. Each client's draws come
    from its own generator keyed by ``(seed, client_id)``, so a path is a
    prefix of any longer one and the ClientApp can regenerate θ_{i,t} alone.

    Returns
    -------
    theta_bar
        (N,) long-run means θ̄_i.
    theta
        (N, T) with ``theta[n, t - 1]`` = θ_{client_ids[n], t}.
    """
    if horizon < 1:
        raise ValueError(f"horizon={horizon} must be >= 1")
    ids = np.asarray(client_ids, dtype=int)
    theta_bar = np.empty(ids.size)
    z0 = np.empty(ids.size)
    innovations = np.empty((ids.size, max(horizon - 1, 0)))
    for n, cid in enumerate(ids):
        rng = np.random.default_rng([seed, int(cid), THETA_STREAM])
        theta_bar[n] = rng.uniform(*theta_bar_range)
        z0[n] = rng.standard_normal()
        innovations[n] = rng.standard_normal(max(horizon - 1, 0))
    lo, hi = THETA_SUPPORT_GHZ
    theta = np.empty((ids.size, horizon))
    theta[:, 0] = np.clip(theta_bar + AR_NOISE_SD / math.sqrt(1.0 - AR_COEF**2) * z0, lo, hi)
    for t in range(1, horizon):
        drift = AR_COEF * theta[:, t - 1] + (1.0 - AR_COEF) * theta_bar
        theta[:, t] = np.clip(drift + AR_NOISE_SD * innovations[:, t - 1], lo, hi)
    return theta_bar, theta


def client_theta(seed: int, client_id: int, t: int, theta_bar_range: tuple[float, float] = THETA_SUPPORT_GHZ) -> float:
    """θ_{i,t} as the ClientApp regenerates it from (run seed, partition id, t) (§7)."""
    return float(theta_paths(seed, [client_id], t, theta_bar_range)[1][0, t - 1])


# --------------------------------------------------------------------------- offer, Bayes, best response (§3)


@dataclass(frozen=True, eq=False)
class Offer:
    """The server's public commitment for one arrival: (μ_t, π_t, γ_t) (§3 step 2).

    Parameters
    ----------
    prior
        (K,) prior over states; for the binary game ``[1 − μ, μ]``.
    pi
        (K, S) signaling scheme π(σ|τ); rows sum to 1. fedlr's designs use S = 2
        with σ = 1 the "join" recommendation (the higher posterior of τ^hi), so
        the §7 record's "x per state" is ``pi[:, 1]``.
    price
        γ_t, paid on joining.
    """

    prior: np.ndarray
    pi: np.ndarray
    price: float

    def __post_init__(self) -> None:
        prior, pi = np.asarray(self.prior, dtype=float), np.asarray(self.pi, dtype=float)
        if prior.ndim != 1 or pi.ndim != 2 or pi.shape[0] != prior.size:
            raise ValueError(f"prior of shape {prior.shape} does not match scheme of shape {pi.shape}")
        if prior.min() < 0.0 or abs(prior.sum() - 1.0) > 1e-12:
            raise ValueError(f"prior {prior} is not a probability vector")
        if pi.min() < -1e-15 or np.abs(pi.sum(axis=1) - 1.0).max() > 1e-12:
            raise ValueError(f"rows of the scheme {pi.tolist()} are not probability vectors")
        if not (math.isfinite(self.price) and self.price >= 0.0):
            raise ValueError(f"price {self.price} must be finite and non-negative")
        object.__setattr__(self, "prior", prior)
        # Rounding in a design can leave -1e-17 entries; a probability is never negative.
        object.__setattr__(self, "pi", np.maximum(pi, 0.0) if pi.min() < 0.0 else pi)


def posterior(prior: np.ndarray, pi: np.ndarray, signal: int) -> np.ndarray:
    """Bayes' rule μ_σ(τ) ∝ μ(τ)·π(σ|τ) (§3 step 4, consistency).

    Raises
    ------
    ValueError
        If σ has probability zero under (μ, π): no client can receive it.
    """
    joint = np.asarray(prior, dtype=float) * np.asarray(pi, dtype=float)[:, signal]
    mass = joint.sum()
    if mass <= 0.0:
        raise ValueError(f"signal {signal} has probability zero under the committed scheme")
    return joint / mass


def expected_cost(
    belief: np.ndarray, compute_cost_value: float | np.ndarray, comm_costs: np.ndarray
) -> float | np.ndarray:
    """E_{μ_σ}[c] = k + Σ_τ μ_σ(τ)·h(τ), separable costs (§2, §3 step 5)."""
    return compute_cost_value + float(np.dot(belief, comm_costs))


def best_response(
    belief: np.ndarray, price: float, compute_cost_value: float | np.ndarray, comm_costs: np.ndarray
) -> bool | np.ndarray:
    """The client's best response: join iff γ ≥ E_{μ_σ}[c] (§3 step 5), ties to "join".

    Vectorized over ``compute_cost_value`` so the server can evaluate a whole
    type grid; the client evaluates its own scalar cost.
    """
    joins = price >= expected_cost(belief, compute_cost_value, comm_costs) - TIE_SLACK
    return joins if isinstance(joins, np.ndarray) else bool(joins)


def join_decision(offer: Offer, signal: int, theta_ghz: float, profile: ClientProfile, cost_model: CostModel) -> bool:
    """The client's participation decision, a pure function of what the client holds (§3, §7).

    Inputs are the public offer, the received signal, the client's own private
    CPU frequency and its own cost model; the bandwidth state τ is not an
    argument, so the decision cannot depend on it except through σ. The
    ClientApp and the game-only oracle both call this function.

    Returns
    -------
    bool
        True iff γ ≥ E_{μ_σ}[c_i(θ, τ)] − 1e-9.
    """
    belief = posterior(offer.prior, offer.pi, signal)
    k = compute_cost(theta_ghz, profile.workload, cost_model)
    return bool(best_response(belief, offer.price, k, state_costs(profile, cost_model)))


def join_threshold(price: float, cost_lo: float, cost_hi: float) -> float:
    """q(γ) = (c_lo − γ)/(c_lo − c_hi), clipped to [0, 1]: join iff μ_σ ≥ q (§3, binary threshold)."""
    if not cost_hi < cost_lo:
        raise ValueError(f"the binary threshold needs c_hi < c_lo, got c_hi={cost_hi}, c_lo={cost_lo}")
    return min(1.0, max(0.0, (cost_lo - price) / (cost_lo - cost_hi)))


def draw_signal(pi: np.ndarray, state: int, u: float) -> int:
    """σ ~ π(·|τ) by inverse CDF of a uniform ``u`` (§3 step 3).

    Drawing from a pre-drawn uniform gives common random numbers across
    schemes (§7: every scheme sees the same σ sequence).
    """
    cdf = np.cumsum(pi[state])
    return int(min(np.searchsorted(cdf, u, side="right"), pi.shape[1] - 1))


def join_probability(offer: Offer, compute_costs: float | np.ndarray, comm_costs: np.ndarray) -> np.ndarray:
    """P(join | k) = Σ_{τ,σ} μ(τ)π(σ|τ)·1[type k joins at μ_σ] for each computation cost k.

    The server uses it on its type grid (propensities for inverse-propensity
    weighting, §6); tests use it to evaluate a design against a true type.
    """
    k = np.atleast_1d(np.asarray(compute_costs, dtype=float))
    signal_mass = offer.prior @ offer.pi
    prob = np.zeros_like(k)
    for s in np.flatnonzero(signal_mass > 0.0):
        prob += signal_mass[s] * best_response(posterior(offer.prior, offer.pi, s), offer.price, k, comm_costs)
    return prob


def expected_outcome(
    offer: Offer, compute_cost_value: float, comm_costs: np.ndarray, values: np.ndarray
) -> tuple[float, float]:
    """Expected server utility E[a·(V(τ) − γ)] and join probability against one type (§2, §3).

    Returns
    -------
    utility, join_prob
    """
    utility, join_prob = 0.0, 0.0
    for s in range(offer.pi.shape[1]):
        joint = offer.prior * offer.pi[:, s]
        if joint.sum() <= 0.0:
            continue
        if best_response(joint / joint.sum(), offer.price, compute_cost_value, comm_costs):
            utility += float(joint @ (values - offer.price))
            join_prob += float(joint.sum())
    return utility, join_prob


@dataclass(frozen=True)
class StageOutcome:
    """Realized stage game: signal sent, decision, utilities u_s = a(V − γ) and u_c = a(γ − c) (§2)."""

    signal: int
    joined: bool
    server_utility: float
    client_utility: float


def play_stage(
    offer: Offer,
    state: int,
    signal_u: float,
    theta_ghz: float,
    profile: ClientProfile,
    cost_model: CostModel,
    values: np.ndarray,
) -> StageOutcome:
    """Play one arrival of the §3 stage game after the server has committed ``offer``.

    The realized state only draws the signal; the client then decides through
    :func:`join_decision`, the same function the ClientApp runs (§7 oracle).
    """
    signal = draw_signal(offer.pi, state, signal_u)
    joined = join_decision(offer, signal, theta_ghz, profile, cost_model)
    if not joined:
        return StageOutcome(signal, False, 0.0, 0.0)
    k = compute_cost(theta_ghz, profile.workload, cost_model)
    cost = k + communication_cost(TAU_MHZ[state], profile, cost_model)
    return StageOutcome(signal, True, float(values[state] - offer.price), float(offer.price - cost))
