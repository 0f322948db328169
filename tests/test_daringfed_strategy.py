"""DaringFed's strategy and client (Xin et al., IJCAI 2025, arXiv 2505.05842; shared/specs/daringfed.md).

Most tests drive the real server code (``strategies.daringfed.DaringFed``,
including ``FedlrStrategy.run_rounds``) against the real client function
``clients.daringfed_trainer.train_daringfed`` through Flower messages built in
process, one persistent ``Context`` per client, so no Ray is needed. Hand-made
replies cover declines, protocol errors and the rule that the server never
computes a client's CPU frequency θ (§2, §7). One test runs the ``fedlr`` CLI
on Ray.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

import fedlr.pricing
import fedlr.pricing.game
import fedlr.pricing.simulate
import strategies.daringfed
from clients.daringfed_trainer import train_daringfed
from fedlr import config as config_mod
from fedlr.config import SCHEMA, Config, ConfigError
from fedlr.data import load_federated_data
from fedlr.models import build_model
from fedlr.pricing import (
    SCHEMES,
    TAU_MHZ,
    TII_DESIGNS,
    SimulationConfig,
    client_theta,
    play_stage,
    recover_theta,
    simulate_scheme,
    upload_time,
)
from fedlr.pricing.protocol import COMPUTE_TIME_KEY, EVAL_THETA_KEY, JOINED_KEY, offer_payload, read_offer
from fedlr.training import evaluate
from strategies import build_strategy
from strategies.base import ClientFailure
from strategies.daringfed import DaringFed
from tests.conftest import NODE_OFFSET, LocalGrid, read_jsonl, run_cli

OFFER_KEYS = {"server-round", "mu", "x", "price", "signal"}


pytestmark = pytest.mark.usefixtures("isolated_flower")


def make_cfg(**over: Any) -> Config:
    base = {
        "method": "daringfed", "dataset": "digits", "seed": 3, "rounds": 40, "num_clients": 12,
        "clients_per_round": 1, "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": 0.05,
    }
    return config_mod.resolve({**base, **over})


def new_strategy(cfg: Config) -> DaringFed:
    return build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})


def initial_arrays(cfg: Config) -> ArrayRecord:
    data = load_federated_data(cfg)
    return ArrayRecord(build_model(cfg, data.input_shape, data.num_classes).state_dict())


@dataclass
class Run:
    """What ``run_rounds`` produced: rows, the global model and the checkpointed strategy state after
    every arrival (serialized as ``fedlr.checkpoint`` does), and the grid's message log."""

    rows: list[dict[str, Any]]
    models: list[ArrayRecord]
    checkpoints: list[bytes]
    grid: LocalGrid


def run_arrivals(cfg: Config, strategy: DaringFed, arrays: ArrayRecord, first: int = 1) -> Run:
    """``FedlrStrategy.run_rounds`` from arrival ``first`` to ``rounds`` on a :class:`LocalGrid`."""
    data = load_federated_data(cfg)
    model = build_model(cfg, data.input_shape, data.num_classes)
    x, y = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    run = Run([], [], [], LocalGrid(cfg, train_daringfed))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(model, x, y)

    def on_round(server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        run.rows.append(row)
        run.models.append(arrays)
        buf = io.BytesIO()
        torch.save(strategy.state_dict(), buf)
        run.checkpoints.append(buf.getvalue())

    strategy.run_rounds(run.grid, arrays, evaluate_fn, on_round, first)
    return run


def hand_reply(msg: Message, metrics: dict[str, Any], arrays: ArrayRecord | None = None) -> Message:
    records: dict[str, Any] = {"metrics": MetricRecord(metrics)}
    if arrays is not None:
        records["arrays"] = arrays
    return Message(RecordDict(records), reply_to=msg)


# --------------------------------------------------------------------------- configuration


def test_config_needs_one_client_per_arrival_and_mirrors_the_pricing_package() -> None:
    with pytest.raises(ConfigError, match=r"^clients_per_round = 10: method = 'daringfed' serves one arriving"):
        config_mod.resolve({"method": "daringfed"})
    with pytest.raises(ConfigError, match=r"^pricing.tii = false: the OII oracle ablation of pricing.scheme = "
                                          r"'persuasion' only, got pricing.scheme = 'no-signal'$"):
        make_cfg(**{"pricing.tii": False, "pricing.scheme": "no-signal"})
    with pytest.raises(ConfigError, match=r"^pricing.scheme = 'posted': must be one of 'persuasion'"):
        make_cfg(**{"pricing.scheme": "posted"})
    assert SCHEMA["pricing.scheme"].choices == SCHEMES
    assert SCHEMA["pricing.tii_design"].choices == TII_DESIGNS


# --------------------------------------------------------------------------- what travels (§7)


def test_offer_message_carries_the_public_offer_and_signal_but_not_the_state() -> None:
    cfg = make_cfg()
    strategy, arrays = new_strategy(cfg), initial_arrays(cfg)
    for t in range(1, 6):
        (msg,) = strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), None)  # no oracle: no grid
        config = msg.content["config"]
        assert set(config) == OFFER_KEYS, "τ_t and anything else server-private must not travel"
        assert msg.metadata.dst_node_id == NODE_OFFSET + int(strategy.arrivals.clients[t - 1])
        assert msg.content["arrays"] is arrays
        pending = strategy._pending
        offer, signal = read_offer(config)
        np.testing.assert_array_equal(offer.pi, pending.offer.pi)
        assert offer.price == pending.offer.price <= pending.gamma_max
        assert offer.prior[1] == strategy.beliefs.mu
        assert dict(config) == {"server-round": t, **offer_payload(pending.offer, signal)}
        # σ_t is π_t(·|τ_t) at the arrival's common uniform (§7): the same σ any scheme would draw.
        assert signal == fedlr.pricing.draw_signal(
            offer.pi, int(strategy.arrivals.states[t - 1]), float(strategy.arrivals.signal_u[t - 1])
        )
        strategy.aggregate_train(t, [hand_reply(msg, {JOINED_KEY: 0, EVAL_THETA_KEY: 1.0})])


