"""Layer-wise local DP (FedRE, Xiao et al., arXiv 2505.04889; ``shared/specs/fedre.md`` §10 invariants).

The math of :mod:`fedlr.privacy.ldp` and :mod:`fedlr.privacy.attack` on
synthetic tensors and tiny models, the client release for every update codec,
the ``fedre`` strategy driven in-process through the real dense trainer, the
CLI's configuration errors, and one tiny run through Flower on Ray.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from clients.ldp_release import LEDGER_KEY, open_release
from clients.trainer import train_dense
from fedlr import config as config_mod
from fedlr.cli import main
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.lowrank.fedmud import MUDLayout, build_mud_model
from fedlr.lowrank.lora import TRAINED_FACTORS, add_lora, lora_state
from fedlr.models import build_model
from fedlr.privacy.attack import invert_first_layer, probe_releases
from fedlr.privacy.ldp import (
    LayerBudget,
    LDPLedger,
    aggregate_noise_variance,
    aggregation_weights,
    allocation_weights,
    analytic_gaussian_delta,
    analytic_gaussian_sigma,
    client_preference,
    estimate_tau2,
    layer_bound,
    layer_budgets,
    layer_resolver,
    network_layer_of,
    noise_variance,
    privatize_update,
    psi_scores,
    public_indices,
    release_budgets,
    sensitive_mask,
    trained_layers,
)
from strategies import build_strategy
from tests.conftest import TINY, read_jsonl, run_cli

NODE_OFFSET = 1000  # fake Flower node ids: partition id + offset


def ldp_cfg(**over: object) -> Config:
    base = {
        "method": "fedre", "dataset": "digits", "width": 32, "seed": 3, "rounds": 2, "num_clients": 4,
        "clients_per_round": 4, "partition": "iid", "local_epochs": 1, "batch_size": 16, "lr": 0.1,
        "privacy.mechanism": "ldp", "privacy.epsilon": 10.0, "privacy.clip": 0.2,
    }
    return config_mod.resolve({**base, **over})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits() -> tuple[Config, torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A briefly trained digits MLP and the public split (PSI is uninformative at random weights)."""
    cfg = ldp_cfg()
    data = load_federated_data(cfg)
    model = build_model(cfg, data.input_shape, data.num_classes)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    from fedlr.training import local_sgd

    local_sgd(model, x, y, epochs=3, batch_size=32, lr=0.1, seed=0)
    idx = public_indices(len(data.y_train), cfg["seed"])
    return cfg, model, (x[idx], y[idx])


# ------------------------------------------------------------------------ budgets (§5, §7)


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_layer_budgets_compose_to_the_release_budget(noise: str) -> None:
    weights = allocation_weights([0.6, 0.3, 0.05, 0.0], "sensitivity", beta=4.0)
    budgets = layer_budgets(weights, 7.5, 1e-5, noise)
    assert math.fsum(b.epsilon for b in budgets) == pytest.approx(7.5, abs=1e-9)
    assert math.fsum(b.delta for b in budgets) == pytest.approx(1e-5 if noise == "gaussian" else 0.0, abs=1e-18)


def test_sensitivity_allocation_orders_floors_and_normalizes() -> None:
    psi = [0.9, 0.5, 0.5, 0.1]
    w = allocation_weights(psi, "sensitivity", beta=4.0)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[1] == w[2]  # equal PSI, equal weight
    assert w[0] < w[1] < w[3]  # more PSI, strictly less budget
    assert np.allclose(allocation_weights(psi, "uniform"), 0.25)
    # A steep β drives two layers to the floor 0.1/L: they sit exactly there and Σ w = 1 still.
    steep = allocation_weights([0.9, 0.8, 0.0], "sensitivity", beta=40.0)
    assert steep.sum() == pytest.approx(1.0, abs=1e-12)
    assert steep.min() >= 0.1 / 3 - 1e-15 and np.isclose(steep[:2], 0.1 / 3).all()


