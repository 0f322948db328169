"""Game-only DaringFed simulation: online arrivals, designs and estimators, no FL training (§9).

Reference: Xin et al., *DaringFed*, IJCAI 2025, arXiv 2505.05842; the model is
fedlr's formalization in ``shared/specs/daringfed.md`` (§2 model, §6
estimators, §8 schemes, §9 synthetic study).

Common random numbers (§7): the arriving clients, the Poisson clock, the states
τ_t, the uniforms that draw σ_t and the timing noise come from separate
generators keyed by the seed, and θ paths from per-client generators, so
every scheme faces exactly the same sequences and differs only in its
decisions. The server side of the loop reads only public data, the realized
state it allocated and its :class:`ServerBeliefs`; the client side is
:func:`play_stage`, which decides through :func:`join_decision`. The two
oracle benchmarks (``full-information`` and ``persuasion`` with ``tii=False``)
are the only places that read the true θ, and are marked as such.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedlr.pricing.design import SCHEMES, TII_DESIGNS, full_information_design, oii_design, server_design
from fedlr.pricing.estimators import THETA_EDGES, THETA_GRID, ServerBeliefs, recover_theta
from fedlr.pricing.game import (
    TAU_MHZ,
    ClientProfile,
    CostModel,
    calibrate,
    completion_time,
    compute_cost,
    make_profile,
    per_arrival_cap,
    play_stage,
    server_values,
    state_costs,
    theta_paths,
)

__all__ = [
    "Arrivals",
    "Environment",
    "SimulationConfig",
    "SimulationResult",
    "draw_arrivals",
    "make_environment",
    "simulate_scheme",
]

# Separate generator streams per random sequence (§7).
ARRIVAL_STREAM, STATE_STREAM, SIGNAL_STREAM, TIMING_STREAM, POPULATION_STREAM = 1, 2, 3, 4, 5
# Parameters of the MNIST-1D MLP 40–256–256–10 (§9), which sets S = 32 × #params.
MNIST1D_MLP_PARAMS = 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10


@dataclass(frozen=True)
class SimulationConfig:
    """Synthetic population and horizon of the game-only study (§2 defaults, §9).

    Parameters
    ----------
    num_clients, horizon
        N clients and T arrivals.
    mu
        True P(τ^hi), stationary.
    num_examples
        D_i ~ U{lo, …, hi}. [fedlr] choice: 200–600 examples, so that with the
        MNIST-1D MLP's upload the computation cost k (median ≈ 0.10) is
        comparable to the communication cost h (≈ 0.04–0.14), as §2 requires
        for TII to matter.
    num_params
        Model size for S = 32 × #params (default: the MNIST-1D MLP).
    theta_bar_range
        Range of θ̄_i ~ U, [0.5, 2] GHz in §2.
    scheme parameters
        ``value_factor``, ``psi_share``, ``budget_factor``, ``gamma_cap``,
        ``eps_loc`` as in §2; ``time_noise`` is the relative sd of the
        reported completion time (§6); ``arrival_rate`` λ of the Poisson clock.
    tii
        False turns ``persuasion`` into the OII oracle (true θ, δ = 0).
    tii_design
        ``"ce"`` or ``"distributional"`` (§5).
    """

    num_clients: int = 100
    horizon: int = 2000
    mu: float = 0.5
    num_examples: tuple[int, int] = (200, 600)
    num_params: int = MNIST1D_MLP_PARAMS
    local_epochs: int = 1
    theta_bar_range: tuple[float, float] = (0.5, 2.0)
    value_factor: float = 1.5
    psi_share: float = 0.2
    budget_factor: float = 0.5
    gamma_cap: float = math.inf
    eps_loc: float = 0.1
    arrival_rate: float = 1.0
    time_noise: float = 0.05
    tii: bool = True
    tii_design: str = "ce"

    def __post_init__(self) -> None:
        if self.num_clients < 1 or self.horizon < 1:
            raise ValueError(f"num_clients={self.num_clients} and horizon={self.horizon} must be >= 1")
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu={self.mu} outside [0, 1]")
        if self.tii_design not in TII_DESIGNS:
            raise ValueError(f"tii_design={self.tii_design!r}; allowed: {', '.join(TII_DESIGNS)}")


@dataclass(frozen=True, eq=False)
class Environment:
    """One seeded synthetic world: public profiles, private θ paths, server value and budget."""

    config: SimulationConfig
    cost_model: CostModel
    profiles: tuple[ClientProfile, ...]
    comm_costs: np.ndarray  # (N, 2) public h_i(τ)
    theta_bar: np.ndarray  # (N,) private
    theta: np.ndarray  # (N, T) private, theta[i, t - 1] = θ_{i,t}
    values: np.ndarray  # (2,) V(τ)
    budget: float
    type_distribution: np.ndarray  # (16,) true F of an arriving client's θ on the F̂ cells


@dataclass(frozen=True, eq=False)
class Arrivals:
    """The common random sequences of one seed (§7), indexed by arrival t − 1."""

    clients: np.ndarray
    times: np.ndarray
    states: np.ndarray
    signal_u: np.ndarray
    timing_noise: np.ndarray


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per-arrival records of one scheme (arrays of length T, index t − 1).

    ``utility`` is a_t(V(τ_t) − γ_t); ``cumulative_utility`` its running sum;
    ``participation_rate`` the running join frequency; ``spent`` the running
    payments. Errors are those of the estimates the design used at t:
    ``theta_error`` = |θ̂_i − θ_{i,t}|, ``mu_error`` = |μ̂_t − μ|,
    ``type_error`` = ‖F̂_t − F‖₁. ``mu``, ``x``, ``price`` and ``signal`` are
    the public offer of every arrival (the §7 ConfigRecord), enough to replay
    each client's decision.
    """

    scheme: str
    budget: float
    client: np.ndarray
    time: np.ndarray
    state: np.ndarray
    mu: np.ndarray
    x: np.ndarray  # (T, 2) π(join|τ) per state
    signal: np.ndarray
    price: np.ndarray
    gamma_max: np.ndarray
    joined: np.ndarray
    utility: np.ndarray
    cumulative_utility: np.ndarray
    participation_rate: np.ndarray
    spent: np.ndarray
    theta_error: np.ndarray
    mu_error: np.ndarray
    type_error: np.ndarray
    regime: np.ndarray

    def regime_counts(self) -> dict[str, int]:
        """How often each design regime was committed (§9 asks for the §4 regime mix)."""
        return dict(Counter(self.regime.tolist()))


