"""DaringFed game math (Xin et al., IJCAI 2025, arXiv 2505.05842): invariants of spec §10.

The model is fedlr's formalization in ``shared/specs/daringfed.md``; brute
forces below are independent transcriptions of its §4 LP and §5 envelope LP.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace

import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linprog

from fedlr.pricing import (
    HI,
    LO,
    TAU_MHZ,
    THETA_GRID,
    CostModel,
    Offer,
    ServerBeliefs,
    SimulationConfig,
    best_response,
    ce_design,
    client_theta,
    completion_time,
    compute_cost,
    concave_envelope,
    distributional_design,
    distributional_value,
    draw_arrivals,
    draw_signal,
    expected_outcome,
    fixed_price_design,
    full_disclosure_design,
    full_information_design,
    join_decision,
    join_probability,
    join_threshold,
    lp_design,
    make_environment,
    make_profile,
    mixing_weight,
    no_signal_design,
    oii_design,
    per_arrival_cap,
    posterior,
    recover_theta,
    simulate_scheme,
    state_costs,
    theta_paths,
)

# Equality of optimal values (spec §10: 1e-9); schemes compared entrywise to 1e-7
# because HiGHS returns vertices up to its feasibility tolerance.
VALUE_TOL = 1e-9
SCHEME_TOL = 1e-7
# Game-only runs for scheme comparisons: N = 30 clients and T = 600 arrivals
# give each client the ~20 visits of the §9 N = 100, T = 2,000 setting.
SMALL = SimulationConfig(num_clients=30, horizon=600)
SEEDS = (0, 1, 2)


def random_binary_instance(rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray, float]:
    """μ, costs (c_lo > c_hi), values in any order and a cap that is slack (inf), binding, or below c_hi."""
    c_hi = rng.uniform(0.05, 1.0)
    costs = np.array([c_hi + rng.uniform(0.05, 1.0), c_hi])
    gamma_max = np.inf if rng.random() < 0.2 else rng.uniform(0.0, 1.2 * costs[LO])
    return float(rng.uniform(0.02, 0.98)), costs, rng.uniform(0.0, 2.0, 2), float(gamma_max)


def brute_force_lp(
    prior: np.ndarray, costs: np.ndarray, values: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The §4 LP for every row (prior, costs, values, price), both obedience constraints written out.

    Rows are (n, K) arrays broadcast against ``prices`` of shape (n,). The LPs share no
    variable, so the sum of their objectives is maximized exactly when each block is:
    a single block-diagonal HiGHS solve returns every per-row optimum.
    """
    prices = np.asarray(prices, dtype=float)
    prior, costs, values = (np.broadcast_to(v, (prices.size, np.shape(v)[-1])) for v in (prior, costs, values))
    n, k = prior.shape
    a = prior * (prices[:, None] - costs)  # a_k = μ_k(γ − c_k)
    # Row 2g: −Σ a_k x_k ≤ 0 (obey "join"); row 2g+1: Σ a_k (1 − x_k) ≤ 0 (obey "skip").
    rows = np.repeat(np.arange(2 * n), k)
    cols = np.tile(np.arange(n * k).reshape(n, k), (1, 2)).ravel()
    a_ub = sparse.csr_matrix((np.repeat(-a, 2, axis=0).ravel(), (rows, cols)), shape=(2 * n, n * k))
    b_ub = np.column_stack([np.zeros(n), -a.sum(axis=1)]).ravel()
    objective = -(prior * (values - prices[:, None])).ravel()
    res = linprog(objective, A_ub=a_ub, b_ub=b_ub, bounds=(0.0, 1.0), method="highs")
    assert res.status == 0, res.message
    x = res.x.reshape(n, k)
    return (prior * x * (values - prices[:, None])).sum(axis=1), x


def assert_valid_scheme(offer: Offer, assumed_costs: np.ndarray, recommendation: bool = True) -> None:
    """§10 scheme validity: rows sum to 1, plausibility, obedience under the assumed costs."""
    np.testing.assert_allclose(offer.pi.sum(axis=1), 1.0, atol=1e-12)
    signal_mass = offer.prior @ offer.pi
    sent = [s for s in range(offer.pi.shape[1]) if signal_mass[s] > 0]
    plausible = sum(signal_mass[s] * posterior(offer.prior, offer.pi, s) for s in sent)
    np.testing.assert_allclose(plausible, offer.prior, atol=1e-12)
    if not recommendation:
        return
    for s in sent:
        cost = posterior(offer.prior, offer.pi, s) @ assumed_costs
        if s == 1:
            assert cost <= offer.price + 1e-9, "after 'join' the expected assumed cost exceeds the price"
        else:
            assert cost >= offer.price - 1e-9 or offer.price == 0.0, "after 'skip' joining would pay"