def test_psi_is_in_unit_range_zero_for_an_empty_mask_and_sensitive_layers_get_less(digits) -> None:
    cfg, model, (x, y) = digits
    layer_of = network_layer_of(cfg, x.shape[1:], 10)
    psi = psi_scores(model, x, y, sensitive_mask("center", x.shape[1:]), layer_of)
    assert list(psi) == ["net.1", "net.3", "net.5"]
    assert all(0.0 <= v <= 1.0 for v in psi.values())
    assert psi["net.1"] > psi["net.3"] > psi["net.5"] > 0  # falls with depth (§4 pilot)
    empty = psi_scores(model, x, y, torch.zeros(x.shape[1:]), layer_of)
    assert all(v == 0.0 for v in empty.values())
    layers = trained_layers(model, layer_of)
    sens = release_budgets(layers, psi, allocation="sensitivity", epsilon=10.0, delta=1e-5, noise="gaussian")
    uni = release_budgets(layers, psi, allocation="uniform", epsilon=10.0, delta=1e-5, noise="gaussian")
    eps = [sens[layer].epsilon for layer in layers]
    assert eps[0] < uni["net.1"].epsilon and eps[0] < eps[1] < eps[2]  # F1: the most sensitive layer gets the least


def test_ledger_composes_basically_and_round_trips() -> None:
    ledger, history = LDPLedger(), []
    for _ in range(5):
        ledger.record(10.0, 1e-5)
        history.append(ledger.epsilon)
    assert (ledger.epsilon, ledger.delta, ledger.releases) == (50.0, pytest.approx(5e-5, rel=1e-12), 5)
    assert history == sorted(history)
    assert LDPLedger.from_state(ledger.state_dict()) == ledger
    assert ledger.would_exceed(10.0, 59.0) and not ledger.would_exceed(10.0, 60.0)


# ---------------------------------------------------------------------- mechanisms (§5)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.3, 40.0])
def test_analytic_gaussian_sigma_is_the_smallest_that_satisfies_balle_wang(epsilon: float) -> None:
    delta, sensitivity = 3e-6, 0.4
    sigma = analytic_gaussian_sigma(epsilon, delta, sensitivity)
    assert analytic_gaussian_delta(sigma, epsilon, sensitivity) <= delta
    assert analytic_gaussian_delta(sigma * (1 - 1e-8), epsilon, sensitivity) > delta
    if epsilon < 1:  # where the classical mechanism is valid, the analytic one needs less noise
        assert sigma < sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_empirical_noise_variance_of_each_layer_matches_its_mechanism(noise: str) -> None:
    sizes = {"a": 100_000, "b": 150_000}
    update = {f"{name}.weight": torch.zeros(n) for name, n in sizes.items()}
    budgets = {"a": LayerBudget(2.0, 4e-6 if noise == "gaussian" else 0.0),
               "b": LayerBudget(8.0, 6e-6 if noise == "gaussian" else 0.0)}
    released, stats = privatize_update(update, layer_resolver(sizes), budgets, 1.0, noise, gen())
    total = sum(sizes.values())
    for name, size in sizes.items():
        bound = layer_bound(noise, 1.0, size, total)
        expected = noise_variance(noise, budgets[name], bound)
        assert stats[name].variance == expected and stats[name].bound == bound
        empirical = float(released[f"{name}.weight"].double().var())
        assert empirical == pytest.approx(expected, rel=0.05)
    if noise == "laplace":
        assert expected == pytest.approx(2 * (2 * bound / 8.0) ** 2)  # b = Δ/ε with Δ = 2·S_l


@pytest.mark.parametrize("noise", ["gaussian", "laplace"])
def test_clipping_bounds_each_layer_and_infinite_epsilon_releases_the_update(noise: str) -> None:
    torch.manual_seed(0)
    update = {"a.weight": torch.randn(30, 20) * 5, "a.bias": torch.randn(30), "b.weight": torch.randn(10, 30)}
    layer_of = layer_resolver(["a", "b"])
    near_exact = {"a": LayerBudget(1e12, 1e-5), "b": LayerBudget(1e12, 1e-5)}  # noise std ~1e-6
    released, stats = privatize_update(update, layer_of, near_exact, 0.5, noise, gen())
    order = 2 if noise == "gaussian" else 1
    for layer, keys in (("a", ["a.weight", "a.bias"]), ("b", ["b.weight"])):
        norm = float(torch.linalg.vector_norm(torch.cat([released[k].flatten() for k in keys]), ord=order))
        assert stats[layer].norm > stats[layer].bound and norm <= stats[layer].bound * (1 + 1e-3)
    infinite = {"a": LayerBudget(math.inf, 0.0), "b": LayerBudget(math.inf, 0.0)}
    released, _ = privatize_update(update, layer_of, infinite, 0.5, noise, gen())
    assert all(torch.equal(released[k], update[k]) for k in update)