def make_environment(config: SimulationConfig, seed: int) -> Environment:
    """Draw the population of ``config`` for ``seed`` and calibrate value and budget (§2 defaults)."""
    rng = np.random.default_rng([seed, POPULATION_STREAM])
    num_examples = rng.integers(config.num_examples[0], config.num_examples[1] + 1, size=config.num_clients)
    cost_model = CostModel.for_model(config.num_params)
    profiles = tuple(make_profile(seed, i, int(d), config.local_epochs) for i, d in enumerate(num_examples))
    theta_bar, theta = theta_paths(seed, np.arange(config.num_clients), config.horizon, config.theta_bar_range)
    vartheta, psi, budget = calibrate(
        profiles, cost_model, config.mu, config.horizon, THETA_GRID,
        config.value_factor, config.psi_share, config.budget_factor, config.eps_loc,
    )
    # Arrivals are uniform over clients, so F is the pooled law of all θ_{i,t}.
    counts = np.histogram(np.clip(theta, THETA_EDGES[0], THETA_EDGES[-1]), bins=THETA_EDGES)[0]
    return Environment(
        config, cost_model, profiles, np.array([state_costs(p, cost_model) for p in profiles]), theta_bar, theta,
        server_values(vartheta, psi, config.eps_loc), budget, counts / counts.sum(),
    )


def draw_arrivals(config: SimulationConfig, seed: int) -> Arrivals:
    """Arriving clients (uniform), Poisson clock, states with P(τ^hi) = μ, signal uniforms, timing noise (§2, §7)."""
    arrival = np.random.default_rng([seed, ARRIVAL_STREAM])
    clients = arrival.integers(0, config.num_clients, size=config.horizon)
    times = np.cumsum(arrival.exponential(1.0 / config.arrival_rate, size=config.horizon))
    states = (np.random.default_rng([seed, STATE_STREAM]).random(config.horizon) < config.mu).astype(int)
    signal_u = np.random.default_rng([seed, SIGNAL_STREAM]).random(config.horizon)
    timing_noise = np.random.default_rng([seed, TIMING_STREAM]).standard_normal(config.horizon)
    return Arrivals(clients, times, states, signal_u, timing_noise)