# --------------------------------------------------------------------------- §4 OII optimum


def test_oii_closed_form_matches_brute_force_lp_over_fine_price_grid() -> None:
    """§10: on 200 random instances the §4 closed form equals the LP over a 201-point price grid
    plus the candidate prices {c_hi, c_lo, γ̄, γ_max}, in value (1e-9, so no grid price beats it),
    price (1e-9, lowest-price tie-break) and scheme (1e-7)."""
    rng = np.random.default_rng(0)
    instances, blocks = [], []
    for _ in range(200):
        mu, costs, values, gamma_max = random_binary_instance(rng)
        candidates = np.array([costs[HI], costs[LO], mu * costs[HI] + (1 - mu) * costs[LO], gamma_max])
        grid = np.linspace(0.0, min(gamma_max, 2 * costs[LO]), 201)
        prices = np.unique(np.concatenate([grid, candidates[np.isfinite(candidates) & (candidates <= gamma_max)]]))
        instances.append((mu, costs, values, gamma_max, prices))
        blocks.append((np.tile([1 - mu, mu], (prices.size, 1)), np.tile(costs, (prices.size, 1)),
                       np.tile(values, (prices.size, 1)), prices))
    lp_values, xs = brute_force_lp(*(np.concatenate(part) for part in zip(*blocks)))
    start, regimes = 0, set()
    for mu, costs, values, gamma_max, prices in instances:
        block = slice(start, start + prices.size)
        start += prices.size
        design = oii_design(mu, costs, values, gamma_max)
        regimes.add(design.regime)
        best = int(np.flatnonzero(lp_values[block] >= lp_values[block].max() - VALUE_TOL)[0])
        assert abs(design.value - lp_values[block].max()) <= VALUE_TOL
        assert abs(design.price - prices[best]) <= VALUE_TOL
        np.testing.assert_allclose(design.x, xs[block][best], atol=SCHEME_TOL)
    assert regimes == {"N", "F", "P", "KG"}, "the instances must exercise every §4 row"


def test_lp_design_reproduces_closed_form_for_two_states() -> None:
    rng = np.random.default_rng(1)
    for _ in range(25):
        mu, costs, values, gamma_max = random_binary_instance(rng)
        exact = oii_design(mu, costs, values, gamma_max)
        by_lp = lp_design(np.array([1 - mu, mu]), costs, values, gamma_max)
        assert abs(exact.value - by_lp.value) <= VALUE_TOL
        assert abs(exact.price - by_lp.price) <= VALUE_TOL
        assert exact.regime == by_lp.regime


def test_lp_design_three_states_is_valid_and_not_beaten_by_a_finer_grid() -> None:
    rng = np.random.default_rng(2)
    for _ in range(10):
        prior, costs, values = rng.dirichlet(np.ones(3)), np.sort(rng.uniform(0.1, 1.0, 3)), rng.uniform(0.0, 1.5, 3)
        gamma_max = float(rng.uniform(0.0, 1.1 * costs.max()))
        design = lp_design(prior, costs, values, gamma_max)
        assert design.price <= gamma_max
        assert_valid_scheme(Offer(prior, design.pi, design.price), costs)
        fine = np.linspace(0.0, min(gamma_max, 2 * costs.max()), 1501)
        assert brute_force_lp(prior, costs, values, fine)[0].max() <= design.value + VALUE_TOL