def test_gains_clip_and_noise_in_scaled_units_and_release_in_original_units() -> None:
    """With a public gain g the mechanism runs on g·u: ‖g·ũ‖ ≤ C_l up to the noise,
    the per-coordinate noise of ũ has variance v/g², and a bad gain is refused."""
    update = {"a.left": torch.full((50_000,), 0.1), "a.bias": torch.full((10,), 0.1)}
    layer_of = layer_resolver(["a"])
    exact = {"a": LayerBudget(1e12, 1e-5)}
    released, stats = privatize_update(update, layer_of, exact, 0.5, "gaussian", gen(), gains={"a.left": 4.0})
    scaled = torch.cat([released["a.left"] * 4.0, released["a.bias"]])
    assert stats["a"].norm == pytest.approx(math.sqrt(50_000 * 0.4**2 + 10 * 0.1**2), rel=1e-6)
    assert float(scaled.norm()) == pytest.approx(stats["a"].bound, rel=1e-3)
    zeros = {"a.left": torch.zeros(100_000)}
    noisy, stats = privatize_update(zeros, layer_of, {"a": LayerBudget(2.0, 1e-5)}, 1.0, "gaussian", gen(), {"a.left": 4.0})
    assert float(noisy["a.left"].double().var()) == pytest.approx(stats["a"].variance / 16, rel=0.05)
    for bad in ({"a.left": 0.0}, {"a.left": math.inf}):
        with pytest.raises(ValueError, match="gains must be finite and > 0"):
            privatize_update(zeros, layer_of, exact, 1.0, "gaussian", gen(), bad)
    with pytest.raises(ValueError, match=r"gains for entries \['b.right'\]"):
        privatize_update(zeros, layer_of, exact, 1.0, "gaussian", gen(), {"b.right": 1.0})


def test_release_noise_is_seeded() -> None:
    update = {"a.weight": torch.zeros(50)}
    budgets = {"a": LayerBudget(1.0, 1e-5)}
    first = privatize_update(update, layer_resolver(["a"]), budgets, 1.0, "gaussian", gen(5))[0]["a.weight"]
    again = privatize_update(update, layer_resolver(["a"]), budgets, 1.0, "gaussian", gen(5))[0]["a.weight"]
    other = privatize_update(update, layer_resolver(["a"]), budgets, 1.0, "gaussian", gen(6))[0]["a.weight"]
    assert torch.equal(first, again) and not torch.equal(first, other)


# ------------------------------------------------------------------ aggregation (§6)


def test_aggregation_weights_sum_to_one_and_equal_variances_give_fedavg() -> None:
    n = [10.0, 30.0, 60.0]
    assert np.allclose(aggregation_weights(n, [0.5, 0.5, 0.5], tau2=0.2), [0.1, 0.3, 0.6], atol=1e-15)
    a = aggregation_weights(n, [0.1, 1.0, 4.0], tau2=0.05)
    assert a.sum() == pytest.approx(1.0, abs=1e-15) and a[0] > a[1] > a[2]


def test_variance_aware_weights_reduce_the_aggregates_noise_against_plain_averaging() -> None:
    # Half the clients 4× stricter (§9 tiers "1,0.25"): their noise std is ~4× larger.
    variances = np.array([0.01] * 5 + [0.16] * 5)
    n = np.ones(10)
    inverse = aggregation_weights(n, variances, tau2=0.0)
    plain = aggregation_weights(n, np.ones(10), tau2=0.0)
    assert aggregate_noise_variance(inverse, variances) < 0.25 * aggregate_noise_variance(plain, variances)
    # Synthetic releases: one common true update plus each client's noise, many coordinates.
    rng = np.random.default_rng(0)
    truth = rng.normal(size=20_000)
    released = truth + rng.normal(size=(10, 20_000)) * np.sqrt(variances)[:, None]
    tau2 = estimate_tau2(released, variances)
    assert tau2 == pytest.approx(0.0, abs=2e-3)  # no spread between clean updates
    aware = aggregation_weights(n, variances, tau2) @ released
    assert np.var(aware - truth) < 0.3 * np.var(released.mean(0) - truth)


