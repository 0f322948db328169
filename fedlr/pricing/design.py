"""DaringFed designs: signaling scheme π and price γ the server commits to.

Reference: Xin et al., *DaringFed*, IJCAI 2025, arXiv 2505.05842. The paper's
theorems were not available; the designs below are fedlr's formalization in
``shared/specs/daringfed.md`` (§4 OII optimum, §5 TII designs, §8 baselines).

Every design is a :class:`Design` with two signals: σ = 1 is the "join"
recommendation (for the §5 distributional design: the posterior with more mass
on τ^hi) and σ = 0 its complement. Costs and values are arrays over the states
``(τ^lo, τ^hi)``, and a binary prior is μ = P(τ^hi).

All functions here are server-side: they take public quantities (μ, the
client's communication costs h(τ), the server's values V(τ), the cap) and the
server's *estimates* of the client's computation cost, never the client's θ.
The oracle benchmarks (OII with the true θ, full information) are these
functions fed with ground truth by the game-only simulation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from fedlr.pricing.estimators import ClientEstimate
from fedlr.pricing.game import HI, LO, TIE_SLACK, Offer

__all__ = [
    "SCHEMES",
    "TII_DESIGNS",
    "Design",
    "ce_design",
    "concave_envelope",
    "distributional_design",
    "distributional_value",
    "fixed_price_design",
    "full_disclosure_design",
    "full_information_design",
    "lp_design",
    "no_signal_design",
    "obedience_lp",
    "oii_design",
    "server_design",
    "split_scheme",
]

SCHEMES = ("persuasion", "full-information", "no-signal", "full-disclosure", "fixed-price")
TII_DESIGNS = ("ce", "distributional")
# Values closer than this are ties, broken by lowest price, then least information (§3).
VALUE_TOL = 1e-12
# Informativeness rank for the tie-break: pooling/no offer reveal nothing.
_INFO_RANK = {"N": 0, "P": 0, "KG": 1, "F": 2}


@dataclass(frozen=True, eq=False)
class Design:
    """A committed scheme and price with its expected server utility (§3).

    Parameters
    ----------
    pi
        (K, 2) signaling scheme π(σ|τ).
    price
        γ, at most the cap γ_max,t.
    value
        Expected server utility under the costs the design *assumes* (for TII
        designs: the server's inflated estimate ĉ, not the truth).
    regime
        Which design won: §4 rows "N", "F", "P", "KG"; §5 distributional
        "N", "P", "split"; §8 baselines "FD" (full disclosure at c_lo),
        "fixed"; the benchmark "FI".
    """

    pi: np.ndarray
    price: float
    value: float
    regime: str

    @property
    def x(self) -> np.ndarray:
        """π(join|τ) per state, the §7 ConfigRecord's "x per state"."""
        return self.pi[:, 1]

    def offer(self, mu: float) -> Offer:
        """The public announcement (μ_t, π_t, γ_t) for a binary prior μ = P(τ^hi)."""
        return Offer(prior=np.array([1.0 - mu, mu]), pi=self.pi, price=self.price)


def _recommendation(x_lo: float, x_hi: float) -> np.ndarray:
    return np.array([[1.0 - x_lo, x_lo], [1.0 - x_hi, x_hi]])


def _check_binary(mu: float, costs: np.ndarray) -> None:
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"prior μ={mu} outside [0, 1]")
    if not costs[HI] < costs[LO]:
        raise ValueError(f"designs need c_hi < c_lo, got c_lo={costs[LO]}, c_hi={costs[HI]}")


def _best(rows: list[tuple[str, float, float, float, float]]) -> Design:
    """Best (regime, price, x_lo, x_hi, value) row: highest value, then lowest price, then least informative (§3)."""
    top = max(r[4] for r in rows)
    regime, price, x_lo, x_hi, value = min(
        (r for r in rows if r[4] >= top - VALUE_TOL), key=lambda r: (r[1], _INFO_RANK.get(r[0], 0))
    )
    return Design(_recommendation(x_lo, x_hi), price, value, regime)


# --------------------------------------------------------------------------- OII optimum (§4)