def test_declines_keep_the_model_and_protocol_errors_fail_loudly() -> None:
    cfg = make_cfg()
    strategy, arrays = new_strategy(cfg), initial_arrays(cfg)
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), None)
    replies = strategy.check_replies(1, [msg], [hand_reply(msg, {JOINED_KEY: 0, EVAL_THETA_KEY: 1.0})])
    new, train_metrics = strategy.aggregate_train(1, replies)
    assert new is arrays and train_metrics is None
    extra = strategy.round_extra
    assert (extra["joined"], extra["clients"], extra["server_utility"], extra["budget_spent"]) == (0, 0, 0.0, 0.0)
    assert strategy.beliefs.mu == pytest.approx(0.95 * 0.5 + 0.05 * int(strategy.arrivals.states[0] == 1))

    pid = int(strategy.arrivals.clients[1])
    bad = {
        "joined without a model": ({JOINED_KEY: 1, "num-examples": 10, EVAL_THETA_KEY: 1.0}, None,
                                   f"round 2: client {pid} replied joined = 1 with 0 array records"),
        "declined with a model": ({JOINED_KEY: 0, EVAL_THETA_KEY: 1.0}, arrays,
                                  f"round 2: client {pid} replied joined = 0 with 1 array records"),
        "no decision": ({EVAL_THETA_KEY: 1.0}, None, f"round 2: client {pid} replied joined = None, expected 0 or 1"),
    }
    for metrics, upload, message in bad.values():
        (msg,) = strategy.configure_train(2, arrays, ConfigRecord({"server-round": 2}), None)
        with pytest.raises(ClientFailure, match=f"^{message}$"):
            strategy.aggregate_train(2, [hand_reply(msg, metrics, upload)])
    (msg,) = strategy.configure_train(2, arrays, ConfigRecord({"server-round": 2}), None)
    failed = Message(Error(code=0, reason=f"client {pid} failed:\nValueError: boom"), reply_to=msg)
    with pytest.raises(ClientFailure, match=f"client {pid} failed:\nValueError: boom"):
        strategy.check_replies(2, [msg], [failed])


def test_participant_is_paid_mixed_in_and_estimated_from_its_computation_time() -> None:
    cfg = make_cfg(**{"pricing.scheme": "fixed-price"})  # pooling at B/T: every arrival is an offer worth taking
    strategy, arrays = new_strategy(cfg), initial_arrays(cfg)
    (msg,) = strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), None)
    pending = strategy._pending
    pid, state, profile = pending.partition, pending.state, strategy.profiles[pending.partition]
    theta = 1.37  # what the client's clock implies; the server recovers it from T_cmp + S/r(τ)
    compute_time = profile.workload / (theta * 1e9)
    zeros = ArrayRecord({k: torch.zeros_like(v) for k, v in arrays.to_torch_state_dict().items()})
    reply = hand_reply(
        msg, {JOINED_KEY: 1, "num-examples": profile.num_examples, "train_loss": 0.5,
              COMPUTE_TIME_KEY: compute_time, EVAL_THETA_KEY: 0.9}, zeros,
    )
    prior_mean = strategy.beliefs.types.mean()
    new, train_metrics = strategy.aggregate_train(1, [reply])
    alpha = min(1.0, 0.5 * profile.num_examples / strategy.mean_examples)
    for key, w in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(new.to_torch_state_dict()[key], (1 - alpha) * w)
    assert train_metrics["train_loss"] == 0.5
    price = pending.offer.price
    assert price > 0
    assert strategy.budget_left == pytest.approx(strategy.budget - price)
    assert strategy.cumulative_utility == pytest.approx(strategy.values[state] - price)
    tau = float(TAU_MHZ[state])
    assert recover_theta(compute_time + upload_time(tau, profile, strategy.cost_model), tau, profile,
                         strategy.cost_model) == pytest.approx(theta)
    assert strategy.beliefs.clients.theta_hat(pid) == pytest.approx(0.8 * prior_mean + 0.2 * theta)
    extra = strategy.round_extra
    assert (extra["joined"], extra["clients"], extra["participation_rate"]) == (1, 1, 1.0)
    assert extra["theta_error"] == pytest.approx(abs(prior_mean - 0.9))  # logged from eval-theta only