def test_tau2_recovers_the_spread_of_the_clean_updates() -> None:
    rng = np.random.default_rng(1)
    variances = np.array([0.02, 0.02, 0.05, 0.05, 0.1, 0.1])
    clean = rng.normal(size=50_000) + rng.normal(size=(6, 50_000)) * math.sqrt(0.3)
    released = clean + rng.normal(size=(6, 50_000)) * np.sqrt(variances)[:, None]
    assert estimate_tau2(released, variances) == pytest.approx(0.3, rel=0.05)


# ------------------------------------------------------------------- preferences (§3)


def test_preferences_are_seeded_and_balanced() -> None:
    prefs = [client_preference(7, k, 20, (1.0, 0.25), ("w0", "w1", "w2")) for k in range(20)]
    assert prefs == [client_preference(7, k, 20, (1.0, 0.25), ("w0", "w1", "w2")) for k in range(20)]
    assert sum(p.multiplier == 0.25 for p in prefs) == 10
    assert sorted({p.mask for p in prefs}) == ["w0", "w1", "w2"]
    assert [int(sensitive_mask(f, (1, 40)).sum()) for f in ("w0", "w1", "w2")] == [13, 14, 13]
    center = sensitive_mask("center", (1, 8, 8))
    assert int(center[0, 2:6, 2:6].sum()) == 16 == int(center.sum())


# ------------------------------------------------------------ the client, every codec (§2)


def _context(pid: int) -> Context:
    return Context(
        run_id=1, node_id=NODE_OFFSET + pid, node_config={"partition-id": pid}, state=RecordDict(), run_config={}
    )


def test_allocation_depends_on_the_preference_not_on_private_data() -> None:
    cfg = ldp_cfg(num_clients=12, clients_per_round=12)
    data = load_federated_data(cfg)
    model = build_model(cfg, data.input_shape, data.num_classes)
    masks = cfg["privacy.masks"].split(",")
    by_mask: dict[str, list] = {}
    for pid in range(cfg["num_clients"]):
        family = client_preference(cfg["seed"], pid, cfg["num_clients"], (1.0,), masks).mask
        by_mask.setdefault(family, []).append(open_release(cfg, pid, 1, model, _context(pid)).budgets)
    assert len(by_mask) == 3
    for budgets in by_mask.values():  # clients with different private partitions, same preference
        assert all(b == budgets[0] for b in budgets)
    assert len({tuple(b[0]["net.1"].epsilon for b in [v]) for v in by_mask.values()}) == 3  # the masks differ