def oii_design(mu: float, costs: np.ndarray, values: np.ndarray, gamma_max: float) -> Design:
    """Optimal signaling scheme and price when the server knows the client's cost (§4 table).

    Rows, with γ̄ = μc_hi + (1 − μ)c_lo and q = q(γ_max) = (c_lo − γ_max)/(c_lo − c_hi):

    - N (no offer): γ = 0, x = (0, 0), U = 0;
    - F (full revelation): γ = c_hi, x_hi = 1, x_lo = 0, U = μ(V^hi − c_hi), if γ_max ≥ c_hi;
    - P (pooling): γ = γ̄, x = (1, 1), U = μV^hi + (1 − μ)V^lo − γ̄, if γ_max ≥ γ̄;
    - KG (partial): γ = γ_max, x_hi = 1, x_lo = μ(1 − q)/((1 − μ)q),
      U = μ(V^hi − γ_max) + (1 − μ)x_lo(V^lo − γ_max), if c_hi ≤ γ_max < γ̄.

    The optimum is the best feasible row: on the KG branch U(γ) = const +
    μΔc(V^lo − c_lo)/(c_lo − γ) is monotone, so only its end points (F, KG at
    γ_max, or P at γ̄) can win. Ties go to the lowest price, then the least
    informative design (N, P before KG before F).

    Parameters
    ----------
    mu
        Prior μ = P(τ^hi).
    costs
        (c_lo, c_hi), the costs the design assumes, c_hi < c_lo.
    values
        (V^lo, V^hi), the server's values.
    gamma_max
        Price cap γ_max,t (``math.inf`` for none).
    """
    costs = np.asarray(costs, dtype=float)
    _check_binary(mu, costs)
    c_lo, c_hi = float(costs[LO]), float(costs[HI])
    v_lo, v_hi = float(values[LO]), float(values[HI])
    pooled = mu * c_hi + (1.0 - mu) * c_lo
    rows = [("N", 0.0, 0.0, 0.0, 0.0)]
    if gamma_max >= pooled:
        rows.append(("P", pooled, 1.0, 1.0, mu * v_hi + (1.0 - mu) * v_lo - pooled))
    if gamma_max >= c_hi:
        rows.append(("F", c_hi, 0.0, 1.0, mu * (v_hi - c_hi)))
    if c_hi <= gamma_max < pooled:
        q = (c_lo - gamma_max) / (c_lo - c_hi)
        x_lo = mu * (1.0 - q) / ((1.0 - mu) * q)
        rows.append(("KG", gamma_max, x_lo, 1.0, mu * (v_hi - gamma_max) + (1.0 - mu) * x_lo * (v_lo - gamma_max)))
    return _best(rows)


def ce_design(
    mu: float, compute_cost_hat: float, delta: float, comm_costs: np.ndarray, values: np.ndarray, gamma_max: float
) -> Design:
    """TII design ``"ce"``: the §4 optimum for the inflated cost ĉ(τ) = k_i(θ̂_i) + δ + h_i(τ) (§5).

    If costs are separable, V does not depend on θ, the cap is slack,
    δ < (c_lo − c_hi)/2 and |k(θ) − k(θ̂)| ≤ δ, the true client obeys every
    recommendation and the realized utility is ≥ U*_OII(θ) − 2δ (§5 bound).
    """
    return oii_design(mu, compute_cost_hat + delta + np.asarray(comm_costs, dtype=float), values, gamma_max)