# --------------------------------------------------------------------------- the server never reads θ


def _forbidden(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the server computed a client's private CPU frequency")


def test_server_never_computes_theta_and_eval_theta_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path to θ_{i,t} raises while the server runs each scheme over hand-made replies (§2, §7).

    Two servers get the same replies except for ``eval-theta`` (the logging-only ground truth): every
    offer, estimator state and utility must be identical, only ``theta_error`` may differ.
    """
    for module in (fedlr.pricing.game, fedlr.pricing.simulate, fedlr.pricing):
        for name in ("client_theta", "theta_paths"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _forbidden)
    assert not {"client_theta", "theta_paths", "join_decision"} & set(vars(strategies.daringfed))

    class TypeReportGrid:
        """Answers the oracle's type report with a hand-made θ: the only way θ reaches the server."""

        def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
            return [hand_reply(m, {"theta": 1.1}) for m in messages]

    variants = [{"pricing.scheme": scheme} for scheme in SCHEMES] + [{"pricing.tii": False}]  # + the OII oracle
    for variant in variants:
        cfg = make_cfg(rounds=25, **variant)
        arrays = initial_arrays(cfg)
        servers = [new_strategy(cfg), new_strategy(cfg)]
        grid = TypeReportGrid()  # only the oracles send it anything
        for t in range(1, cfg["rounds"] + 1):
            logs = []
            for server, truth in zip(servers, (0.6, 1.9), strict=True):
                (msg,) = server.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid)
                profile = server.profiles[server._pending.partition]
                joined = t % 3 != 0  # replies are made up: the server cannot tell
                metrics = {JOINED_KEY: int(joined), EVAL_THETA_KEY: truth}
                if joined:
                    metrics.update({"num-examples": profile.num_examples, "train_loss": 1.0,
                                    COMPUTE_TIME_KEY: profile.workload / (0.5e9 + 5e7 * t)})
                server.aggregate_train(t, [hand_reply(msg, metrics, arrays if joined else None)])
                logs.append((dict(msg.content["config"]), server.round_extra))
            (config_a, extra_a), (config_b, extra_b) = logs
            assert config_a == config_b
            assert {k: v for k, v in extra_a.items() if k != "theta_error"} == {
                k: v for k, v in extra_b.items() if k != "theta_error"
            }
        state_a, state_b = (s.state_dict() for s in servers)
        assert str(state_a) == str(state_b), variant


# --------------------------------------------------------------------------- end to end without Ray


@pytest.fixture(scope="module")
def persuasion_run() -> tuple[Config, Run]:
    cfg = make_cfg()
    return cfg, run_arrivals(cfg, new_strategy(cfg), initial_arrays(cfg))