@pytest.mark.parametrize("codec", ["dense", "fedmud", "ffa-lora", "fedavg-lora"])
def test_release_covers_every_uploaded_tensor_of_every_codec(codec: str) -> None:
    cfg = ldp_cfg(method="fedavg", **({"fedmud.ratio": 0.25} if codec == "fedmud" else {}))
    data = load_federated_data(cfg)
    if codec == "dense":
        model = build_model(cfg, data.input_shape, data.num_classes)
        upload_of = lambda m: dict(m.state_dict())  # noqa: E731
    elif codec == "fedmud":
        model = build_mud_model(cfg, data.input_shape, data.num_classes)
        keys = MUDLayout.of(model).upload_keys
        upload_of = lambda m: {k: m.state_dict()[k] for k in keys}  # noqa: E731
    else:
        model = add_lora(build_model(cfg, data.input_shape, data.num_classes), 4, 4.0, codec, seed=0)
        upload_of = lambda m: lora_state(m, TRAINED_FACTORS[codec])  # noqa: E731
    context = _context(0)
    release = open_release(cfg, 0, 1, model, context)
    start = {k: v.clone() for k, v in upload_of(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # "training"
    released, metrics = release.privatize(upload_of(model), start)
    assert list(released) == list(start)
    assert all(not torch.equal(released[k], upload_of(model)[k]) for k in released)  # every entry noised
    assert math.fsum(metrics["ldp-epsilons"]) == pytest.approx(cfg["privacy.epsilon"], abs=1e-9)
    assert len(metrics["ldp-epsilons"]) == len(release.budgets) >= (1 if "lora" in codec else 3)
    assert metrics["epsilon"] == context.state[LEDGER_KEY]["epsilon"] == pytest.approx(10.0)


def test_lora_trainer_releases_its_trained_factors(tmp_path: Path, task_identity, monkeypatch) -> None:
    monkeypatch.setenv("FEDLR_CACHE", str(tmp_path))  # the pretrained W₀ is cached there
    from clients.fedsvd_trainer import train_lora
    from strategies import preflight

    cfg = ldp_cfg(method="ffa-lora", clients_per_round=2, **{"data.classes": "5-9", "fedsvd.pretrain_epochs": 2})
    data = load_federated_data(cfg)
    preflight(cfg, data)  # pretrains the frozen base on classes 0-4
    strategy = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
    _, arrays = strategy.build_global_model(data.input_shape, data.num_classes)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), None))
    pid = sent[0].metadata.dst_node_id - NODE_OFFSET
    reply = train_lora(cfg, pid, sent[0].content, _context(pid))
    metrics = next(iter(reply.metric_records.values()))
    assert set(next(iter(reply.array_records.values()))) == set(arrays) - {k for k in arrays if k.endswith(".A")}
    assert len(metrics["ldp-epsilons"]) == 2 and math.fsum(metrics["ldp-epsilons"]) == pytest.approx(10.0, abs=1e-9)
    assert metrics["epsilon"] == 10.0 and "train_loss" not in metrics


# ---------------------------------------------------------------- the fedre strategy (§6, §7)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task identity Flower's Message needs outside a ServerApp process."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _fedre_round(cfg: Config, strategy, arrays: ArrayRecord, contexts: dict[int, Context], t: int):
    sent = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), None))
    pids = [m.metadata.dst_node_id - NODE_OFFSET for m in sent]
    replies = [
        Message(train_dense(cfg, pid, m.content, contexts[pid]), reply_to=m) for pid, m in zip(pids, sent, strict=True)
    ]
    replies = strategy.check_replies(t, sent, replies)
    return replies, strategy.aggregate_train(t, replies)[0]


def test_fedre_round_logs_budgets_and_reduces_to_fedavg_for_equal_variances(task_identity) -> None:
    cfg = ldp_cfg(**{"privacy.allocation": "uniform"})
    data = load_federated_data(cfg)
    initial = ArrayRecord(build_model(cfg, data.input_shape, data.num_classes).state_dict())
    results = []
    for _ in range(2):  # twice: same config and seed, same releases and model
        strategy = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
        contexts = {p: _context(p) for p in range(cfg["num_clients"])}
        replies, arrays = _fedre_round(cfg, strategy, initial, contexts, 1)
        results.append(arrays)
    assert all(np.array_equal(results[0][k].numpy(), results[1][k].numpy()) for k in results[0])
    assert math.fsum(strategy.round_extra["layer_epsilons"]) == pytest.approx(10.0, abs=1e-9)
    # Every client has the same budgets, hence variances: FedRE is n_k-weighted FedAvg (§6 "Properties").
    fedavg = aggregate_arrayrecords([m.content for m in replies], "num-examples")
    for k in arrays:
        assert np.allclose(arrays[k].numpy(), fedavg[k].numpy(), atol=1e-6)
    state = strategy.state_dict()
    restored = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
    restored.load_state_dict(state)
    assert restored.state_dict() == state and set(state["cumulative"]) == {0, 1, 2, 3}


def test_fedre_stops_sampling_clients_at_epsilon_total(task_identity) -> None:
    cfg = ldp_cfg(num_clients=4, clients_per_round=2, **{"privacy.tiers": "1,0.25", "privacy.epsilon_total": 10.0})
    strategy = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(4)})
    strict = [p for p, e in strategy.release_epsilon.items() if e == 2.5]
    strategy.cumulative = {p: (7.5 if p in strict else 10.0) for p in range(4)}  # each strict client: one more
    assert strategy.sampled_partitions(5) == strict
    assert strategy.round_extra["exhausted_clients"] == sorted(set(range(4)) - set(strict))
    strategy.cumulative = {p: 10.0 for p in range(4)}
    with pytest.raises(RuntimeError, match="only 0 clients can release once more within privacy.epsilon_total = 10"):
        strategy.sampled_partitions(6)