def _obedience_lp_batch(
    prior: np.ndarray, costs: np.ndarray, values: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The §4 LP at every price in one HiGHS call.

    The LPs at different prices share no variable, so their block-diagonal sum
    is maximized exactly when every block is; one solve replaces len(prices).
    The two obedience constraints with a_k = μ_k(γ − c_k) read a·x ≥ 0 (obey
    "join") and a·x ≥ Σ_k a_k (obey "skip"), i.e. one row a·x ≥ max(0, Σa).
    """
    n, k = prices.size, prior.size
    a = prior[None, :] * (prices[:, None] - costs[None, :])
    objective = -(prior[None, :] * (values[None, :] - prices[:, None]))
    rows = sparse.block_diag([-a[g][None, :] for g in range(n)], format="csr")
    res = linprog(
        objective.ravel(), A_ub=rows, b_ub=-np.maximum(0.0, a.sum(axis=1)), bounds=(0.0, 1.0), method="highs"
    )
    if res.status != 0:
        raise RuntimeError(f"obedience LP failed: {res.message}")
    x = np.clip(res.x.reshape(n, k), 0.0, 1.0)
    return (prior[None, :] * x * (values[None, :] - prices[:, None])).sum(axis=1), x


def obedience_lp(prior: np.ndarray, costs: np.ndarray, values: np.ndarray, price: float) -> tuple[float, np.ndarray]:
    """Best obedient recommendation scheme for a fixed price, K states (§4 LP).

    maximize Σ_k μ_k x_k (V_k − γ) subject to Σ_k μ_k x_k (γ − c_k) ≥ 0 (obey
    "join"), Σ_k μ_k (1 − x_k)(γ − c_k) ≤ 0 (obey "skip"), x ∈ [0, 1]^K, with
    x_k = π(join|τ^k); solved with HiGHS.

    Returns
    -------
    value, x
    """
    prior, costs, values = (np.asarray(v, dtype=float) for v in (prior, costs, values))
    value, x = _obedience_lp_batch(prior, costs, values, np.array([float(price)]))
    return float(value[0]), x[0]


def lp_design(
    prior: np.ndarray, costs: np.ndarray, values: np.ndarray, gamma_max: float, grid_size: int = 257
) -> Design:
    """Optimal design for K states by the §4 LP over a price grid.

    The grid on [0, min(γ_max, max_k c_k)] contains every c_k, γ_max, and
    [fedlr] choice: the prior-weighted mean cost of every non-empty subset of
    states (γ̄ is the full set). Prices above max_k c_k never help (every
    state joins anyway). For K = 2 these candidates contain the optimum, so
    the result is exact (it equals :func:`oii_design`); for K > 2 the LP value
    can peak between candidates and the error shrinks with ``grid_size``.
    The "skip" constraint lets an indifferent client follow a "skip"
    recommendation (sender-preferred ties, §3); the §3 client rule joins on
    ties, so a K > 2 optimum whose "skip" constraint binds is realized only up
    to that tie. It never binds in the binary optimum (its "skip" posterior
    is τ^lo for sure, where c_lo > γ).
    """
    prior, costs, values = (np.asarray(v, dtype=float) for v in (prior, costs, values))
    upper = min(gamma_max, float(costs.max()))
    subsets = [list(s) for r in range(1, costs.size + 1) for s in itertools.combinations(range(costs.size), r)]
    candidates = [float(prior[s] @ costs[s] / prior[s].sum()) for s in subsets if prior[s].sum() > 0.0]
    cap = [gamma_max] if math.isfinite(gamma_max) else []
    prices = np.concatenate([np.linspace(0.0, upper, grid_size), costs, candidates, cap])
    prices = np.unique(prices[(prices >= 0.0) & (prices <= gamma_max)])
    lp_values, xs = _obedience_lp_batch(prior, costs, values, prices)
    best = int(np.flatnonzero(lp_values >= lp_values.max() - VALUE_TOL)[0])  # prices sorted: lowest price wins ties
    x = xs[best]
    if np.all(x <= 0.0):
        return Design(np.column_stack([np.ones_like(x), np.zeros_like(x)]), 0.0, 0.0, "N")
    regime = "P" if np.all(x >= 1.0) else "F" if np.all((x <= 0.0) | (x >= 1.0)) else "KG"
    return Design(np.column_stack([1.0 - x, x]), float(prices[best]), float(lp_values[best]), regime)


# --------------------------------------------------------------------------- distributional TII design (§5)


def _join_matrix(
    beliefs: np.ndarray, prices: np.ndarray, compute_costs: np.ndarray, comm_costs: np.ndarray
) -> np.ndarray:
    """1[type m joins at posterior μ′ and price γ], shape (G, P, M), the client's §3 rule with its tie slack."""
    expected = compute_costs[None, None, :] + comm_costs[LO] + beliefs[:, :, None] * (comm_costs[HI] - comm_costs[LO])
    return prices[:, None, None] >= expected - TIE_SLACK


def distributional_value(
    beliefs: np.ndarray,
    price: float,
    compute_costs: np.ndarray,
    weights: np.ndarray,
    comm_costs: np.ndarray,
    values: np.ndarray,
) -> np.ndarray:
    """v_γ(μ′) = Σ_m F̂_m·1[type m joins at μ′]·(μ′V^hi + (1 − μ′)V^lo − γ) (§5).

    Parameters
    ----------
    beliefs
        Posteriors μ′ = P(τ^hi | σ) at which to evaluate.
    compute_costs, weights
        The server's type belief: computation costs k_m and their weights F̂_m.
    """
    beliefs = np.atleast_1d(np.asarray(beliefs, dtype=float))
    compute_costs, comm_costs = np.asarray(compute_costs, float), np.asarray(comm_costs, float)
    joins = _join_matrix(beliefs[None, :], np.array([price]), compute_costs, comm_costs)[0]
    return (joins @ np.asarray(weights, float)) * (values[LO] + beliefs * (values[HI] - values[LO]) - price)


def _envelopes(
    mu: float,
    prices: np.ndarray,
    compute_costs: np.ndarray,
    weights: np.ndarray,
    comm_costs: np.ndarray,
    values: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cav v_γ(μ) for every γ in ``prices``, with the two posteriors that attain it (§5).

    v_γ is linear in μ′ between the thresholds q_m(γ) = (k_m + h_lo − γ)/(h_lo − h_hi)
    at which type m starts to join (ties join, §3), so the envelope is
    attained by a pair μ_a ≤ μ ≤ μ_b of breakpoints, O(M²) pairs per price.

    [fedlr] deviation from §5's breakpoint set {0, 1, μ, q_m}: v_γ jumps by
    F̂_m·(μ′V^hi + (1 − μ′)V^lo − γ) at q_m, which is *downward* when the
    joining type costs the server money; there the supremum is the left limit
    at q_m, which no posterior attains under the join-on-ties rule. Each
    threshold therefore also contributes q_m − ε, with ε = 10·TIE_SLACK/Δh
    so that type m strictly prefers to skip, at a value loss of O(ε).
    """
    gap = comm_costs[LO] - comm_costs[HI]
    thresholds = (compute_costs[None, :] + comm_costs[LO] - prices[:, None]) / gap
    candidates = np.concatenate([thresholds, thresholds - 10.0 * TIE_SLACK / gap], axis=1)
    # out-of-range points collapse onto μ, which is a breakpoint anyway
    candidates = np.where((candidates >= 0.0) & (candidates <= 1.0), candidates, mu)
    points = np.concatenate([np.tile([0.0, 1.0, mu], (prices.size, 1)), candidates], axis=1)  # (G, P)
    gain = values[LO] + points * (values[HI] - values[LO]) - prices[:, None]
    v = (_join_matrix(points, prices, compute_costs, comm_costs) @ weights) * gain  # (G, P)
    lower, upper = points[:, :, None], points[:, None, :]  # μ_a on axis 1, μ_b on axis 2
    width = upper - lower
    with np.errstate(invalid="ignore", divide="ignore"):
        split = (v[:, :, None] * (upper - mu) + v[:, None, :] * (mu - lower)) / width
    split = np.where((lower <= mu) & (upper >= mu) & (width > 0.0), split, -np.inf)
    no_split = v[:, 2]  # value at μ itself: reveal nothing
    flat = split.reshape(prices.size, -1)
    best = flat.argmax(axis=1)
    gain_split = flat[np.arange(prices.size), best] > no_split + VALUE_TOL  # least informative on ties
    n = points.shape[1]
    mu_a = np.where(gain_split, points[np.arange(prices.size), best // n], mu)
    mu_b = np.where(gain_split, points[np.arange(prices.size), best % n], mu)
    return np.where(gain_split, flat[np.arange(prices.size), best], no_split), mu_a, mu_b


def concave_envelope(
    mu: float, price: float, compute_costs: np.ndarray, weights: np.ndarray, comm_costs: np.ndarray, values: np.ndarray
) -> tuple[float, float, float]:
    """cav v_γ(μ) and the posteriors μ_a ≤ μ ≤ μ_b that attain it, for one price (§5).

    Returns
    -------
    value, mu_a, mu_b
        ``mu_a == mu_b == mu`` when revealing nothing is optimal.
    """
    value, mu_a, mu_b = _envelopes(
        float(mu), np.array([float(price)]), np.asarray(compute_costs, float), np.asarray(weights, float),
        np.asarray(comm_costs, float), np.asarray(values, float),
    )
    return float(value[0]), float(mu_a[0]), float(mu_b[0])


def split_scheme(mu: float, mu_a: float, mu_b: float) -> np.ndarray:
    """Scheme π realizing the posteriors μ_a ≤ μ ≤ μ_b (§5), signals (σ_a, σ_b) = (0, 1).

    P(σ_b) = (μ − μ_a)/(μ_b − μ_a), π(σ_b|τ^hi) = P(σ_b)μ_b/μ,
    π(σ_b|τ^lo) = P(σ_b)(1 − μ_b)/(1 − μ); plausibility Σ_σ P(σ)μ_σ = μ holds
    by construction.
    """
    if not (0.0 < mu < 1.0 and mu_a <= mu <= mu_b and mu_a < mu_b):
        raise ValueError(f"no split of μ={mu} into μ_a={mu_a}, μ_b={mu_b}")
    p_b = (mu - mu_a) / (mu_b - mu_a)
    x_hi = min(1.0, p_b * mu_b / mu)
    x_lo = min(1.0, p_b * (1.0 - mu_b) / (1.0 - mu))
    return _recommendation(x_lo, x_hi)


def distributional_design(
    mu: float,
    compute_costs: np.ndarray,
    weights: np.ndarray,
    comm_costs: np.ndarray,
    values: np.ndarray,
    gamma_max: float,
    grid_size: int = 129,
) -> Design:
    """TII design ``"distributional"``: concave envelope of v_γ under a type belief, best γ (§5).

    [fedlr] choice for the price search: a grid of ``grid_size`` points on
    [0, min(γ_max, max_m c_lo,m)] plus, for every type, its full-revelation,
    pooling and no-information prices (k_m + h_hi, k_m + γ̄_h, k_m + h_lo) and
    γ_max itself, so a point-mass belief reproduces :func:`oii_design` exactly.
    Ties go to the lowest price, then to revealing nothing. The plug-in loss
    against the true type distribution F is ≤ 2V̄·‖F − F̂‖₁ (§5). Posteriors
    are searched on {0, 1, μ, q_m, q_m − ε}, see :func:`_envelopes`; the
    reported ``value`` is exactly what the committed scheme earns against
    the belief when every type applies the §3 rule.
    """
    compute_costs, weights = np.asarray(compute_costs, float), np.asarray(weights, float)
    comm_costs, values = np.asarray(comm_costs, float), np.asarray(values, float)
    _check_binary(mu, compute_costs.min() + comm_costs)
    pooled_h = mu * comm_costs[HI] + (1.0 - mu) * comm_costs[LO]
    upper = min(gamma_max, float(compute_costs.max() + comm_costs[LO]))
    prices = np.concatenate([
        np.linspace(0.0, upper, grid_size),
        compute_costs + comm_costs[HI], compute_costs + pooled_h, compute_costs + comm_costs[LO],
        [gamma_max] if math.isfinite(gamma_max) else [],
    ])
    prices = np.unique(prices[(prices >= 0.0) & (prices <= upper)])
    env, mu_a, mu_b = _envelopes(float(mu), prices, compute_costs, weights, comm_costs, values)
    best = int(np.flatnonzero(env >= env.max() - VALUE_TOL)[0])  # prices sorted: lowest price wins ties
    price, value = float(prices[best]), float(env[best])
    if value <= VALUE_TOL:  # then the lowest price, 0, won: nobody joins at γ = 0
        return Design(_recommendation(0.0, 0.0), 0.0, 0.0, "N")
    if mu_a[best] == mu_b[best]:
        return Design(_recommendation(1.0, 1.0), price, value, "P")
    return Design(split_scheme(float(mu), float(mu_a[best]), float(mu_b[best])), price, value, "split")


# --------------------------------------------------------------------------- baselines (§8)


def no_signal_design(mu: float, costs: np.ndarray, values: np.ndarray, gamma_max: float) -> Design:
    """``no-signal``: best of pooling P and no offer N under the prior (§8)."""
    costs = np.asarray(costs, dtype=float)
    _check_binary(mu, costs)
    pooled = mu * costs[HI] + (1.0 - mu) * costs[LO]
    rows = [("N", 0.0, 0.0, 0.0, 0.0)]
    if gamma_max >= pooled:
        rows.append(("P", float(pooled), 1.0, 1.0, float(mu * values[HI] + (1.0 - mu) * values[LO] - pooled)))
    return _best(rows)


def full_disclosure_design(mu: float, costs: np.ndarray, values: np.ndarray, gamma_max: float) -> Design:
    """``full-disclosure``: σ = τ with the best single price, c_hi or c_lo, or no offer (§8).

    At γ = c_hi only the τ^hi client joins ("F"); at γ = c_lo both do ("FD").
    """
    costs = np.asarray(costs, dtype=float)
    _check_binary(mu, costs)
    c_lo, c_hi = float(costs[LO]), float(costs[HI])
    rows = [("N", 0.0, 0.0, 0.0, 0.0)]
    if gamma_max >= c_hi:
        rows.append(("F", c_hi, 0.0, 1.0, float(mu * (values[HI] - c_hi))))
    if gamma_max >= c_lo:
        rows.append(("FD", c_lo, 0.0, 1.0, float(mu * values[HI] + (1.0 - mu) * values[LO] - c_lo)))
    best = _best(rows)
    return Design(_recommendation(0.0, 1.0), best.price, best.value, best.regime)


def fixed_price_design(mu: float, costs: np.ndarray, values: np.ndarray, price: float) -> Design:
    """``fixed-price``: γ = B/T and no information (§8); ``value`` is under the assumed ``costs``."""
    pooled = mu * costs[HI] + (1.0 - mu) * costs[LO]
    value = float(mu * values[HI] + (1.0 - mu) * values[LO] - price) if price >= pooled - TIE_SLACK else 0.0
    return Design(_recommendation(1.0, 1.0), float(price), value, "fixed")


def full_information_design(state: int, costs: np.ndarray, values: np.ndarray, gamma_max: float) -> Design:
    """``full-information`` benchmark: σ = τ and γ = c(θ, τ) when V(τ) ≥ c and c ≤ γ_max (§8).

    The only design that depends on the realized state and on the true cost:
    it is an oracle for the game-only simulation, not something a server can run.
    """
    cost, value = float(costs[state]), float(values[state])
    identity = _recommendation(0.0, 1.0)
    if value >= cost and cost <= gamma_max:
        return Design(identity, cost, value - cost, "FI")
    return Design(identity, 0.0, 0.0, "N")


def server_design(
    scheme: str,
    mu: float,
    estimate: ClientEstimate,
    comm_costs: np.ndarray,
    values: np.ndarray,
    gamma_max: float,
    fixed_price: float,
    tii_design: str = "ce",
) -> Design:
    """The design a server commits to for scheme ``pricing.scheme`` from public data and its estimates (§8).

    Every input is server-side: the published prior μ_t, the server's estimate
    of the arriving client (θ̂, δ, type belief), the client's public
    communication costs, the server's values and cap. Baselines are priced
    with the same inflated cost ĉ = k(θ̂) + δ + h as ``persuasion`` (§8).
    ``full-information`` needs the realized state and the true θ and is
    served by :func:`full_information_design` in the oracle path.
    """
    comm_costs = np.asarray(comm_costs, dtype=float)
    assumed = estimate.compute_cost_hat + estimate.delta + comm_costs
    if scheme == "persuasion":
        if tii_design == "ce":
            return ce_design(mu, estimate.compute_cost_hat, estimate.delta, comm_costs, values, gamma_max)
        if tii_design == "distributional":
            return distributional_design(mu, estimate.type_costs, estimate.type_weights, comm_costs, values, gamma_max)
        raise ValueError(f"pricing.tii_design={tii_design!r}; allowed: {', '.join(TII_DESIGNS)}")
    if scheme == "no-signal":
        return no_signal_design(mu, assumed, values, gamma_max)
    if scheme == "full-disclosure":
        return full_disclosure_design(mu, assumed, values, gamma_max)
    if scheme == "fixed-price":
        return fixed_price_design(mu, assumed, values, min(fixed_price, gamma_max))
    if scheme == "full-information":
        raise ValueError(
            "scheme 'full-information' is an oracle benchmark: use full_information_design with the true cost"
        )
    raise ValueError(f"pricing.scheme={scheme!r}; allowed: {', '.join(SCHEMES)}")