def simulate_scheme(scheme: str, config: SimulationConfig, seed: int) -> SimulationResult:
    """Run ``scheme`` over the T arrivals of ``seed`` and record every stage (§9 synthetic study).

    At arrival t the server caps the price at γ_max,t, commits a design for
    the arriving client from its beliefs, the state and signal are drawn, the
    client decides, a participant is paid and reports its completion time
    T_obs = (T_cmp + T_com)(1 + N(0, 0.05²)), and the server updates θ̂, σ̂_k,
    F̂ (from T_obs) and μ̂ (from τ_t). Fully determined by ``seed``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"pricing.scheme={scheme!r}; allowed: {', '.join(SCHEMES)}")
    env, arrivals = make_environment(config, seed), draw_arrivals(config, seed)
    cost_model, values, horizon = env.cost_model, env.values, config.horizon
    beliefs = ServerBeliefs(config.num_clients)
    budget_left, fixed_price = env.budget, env.budget / horizon
    names = ("mu", "price", "gamma_max", "utility", "spent", "theta_error", "mu_error", "type_error")
    columns = {name: np.zeros(horizon) for name in names}
    x, signal = np.zeros((horizon, 2)), np.zeros(horizon, dtype=int)
    joined, regime = np.zeros(horizon, dtype=bool), np.empty(horizon, dtype=object)
    for t in range(horizon):
        client, state = int(arrivals.clients[t]), int(arrivals.states[t])
        profile, comm_costs, theta = env.profiles[client], env.comm_costs[client], float(env.theta[client, t])
        gamma_max = per_arrival_cap(budget_left, t + 1, horizon, config.gamma_cap)
        mu = beliefs.mu
        estimate = beliefs.client_estimate(client, profile, cost_model)
        if scheme == "full-information":  # oracle: true θ and the realized state
            true_costs = compute_cost(theta, profile.workload, cost_model) + comm_costs
            design = full_information_design(state, true_costs, values, gamma_max)
        elif scheme == "persuasion" and not config.tii:  # OII oracle: true θ, no margin
            true_costs = compute_cost(theta, profile.workload, cost_model) + comm_costs
            design = oii_design(mu, true_costs, values, gamma_max)
        else:
            design = server_design(scheme, mu, estimate, comm_costs, values, gamma_max, fixed_price, config.tii_design)
        offer = design.offer(mu)
        outcome = play_stage(offer, state, float(arrivals.signal_u[t]), theta, profile, cost_model, values)
        columns["theta_error"][t] = abs(estimate.theta_hat - theta)
        columns["mu_error"][t] = abs(mu - config.mu)
        columns["type_error"][t] = np.abs(beliefs.types.probs - env.type_distribution).sum()
        if outcome.joined:
            budget_left -= offer.price
            # The participant reports a noisy completion time; the server sees nothing else of θ.
            t_obs = completion_time(theta, TAU_MHZ[state], profile, cost_model)
            t_obs *= 1.0 + config.time_noise * arrivals.timing_noise[t]
            theta_obs = recover_theta(t_obs, TAU_MHZ[state], profile, cost_model)
            beliefs.observe_participant(client, theta_obs, offer, profile, cost_model)
        beliefs.observe_state(state)
        columns["mu"][t], x[t] = mu, design.x
        columns["price"][t], columns["gamma_max"][t] = offer.price, gamma_max
        columns["utility"][t], columns["spent"][t] = outcome.server_utility, env.budget - budget_left
        signal[t], joined[t], regime[t] = outcome.signal, outcome.joined, design.regime
    return SimulationResult(
        scheme=scheme,
        budget=env.budget,
        client=arrivals.clients.copy(),
        time=arrivals.times.copy(),
        state=arrivals.states.copy(),
        mu=columns["mu"],
        x=x,
        signal=signal,
        price=columns["price"],
        gamma_max=columns["gamma_max"],
        joined=joined,
        utility=columns["utility"],
        cumulative_utility=np.cumsum(columns["utility"]),
        participation_rate=np.cumsum(joined) / np.arange(1, horizon + 1),
        spent=columns["spent"],
        theta_error=columns["theta_error"],
        mu_error=columns["mu_error"],
        type_error=columns["type_error"],
        regime=regime,
    )