# ---------------------------------------------------------------- the privacy probe (§9)


def test_inversion_is_exact_without_noise_and_similarity_falls_as_noise_grows(digits) -> None:
    cfg, model, (x, y) = digits
    layer_of = network_layer_of(cfg, x.shape[1:], 10)
    layers = trained_layers(model, layer_of)
    g_b, inp = torch.randn(32), torch.randn(64)
    assert torch.allclose(invert_first_layer(-0.1 * torch.outer(g_b, inp), -0.1 * g_b), inp, atol=1e-5)
    mask = sensitive_mask("center", x.shape[1:])
    similarity = []
    for epsilon in (math.inf, 3e4, 3e3, 300.0, 30.0):
        budgets = release_budgets(layers, None, allocation="uniform", epsilon=epsilon, delta=1e-5, noise="gaussian")
        result = probe_releases(model, x[:30], y[:30], mask, budgets, layer_of, clip=0.2, noise="gaussian", lr=0.1,
                                generator=gen(1))
        similarity.append(float(np.mean(result["similarity"])))
    assert similarity[0] == pytest.approx(1.0, abs=1e-4)
    assert all(a > b for a, b in zip(similarity, similarity[1:], strict=False)), similarity
    assert abs(similarity[-1]) < 0.2  # at a practical ε the first layer reveals ~nothing


# ------------------------------------------------------------------------- CLI (exit 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.epsilon=0"], "privacy.epsilon = 0: must be a number > 0"),
        (["privacy.epsilon=-1"], "privacy.epsilon = -1: must be a number > 0"),
        (["privacy.delta=1"], "privacy.delta = 1: must be a number in (0, 1)"),
        (["privacy.delta=0"], "privacy.delta = 0: must be a number in (0, 1)"),
        (["privacy.tiers='1,0'"], "privacy.tiers = '1,0': every multiplier must be a positive finite number, "
                                  "e.g. '1' or '1,0.25'"),
        (["privacy.masks='center'"], "privacy.masks = 'center': must be distinct mask families of 'mnist1d' "
                                     "separated by commas, from 'w0', 'w1', 'w2'"),
        (["privacy.mechanism='none'"], "method = 'fedre': needs privacy.mechanism = 'ldp' (it weights clients by "
                                       "their LDP noise), got 'none'"),
    ],
)
def test_cli_rejects_invalid_ldp_budgets_with_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(TINY.replace('method = "fedavg"', 'method = "fedre"') + '\n[privacy]\nmechanism = "ldp"\n')
    code = main(["run", str(path), "--out", str(tmp_path / "out"), *[a for o in overrides for a in ("--set", o)]])
    assert (code, capsys.readouterr().err) == (2, f"fedlr: error: {message}\n")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- end to end (Ray)


@pytest.mark.ray
def test_fedre_runs_through_the_cli_and_logs_layer_budgets(tmp_path: Path) -> None:
    path = tmp_path / "fedre.toml"
    path.write_text(
        TINY.replace('method = "fedavg"', 'method = "fedre"')
        + '\n[privacy]\nmechanism = "ldp"\nepsilon = 8.0\nclip = 0.5\nattack = true\nattack_probes = 5\n'
    )
    out = tmp_path / "run"
    proc = run_cli("run", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out / "metrics.jsonl")[1:]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert len(r["layer_epsilons"]) == 3 and math.fsum(r["layer_epsilons"]) == pytest.approx(8.0, abs=1e-9)
        assert r["layer_epsilons"][0] < r["layer_epsilons"][2]  # sensitivity allocation: the input layer gets least
    assert rows[0]["epsilon"] == 8.0 and rows[1]["epsilon"] in (8.0, 16.0)
    summary = (out / "summary.json").read_text()
    assert '"attack_similarity"' in summary and '"attack_mse_sensitive"' in summary