def test_oii_regimes_follow_cap_and_surplus() -> None:
    """§4 bullets: slack cap pools if V^lo ≥ c_lo, else reveals if V^hi > c_hi; a binding cap with V^lo > c_lo is KG."""
    costs, mu = np.array([1.0, 0.4]), 0.5  # γ̄ = 0.7
    assert oii_design(mu, costs, np.array([1.2, 0.9]), np.inf).regime == "P"
    assert oii_design(mu, costs, np.array([0.9, 0.6]), np.inf).regime == "F"
    kg = oii_design(mu, costs, np.array([1.2, 0.9]), 0.6)
    assert kg.regime == "KG" and kg.price == 0.6
    q = join_threshold(0.6, costs[LO], costs[HI])
    np.testing.assert_allclose(posterior(np.array([1 - mu, mu]), kg.pi, 1)[HI], q, atol=1e-15)
    assert oii_design(mu, costs, np.array([1.2, 0.9]), 0.3).regime == "N"


# --------------------------------------------------------------------------- validity, benefit, baselines


def test_every_design_is_valid_within_the_cap_and_persuasion_dominates_baselines() -> None:
    """§10 scheme validity and budget cap for every design; §3 benefit; §8 baselines are restrictions
    of the persuasion problem, so under the same assumed costs they never do better."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        mu, costs, values, gamma_max = random_binary_instance(rng)
        best = oii_design(mu, costs, values, gamma_max)
        no_signal = no_signal_design(mu, costs, values, gamma_max)
        baselines = [
            no_signal,
            full_disclosure_design(mu, costs, values, gamma_max),
            fixed_price_design(mu, costs, values, min(gamma_max, float(rng.uniform(0, costs[LO])))),
        ]
        # σ recommends an action in the §4 and no-signal designs; under full disclosure σ = τ.
        for design, recommends in zip([best, *baselines], (True, True, False, False)):
            assert design.price <= gamma_max
            offer = design.offer(mu)
            assert_valid_scheme(offer, costs, recommendation=recommends)
            # the stated value is what a client with exactly these costs delivers
            assert abs(expected_outcome(offer, 0.0, costs, values)[0] - design.value) <= 1e-12
        assert all(best.value >= b.value - 1e-12 for b in baselines)
        assert best.value >= no_signal.value  # benefit: no worse than the best design that reveals nothing


def test_full_information_bounds_persuasion_when_the_cap_is_slack_but_not_when_it_binds() -> None:
    """[fedlr] finding: E[FI] = E[(V − c)⁺] bounds any design with a slack cap (the client's
    interim utility is ≥ 0), but a binding cap lets KG recruit τ^lo at γ_max < c_lo, which
    state-wise pricing under the same cap cannot: there the OII oracle beats FI."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        mu, costs, values, _ = random_binary_instance(rng)
        fi = sum(p * full_information_design(s, costs, values, np.inf).value for s, p in ((LO, 1 - mu), (HI, mu)))
        assert oii_design(mu, costs, values, np.inf).value <= fi + 1e-12
    costs, values, mu, cap = np.array([1.0, 0.4]), np.array([1.2, 0.9]), 0.5, 0.6
    fi = sum(p * full_information_design(s, costs, values, cap).value for s, p in ((LO, 1 - mu), (HI, mu)))
    assert oii_design(mu, costs, values, cap).value > fi


def test_ce_design_meets_the_two_delta_bound_and_is_obeyed() -> None:
    """§5 bound on instances meeting its assumptions: separable costs, V independent of θ, slack cap,
    δ < Δc/2 and |k(θ) − k(θ̂)| ≤ δ ⇒ the true client obeys and U ≥ U*_OII(θ) − 2δ."""
    rng = np.random.default_rng(5)
    worst_ratio = 0.0
    for _ in range(300):
        comm = np.sort(rng.uniform(0.05, 1.0, 2))[::-1]  # h_lo > h_hi
        k, mu, values = rng.uniform(0.0, 0.5), rng.uniform(0.02, 0.98), rng.uniform(0.0, 2.0, 2)
        delta = rng.uniform(0.0, 0.5) * (comm[LO] - comm[HI])
        k_hat = k + rng.uniform(-delta, delta)
        optimum = oii_design(mu, k + comm, values, np.inf).value
        design = ce_design(mu, k_hat, delta, comm, values, np.inf)
        realized, join_prob = expected_outcome(design.offer(mu), k, comm, values)
        assert realized >= optimum - 2 * delta - 1e-12
        assert abs(join_prob - np.array([1 - mu, mu]) @ design.x) <= 1e-12  # obedient
        if delta > 0:
            worst_ratio = max(worst_ratio, (optimum - realized) / delta)
    assert worst_ratio > 1.0, "the instances should come near the bound"