def test_rows_follow_the_contract_and_the_client_decides_like_the_game_only_oracle(persuasion_run) -> None:
    """Per-arrival metrics, measured bytes, budget; and every decision the ClientApp took replays
    exactly through :func:`fedlr.pricing.play_stage` with the client's θ (§7, §10 reproducibility)."""
    cfg, run = persuasion_run
    world = new_strategy(cfg)  # the public world and the arrival sequences
    model_bytes = sum(a.numpy().nbytes for a in run.models[0].values())
    joins = 0
    for row, (pid, config, reply) in zip(run.rows, run.grid.log, strict=True):
        t = row["round"]
        assert pid == row["partition"] == int(world.arrivals.clients[t - 1])
        assert row["price"] == config["price"] <= row["gamma_max"] + 1e-12
        assert (row["bytes_down"], row["bytes_up"], row["clients"]) == (
            model_bytes, model_bytes * row["joined"], row["joined"]
        )
        joins += row["joined"]
        assert row["participation_rate"] == pytest.approx(joins / t)
        assert row["mu_hat"] == config["mu"] and 0.0 <= row["mu_error"] <= 1.0 and row["theta_error"] >= 0.0
        assert ("train_loss" in row) == bool(row["joined"])
        offer, signal = read_offer(config)
        state = int(world.arrivals.states[t - 1])
        theta = client_theta(cfg["seed"], pid, t)
        stage = play_stage(offer, state, float(world.arrivals.signal_u[t - 1]), theta, world.profiles[pid],
                           world.cost_model, world.values)
        assert (stage.signal, stage.joined) == (signal, bool(reply[JOINED_KEY])), t
        assert reply[EVAL_THETA_KEY] == theta
    assert 0 < joins < len(run.rows), "the run should see both joins and declines"
    assert run.rows[-1]["budget_spent"] <= world.budget * (1 + 1e-12)
    assert run.rows[-1]["server_utility"] == pytest.approx(sum(
        r["joined"] * (world.values[int(world.arrivals.states[r["round"] - 1])] - r["price"]) for r in run.rows
    ))
    assert {r["regime"] for r in run.rows} == {"N", "F", "P", "KG"}, "every §4 regime occurs (§9)"


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(persuasion_run) -> None:
    """``fedlr run --resume``: a fresh server loads the state and model checkpointed after arrival 17."""
    cfg, run = persuasion_run
    cut = 17
    resumed = new_strategy(cfg)
    resumed.load_state_dict(torch.load(io.BytesIO(run.checkpoints[cut - 1]), weights_only=False))
    tail = run_arrivals(cfg, resumed, run.models[cut - 1], first=cut + 1)
    assert tail.rows == run.rows[cut:]
    for a, b in zip(tail.models, run.models[cut:], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_same_config_and_seed_give_identical_metrics(persuasion_run) -> None:
    cfg, run = persuasion_run
    assert run_arrivals(cfg, new_strategy(cfg), initial_arrays(cfg)).rows == run.rows


def test_oracle_schemes_ask_for_the_type_and_price_it_exactly() -> None:
    """``full-information`` learns θ by a type report before the offer (complete information, §8) and
    then recruits whenever V(τ) covers the true cost: the price equals the client's cost."""
    cfg = make_cfg(rounds=12, **{"pricing.scheme": "full-information"})
    run = run_arrivals(cfg, new_strategy(cfg), initial_arrays(cfg))
    world = new_strategy(cfg)
    reports = [entry for entry in run.grid.log if "request" in entry[1]]
    offers = [entry for entry in run.grid.log if "request" not in entry[1]]
    assert len(reports) == len(offers) == 12
    for row, (pid, _, report), (_, config, reply) in zip(run.rows, reports, offers, strict=True):
        t = row["round"]
        assert report == {"theta": client_theta(cfg["seed"], pid, t)}
        state = int(world.arrivals.states[t - 1])
        assert config["x"] == [0.0, 1.0] and config["signal"] == state  # σ = τ
        cost = fedlr.pricing.compute_cost(report["theta"], world.profiles[pid].workload, world.cost_model)
        cost += world.comm_costs[pid][state]
        if row["joined"]:
            assert config["price"] == pytest.approx(cost)
        assert bool(reply[JOINED_KEY]) == (config["price"] > 0)


# --------------------------------------------------------------------------- the game, pure level (§9 D2)


def test_persuasion_stays_below_the_oii_oracle_on_the_same_arrivals() -> None:
    """With a binding budget cap ``full-information`` is no upper bound (tests/test_pricing.py covers the
    ordering against the baselines); the appropriate oracle is persuasion told the true θ (``tii = false``)."""
    config = SimulationConfig(num_clients=30, horizon=400)
    for seed in (0, 1, 2):
        tii = simulate_scheme("persuasion", config, seed).cumulative_utility[-1]
        oii = simulate_scheme("persuasion", replace(config, tii=False), seed).cumulative_utility[-1]
        assert 0.0 < tii < oii, (seed, tii, oii)


# --------------------------------------------------------------------------- the CLI on Ray


@pytest.mark.ray
def test_cli_runs_daringfed_end_to_end(tmp_path: Path) -> None:
    config = tmp_path / "daringfed.toml"
    config.write_text(
        'method = "daringfed"\ndataset = "mnist1d"\nmodel = "mlp"\nseed = 7\nrounds = 6\nnum_clients = 4\n'
        'clients_per_round = 1\npartition = "iid"\nlocal_epochs = 1\nlr = 0.1\n\n[data]\nnum_samples = 1000\n'
    )
    out = tmp_path / "run"
    result = run_cli("run", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(7))
    for row in rows[1:]:
        assert {"server_utility", "participation_rate", "price", "theta_error", "mu_error"} <= set(row)
        assert row["bytes_up"] == (rows[1]["bytes_down"] if row["joined"] else 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["server_utility"] == rows[-1]["server_utility"]
    assert math.isclose(summary["participation_rate"], sum(r["joined"] for r in rows[1:]) / 6)