# --------------------------------------------------------------------------- §5 distributional design


def envelope_lp(
    mu: float, price: float, costs: np.ndarray, weights: np.ndarray, comm: np.ndarray, values: np.ndarray
) -> float:
    """max Σ_j p_j v_γ(μ_j) s.t. Σ p_j μ_j = μ, Σ p_j = 1, p ≥ 0 on a posterior grid with every breakpoint.

    The breakpoints are the thresholds q_m and the points q_m − 1e-8/Δh just left of them, where
    the type skips (the supremum when its joining would cost the server money).
    """
    thresholds = (costs + comm[LO] - price) / (comm[LO] - comm[HI])
    points = np.concatenate([thresholds, thresholds - 1e-8 / (comm[LO] - comm[HI])])
    grid = np.unique(np.concatenate([np.linspace(0, 1, 201), points[(points >= 0) & (points <= 1)], [mu]]))
    # v_γ written out type by type with the client's rule (join iff γ ≥ E[c] − 1e-9)
    expected_costs = costs[None, :] + (1 - grid[:, None]) * comm[LO] + grid[:, None] * comm[HI]
    v = ((price >= expected_costs - 1e-9) @ weights) * (values[LO] + grid * (values[HI] - values[LO]) - price)
    np.testing.assert_allclose(v, distributional_value(grid, price, costs, weights, comm, values), atol=1e-15)
    res = linprog(-v, A_eq=np.vstack([grid, np.ones_like(grid)]), b_eq=[mu, 1.0], bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(-res.fun)


def random_type_belief(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m = int(rng.integers(1, 8))
    comm = np.sort(rng.uniform(0.05, 1.0, 2))[::-1]
    return rng.uniform(0.0, 0.6, m), rng.dirichlet(np.ones(m)), comm, rng.uniform(0.2, 2.0, 2)


def test_distributional_envelope_matches_posterior_lp_and_its_scheme_delivers_it() -> None:
    rng = np.random.default_rng(6)
    for _ in range(60):
        costs, weights, comm, values = random_type_belief(rng)
        mu = float(rng.uniform(0.05, 0.95))
        price = float(rng.uniform(costs.min() + comm[HI], costs.max() + comm[LO]))
        value, mu_a, mu_b = concave_envelope(mu, price, costs, weights, comm, values)
        assert abs(value - envelope_lp(mu, price, costs, weights, comm, values)) <= VALUE_TOL
        assert mu_a <= mu <= mu_b
    for _ in range(40):  # the committed scheme, answered by every type with its own rule, earns the envelope
        costs, weights, comm, values = random_type_belief(rng)
        mu = float(rng.uniform(0.05, 0.95))
        design = distributional_design(mu, costs, weights, comm, values, float(rng.uniform(0.2, 1.5)))
        offer = design.offer(mu)
        assert_valid_scheme(offer, comm, recommendation=False)
        earned = sum(w * expected_outcome(offer, c, comm, values)[0] for c, w in zip(costs, weights))
        assert abs(earned - design.value) <= VALUE_TOL


def test_distributional_design_with_a_known_type_is_the_oii_optimum() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        mu, costs, values, gamma_max = random_binary_instance(rng)
        k = 0.3 * costs[HI]
        design = distributional_design(mu, np.array([k]), np.array([1.0]), costs - k, values, gamma_max)
        exact = oii_design(mu, costs, values, gamma_max)
        assert abs(design.value - exact.value) <= VALUE_TOL
        assert abs(design.price - exact.price) <= VALUE_TOL


# --------------------------------------------------------------------------- client side


def test_client_decision_takes_only_the_clients_inputs_and_replays_every_simulated_arrival() -> None:
    """§7: the decision is a pure function of (offer, signal, own θ, own costs); the game-only
    oracle and a ClientApp calling it on the public record agree at every arrival."""
    inputs = ["offer", "signal", "theta_ghz", "profile", "cost_model"]
    assert list(inspect.signature(join_decision).parameters) == inputs
    env = make_environment(SMALL, 0)
    result = simulate_scheme("persuasion", SMALL, 0)
    for t in range(SMALL.horizon):
        i = int(result.client[t])
        (x_lo, x_hi), mu = result.x[t], result.mu[t]
        offer = Offer(np.array([1 - mu, mu]), np.array([[1 - x_lo, x_lo], [1 - x_hi, x_hi]]), result.price[t])
        theta = env.theta[i, t]
        if t % 50 == 0:  # the ClientApp regenerates θ_{i,t} from (seed, partition id, t) alone
            assert client_theta(0, i, t + 1, SMALL.theta_bar_range) == theta
        assert join_decision(offer, int(result.signal[t]), theta, env.profiles[i], env.cost_model) == result.joined[t]
    assert 0 < result.joined.sum() < SMALL.horizon


def test_best_response_is_the_binary_threshold_rule() -> None:
    """§3: with c_hi < c_lo the client joins iff μ_σ ≥ q(γ) (ties to join)."""
    rng = np.random.default_rng(8)
    for _ in range(500):
        c_hi = rng.uniform(0.1, 1.0)
        comm, price, belief_hi = np.array([c_hi + rng.uniform(0.05, 1), c_hi]), rng.uniform(0, 2.2), rng.uniform()
        q = join_threshold(price, comm[LO], comm[HI])
        joins = best_response(np.array([1 - belief_hi, belief_hi]), price, 0.0, comm)
        assert joins == (belief_hi >= q or price >= comm[LO])
    comm = np.array([1.0, 0.4])
    q = join_threshold(0.7, comm[LO], comm[HI])
    assert best_response(np.array([1 - q, q]), 0.7, 0.0, comm)  # indifferent: joins


def test_posterior_signal_draws_and_errors() -> None:
    pi = np.array([[0.7, 0.3], [0.0, 1.0]])
    assert [draw_signal(pi, LO, u) for u in (0.0, 0.69, 0.7, 0.99)] == [0, 0, 1, 1]
    assert draw_signal(pi, HI, 0.0) == 1
    np.testing.assert_allclose(posterior(np.array([0.6, 0.4]), pi, 1), [0.18 / 0.58, 0.4 / 0.58])
    with pytest.raises(ValueError, match="signal 0 has probability zero"):
        posterior(np.array([0.0, 1.0]), pi, 0)
    with pytest.raises(ValueError, match="designs need c_hi < c_lo"):
        oii_design(0.5, np.array([0.3, 0.5]), np.array([1.0, 1.0]), np.inf)
    with pytest.raises(ValueError, match="not probability vectors"):
        Offer(np.array([0.5, 0.5]), np.array([[0.5, 0.6], [0.0, 1.0]]), 0.1)


def test_type_process_regenerates_and_time_model_inverts() -> None:
    theta_bar, theta = theta_paths(3, [0, 5, 9], 40)
    assert theta.min() >= 0.5 and theta.max() <= 2.0
    for n, cid in enumerate([0, 5, 9]):
        assert [client_theta(3, cid, t) for t in (1, 17, 40)] == [theta[n, 0], theta[n, 16], theta[n, 39]]
    np.testing.assert_array_equal(theta_paths(3, [5], 17)[1][0], theta[1, :17])  # a path is a prefix of a longer one
    cost_model, profile = CostModel.for_model(10_000), make_profile(3, 5, 300)
    for state in (LO, HI):
        t_obs = completion_time(theta[1, 4], TAU_MHZ[state], profile, cost_model)
        assert abs(recover_theta(t_obs, TAU_MHZ[state], profile, cost_model) - theta[1, 4]) <= 1e-9
    h = state_costs(profile, cost_model)
    assert h[HI] < h[LO]


# --------------------------------------------------------------------------- estimators


def test_estimators_converge_on_a_stationary_population() -> None:
    """§9 D1 / §10: on a stationary population whose θ law is far from the uniform prior
    (θ̄_i ~ U[0.5, 1] GHz, μ = 0.7) the errors of θ̂, μ̂ and F̂ shrink to their forgetting floors.
    Bounds: θ̂ window error < 0.25 GHz (AR(1) floor: E|N(0, 0.23²)| ≈ 0.18), μ̂ < 0.1
    (EMA floor ≈ 0.06), ‖F̂ − F‖₁ < 0.5 (floor ≈ 0.3 for ~100 effective observations)."""
    config = SimulationConfig(num_clients=30, horizon=1500, mu=0.7, theta_bar_range=(0.5, 1.0))
    window = slice(-150, None)
    for seed in (0, 1):
        r = simulate_scheme("persuasion", config, seed)
        assert r.theta_error[window].mean() < 0.6 * r.theta_error[:150].mean()
        assert r.theta_error[window].mean() < 0.25
        assert r.mu_error[0] == pytest.approx(0.2)
        assert r.mu_error[window].mean() < 0.1
        assert r.type_error[-1] < 0.5 * r.type_error[0]
        assert r.type_error[-1] < 0.5


def test_estimator_errors_fall_between_an_early_and_a_late_horizon_on_the_default_population() -> None:
    """§10 estimators invariant, scaled: N = 30 clients at T = 150 and T = 1,500 have the per-client
    visits of N = 100 at T = 500 and T = 5,000. F̂ is left out: on the default population F is nearly
    uniform, so the Dirichlet(1) prior starts at its floor (reported, not asserted)."""
    r = simulate_scheme("persuasion", replace(SMALL, horizon=1500, mu=0.7), 0)
    assert r.theta_error[-150:].mean() < r.theta_error[:150].mean()
    assert r.mu_error[-150:].mean() < r.mu_error[:150].mean()


def event_stream(seed: int, n: int, num_clients: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(n):
        mu, x_lo = rng.uniform(0.2, 0.8), rng.uniform()
        offer = Offer(np.array([1 - mu, mu]), np.array([[1 - x_lo, x_lo], [0.0, 1.0]]), float(rng.uniform(0.1, 0.4)))
        client, state, joined = int(rng.integers(num_clients)), int(rng.random() < 0.6), bool(rng.random() < 0.5)
        events.append((client, state, joined, float(rng.uniform(0.5, 2.0)), offer))
    return events


def replay(beliefs: ServerBeliefs, events: list[tuple], profiles: list, cost_model: CostModel) -> list[tuple]:
    seen = []
    for client, state, joined, theta_obs, offer in events:
        est = beliefs.client_estimate(client, profiles[client], cost_model)
        seen.append((beliefs.mu, est.theta_hat, est.compute_cost_hat, est.delta, est.seen, *est.type_costs))
        seen.append(tuple(est.type_weights))
        if joined:
            beliefs.observe_participant(client, theta_obs, offer, profiles[client], cost_model)
        beliefs.observe_state(state)
    return seen


def test_state_dict_round_trip_reproduces_subsequent_behaviour_exactly() -> None:
    cost_model = CostModel.for_model(78_858)
    profiles = [make_profile(0, i, 400) for i in range(8)]
    before, after = event_stream(1, 80, 8), event_stream(2, 80, 8)
    original = ServerBeliefs(8)
    replay(original, before, profiles, cost_model)
    snapshot = original.state_dict()
    # plain containers: nested dicts of floats and arrays, copies not views
    for part in snapshot.values():
        assert all(isinstance(v, (float, np.ndarray)) for v in part.values())
    frozen = copy.deepcopy(snapshot)
    expected = replay(original, after, profiles, cost_model)
    for name, part in snapshot.items():
        for key, value in part.items():
            np.testing.assert_array_equal(value, frozen[name][key])
    # through lists and floats, as a JSON checkpoint would carry it
    plain = {
        name: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in part.items()}
        for name, part in snapshot.items()
    }
    restored = ServerBeliefs(8)
    restored.load_state_dict(plain)
    assert replay(restored, after, profiles, cost_model) == expected
    with pytest.raises(ValueError, match=r"state_dict\['theta_hat'\] has shape \(8,\), expected \(9,\)"):
        ServerBeliefs(9).load_state_dict(snapshot)


def test_inverse_propensity_weights_follow_the_committed_design() -> None:
    """§6: P(join | θ_m) under the committed offer sets the weight 1/max(P, 0.25) of a participant."""
    cost_model, profile = CostModel.for_model(78_858), make_profile(0, 1, 400)
    comm = state_costs(profile, cost_model)
    k = compute_cost(THETA_GRID, profile.workload, cost_model)
    k_design = float(np.median(k))
    design = full_disclosure_design(0.5, k_design + comm, np.array([0.0, 1.0]), np.inf)
    assert design.regime == "F"  # σ = τ at price c_hi: types with k ≤ k_design join in τ^hi
    propensity = join_probability(design.offer(0.5), k, comm)
    expected = 0.5 * (k <= k_design + 1e-9) + 0.5 * (k + comm[LO] <= k_design + comm[HI] + 1e-9)
    np.testing.assert_allclose(propensity, expected)
    never, half = int(np.argmax(k)), int(np.flatnonzero(expected == 0.5)[0])
    beliefs = ServerBeliefs(3)
    beliefs.observe_participant(0, float(THETA_GRID[never]), design.offer(0.5), profile, cost_model)
    beliefs.observe_participant(1, float(THETA_GRID[half]), design.offer(0.5), profile, cost_model)
    alpha = beliefs.types.state_dict()["alpha"]
    assert alpha[never] == pytest.approx(1.0 + 0.99 / 0.25)  # floored propensity, then forgotten once
    assert alpha[half] == pytest.approx(1.0 + 1.0 / 0.5)
    assert np.delete(alpha, [never, half]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- game-only simulation


@pytest.fixture(scope="module")
def scheme_runs() -> dict[str, list]:
    schemes = ("persuasion", "full-information", "no-signal", "full-disclosure", "fixed-price")
    return {s: [simulate_scheme(s, SMALL, seed) for seed in SEEDS] for s in schemes}


def test_persuasion_beats_baselines_and_stays_below_full_information(scheme_runs: dict[str, list]) -> None:
    """§9 D2. Per arrival the dominance holds in expectation (persuasion optimizes over a superset of
    the baselines' designs under the same ĉ and cap), not pathwise: signals are random and each
    scheme's spending moves its own cap. So the test compares cumulative utility per seed over
    T = 600 arrivals; the ordering held on all of 10 seeds tried, with margins ≥ 10 %."""
    for n, seed in enumerate(SEEDS):
        total = {s: runs[n].cumulative_utility[-1] for s, runs in scheme_runs.items()}
        for baseline in ("no-signal", "full-disclosure", "fixed-price"):
            assert total["persuasion"] > total[baseline], (seed, total)
        assert total["persuasion"] < total["full-information"], (seed, total)


def test_every_scheme_sees_the_same_sequences_and_respects_the_budget(scheme_runs: dict[str, list]) -> None:
    """§10 reproducibility and budget: same arrivals, clock and states across schemes; γ_t ≤ γ_max,t; spending ≤ B."""
    for n, seed in enumerate(SEEDS):
        reference = scheme_runs["persuasion"][n]
        arrivals = draw_arrivals(SMALL, seed)
        for runs in scheme_runs.values():
            r = runs[n]
            for name in ("client", "time", "state"):
                np.testing.assert_array_equal(getattr(r, name), getattr(reference, name))
            np.testing.assert_array_equal(r.client, arrivals.clients)
            assert np.all(r.price <= r.gamma_max)
            assert r.spent[-1] <= r.budget * (1 + 1e-12)
            assert np.all(np.diff(r.gamma_max) >= -1e-12)  # the cap never falls when payments stay under it
            np.testing.assert_allclose(r.spent, np.cumsum(np.where(r.joined, r.price, 0.0)), rtol=1e-12, atol=1e-12)
    regimes = set().union(*(r.regime_counts() for r in scheme_runs["persuasion"]))
    assert {"N", "F", "P", "KG"} <= regimes, "§9: every §4 regime occurs"


def test_simulation_is_deterministic_given_a_seed() -> None:
    config = replace(SMALL, horizon=200)
    a, b, c = (simulate_scheme("persuasion", config, seed) for seed in (5, 5, 6))
    for name in ("client", "state", "signal", "price", "joined", "utility", "theta_error", "type_error", "regime", "x"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.client, c.client)


def test_per_arrival_cap_mixing_weight_and_unknown_scheme() -> None:
    assert mixing_weight(60, 100.0) == 0.3 and mixing_weight(500, 100.0) == 1.0
    assert per_arrival_cap(10.0, 1, 5) == 2.0
    assert per_arrival_cap(10.0, 5, 5, gamma_cap=4.0) == 4.0
    with pytest.raises(ValueError, match="arrival t=6 outside 1..5"):
        per_arrival_cap(10.0, 6, 5)
    with pytest.raises(ValueError, match="pricing.scheme='posted'; allowed: persuasion, full-information"):
        simulate_scheme("posted", SMALL, 0)
