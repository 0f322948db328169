"""FedMUD's strategy and client without Ray (Li et al., ICML 2025, arXiv 2505.23176).

The server's ``configure_train``/``aggregate_train`` talk to the real client
function ``clients.fedmud_trainer.train_fedmud`` through Flower messages built
in-process, each client keeping its own ``Context``, so every invariant of
``shared/specs/fedmud.md`` §3 and §7 is checked on the actual protocol.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.fedmud_trainer import BASE_KEY, train_fedmud
from fedlr import config as config_mod
from fedlr.cli import main as cli_main
from fedlr.comm import record_nbytes
from fedlr.config import Config, ConfigError
from fedlr.data import load_federated_data
from fedlr.lowrank.fedmud import MUDLayout, build_mud_model
from fedlr.models import build_model
from strategies import build_strategy, preflight
from strategies.fedmud import FedMUD

NODE_OFFSET = 1000  # fake Flower node ids: partition id + offset


pytestmark = pytest.mark.usefixtures("isolated_flower")


def make_cfg(**over) -> Config:
    base = {
        "method": "fedmud", "dataset": "digits", "width": 32, "seed": 0, "rounds": 8, "num_clients": 6,
        "clients_per_round": 2, "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": 0.01,
        "fedmud.ratio": 0.25,
    }
    return config_mod.resolve({**base, **over})


class Federation:
    """Server strategy plus one persistent Context per client, driven round by round."""

    def __init__(self, cfg: Config, arrays: ArrayRecord | None = None) -> None:
        self.cfg = cfg
        data = load_federated_data(cfg)
        self.strategy: FedMUD = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
        self.arrays = arrays or ArrayRecord(build_model(cfg, data.input_shape, data.num_classes).state_dict())
        self.contexts = {
            p: Context(run_id=1, node_id=NODE_OFFSET + p, node_config={"partition-id": p}, state=RecordDict(), run_config={})
            for p in range(cfg["num_clients"])
        }
        self.base_gap = 0.0  # largest |client W after sync - server W_t| seen

    def round(self, t: int) -> tuple[list[Message], list[Message]]:
        sent = list(self.strategy.configure_train(t, self.arrays, ConfigRecord({"server-round": t}), None))
        replies = []
        for msg in sent:
            pid = msg.metadata.dst_node_id - NODE_OFFSET
            content = train_fedmud(self.cfg, pid, msg.content, self.contexts[pid])
            replies.append(Message(content, reply_to=msg))
            state = self.contexts[pid].state
            held = state[BASE_KEY].to_torch_state_dict() if BASE_KEY in state else {}  # none for FedLMT
            for key, w in held.items():
                self.base_gap = max(self.base_gap, float(np.abs(w.numpy() - self.arrays[key].numpy()).max()))
        replies = self.strategy.check_replies(t, sent, replies)
        self.arrays, _ = self.strategy.aggregate_train(t, replies)
        return sent, replies


def test_payload_is_catch_up_or_full_model_whichever_is_smaller_and_clients_equal_server():
    cfg = make_cfg()
    fed = Federation(cfg)
    layout = fed.strategy.layout
    assert layout.max_catch_up == 4  # so that 8 rounds of 2 of 6 clients exercise both kinds
    factor_bytes, dense_bytes = layout.bytes_of(layout.factor_keys), layout.bytes_of(layout.dense_keys)
    model_bytes = layout.bytes_of(layout.base_keys + layout.dense_keys)
    holds: dict[int, int] = {}
    kinds = set()
    for t in range(1, cfg["rounds"] + 1):
        sent, _ = fed.round(t)
        for msg in sent:
            pid = msg.metadata.dst_node_id - NODE_OFFSET
            missed = list(range(holds.get(pid, 1), t))
            catch_up = dense_bytes + len(missed) * factor_bytes
            if catch_up < model_bytes:
                assert set(msg.content.array_records) == {"dense", *(f"log-{s}" for s in missed)}
                assert list(msg.content["config"]["log-rounds"]) == missed
                assert record_nbytes(msg.content) == catch_up
                kinds.add("first" if pid not in holds else "catch-up")
            else:
                assert set(msg.content.array_records) == {"arrays"}
                assert record_nbytes(msg.content) == model_bytes
                kinds.add("full")
            holds[pid] = t
    assert kinds == {"first", "catch-up", "full"}
    # Consistency (§7): after sync, every client's W is the server's W_t.
    assert fed.base_gap <= 1e-6


def test_upload_is_factors_and_dense_entries_only():
    cfg = make_cfg(rounds=1)
    fed = Federation(cfg)
    _, replies = fed.round(1)
    data = load_federated_data(cfg)
    plain = build_model(cfg, data.input_shape, data.num_classes)
    specs = fed.strategy.layout.specs
    total = sum(p.numel() for p in plain.parameters())
    dense_entries = total - sum(spec.numel for spec in specs.values())  # biases here
    factor_entries = sum(spec.num_trainable for spec in specs.values())
    for reply in replies:
        assert set(reply.content.array_records) == {"arrays"}
        assert record_nbytes(reply.content) == 4 * (factor_entries + dense_entries)
    assert (factor_entries + dense_entries) / total == pytest.approx(fed.strategy.layout.realized_ratio)
    assert fed.strategy.summary_extra() == {"realized_ratio": fed.strategy.layout.realized_ratio}


@pytest.mark.parametrize("decomposition", ["bkd", "lowrank"])
def test_aad_merges_the_mean_update_exactly_and_naive_does_not(decomposition):
    # Naive averaging errs by Σ w_k (U_k − Ū)(V_k − V̄): second order in how far
    # the clients' random factors drift apart, so a large step and several
    # epochs are needed to see it above float32 rounding (AAD's ~1e-7).
    errors = {}
    for aggregation in ("aad", "naive"):
        cfg = make_cfg(
            rounds=2, lr=0.1, local_epochs=3,
            **{"fedmud.decomposition": decomposition, "fedmud.aggregation": aggregation, "fedmud.init_scale": 1.0},
        )
        fed = Federation(cfg)
        before = fed.arrays.to_torch_state_dict()
        fed.round(1)
        fed.round(2)
        errors[aggregation] = fed.strategy.round_extra["aggregation_error"]
        after = fed.arrays.to_torch_state_dict()
        assert all(not torch.equal(before[k], after[k]) for k in fed.strategy.layout.base_keys)
    assert errors["aad"] <= 1e-6
    assert errors["naive"] > 2e-5


def _ldp_moves(decomposition: str, clip: float) -> tuple[dict[str, float], dict[str, float], list[Message]]:
    """One FedMUD round under near-noiseless LDP: per layer, how far the merged
    update moved the dense model (‖ΔW_l‖² + ‖Δb_l‖² under a root) and its clip C_l."""
    from fedlr.privacy.ldp import layer_bound, network_layer_of

    cfg = make_cfg(
        rounds=1, lr=0.02, local_epochs=2,
        **{"fedmud.decomposition": decomposition, "privacy.mechanism": "ldp", "privacy.epsilon": 1e12,
           "privacy.clip": clip},
    )
    fed = Federation(cfg)
    before = fed.arrays.to_torch_state_dict()
    _, replies = fed.round(1)
    after = fed.arrays.to_torch_state_dict()
    data = load_federated_data(cfg)
    layer_of = network_layer_of(cfg, data.input_shape, data.num_classes)
    upload = replies[0].content["arrays"].to_torch_state_dict()
    total = sum(v.numel() for v in upload.values())
    moved, bounds = {}, {}
    for layer in {layer_of(k) for k in upload}:
        size = sum(v.numel() for k, v in upload.items() if layer_of(k) == layer)
        moved[layer] = math.sqrt(sum(float((after[k] - before[k]).double().square().sum()) for k in after if layer_of(k) == layer))
        bounds[layer] = layer_bound("gaussian", clip, size, total)
    return moved, bounds, replies


@pytest.mark.parametrize("decomposition", ["bkd", "lowrank"])
def test_ldp_release_bounds_each_layers_merged_update_by_its_clip(decomposition):
    """Layer-wise LDP on FedMUD factors (``shared/specs/fedre.md`` §5) clips in ΔW
    units (``update_gain``): with noise negligible (ε = 10¹²), every layer's merged
    update stays within its C_l, a mean of clipped updates, although the same round
    without a binding clip moves some layer further. The replies carry the budgets,
    which compose to ε, and no training loss."""
    moved, bounds, replies = _ldp_moves(decomposition, clip=0.05)
    assert all(moved[layer] <= bounds[layer] * (1 + 1e-3) for layer in moved)
    free, _, _ = _ldp_moves(decomposition, clip=1e6)
    assert any(free[layer] > bounds[layer] for layer in free)
    for reply in replies:
        metrics = reply.content["metrics"]
        assert math.fsum(metrics["ldp-epsilons"]) == pytest.approx(1e12) and metrics["epsilon"] == 1e12
        assert "train_loss" not in metrics


def test_fedlmt_weight_target_keeps_a_rank_limited_model():
    cfg = make_cfg(rounds=2, **{"fedmud.target": "weight", "fedmud.decomposition": "lowrank", "fedmud.aggregation": "naive"})
    fed = Federation(cfg)
    data = load_federated_data(cfg)
    _, fed.arrays = fed.strategy.build_global_model(data.input_shape, data.num_classes)  # as run_server does

    def assert_rank_limited() -> None:
        for name, spec in fed.strategy.layout.specs.items():
            w = torch.from_numpy(fed.arrays[f"{name}.weight"].numpy())
            assert torch.linalg.matrix_rank(w.reshape(spec.shape[0], -1)) <= spec.factor_shapes["left"][1]

    assert_rank_limited()  # round 0 evaluates the truncated model, not the seed-built W
    for t in (1, 2):
        sent, _ = fed.round(t)
        assert all(set(m.content.array_records) == {"arrays"} for m in sent)  # factors + dense, every round
    assert_rank_limited()
    assert fed.strategy.round_extra["aggregation_error"] > 0


def snapshot(fed: Federation) -> tuple[ArrayRecord, bytes, dict[int, bytes]]:
    """What a checkpoint plus the persisted client states hold (fedlr.checkpoint,
    clients.client_app), through the same torch.save / pickle round trips."""
    buf = io.BytesIO()
    torch.save(fed.strategy.state_dict(), buf)
    return fed.arrays, buf.getvalue(), {p: pickle.dumps(c.state) for p, c in fed.contexts.items()}


def resumed(cfg: Config, arrays: ArrayRecord, strategy_state: bytes, client_states: dict[int, bytes]) -> Federation:
    fed = Federation(cfg, arrays=arrays)  # a new Flower run: new strategy, new contexts
    fed.strategy.load_state_dict(torch.load(io.BytesIO(strategy_state), weights_only=False))
    for pid, state in client_states.items():
        fed.contexts[pid] = Context(run_id=2, node_id=NODE_OFFSET + pid, node_config={}, state=pickle.loads(state),
                                    run_config={})
    return fed


def test_resume_sends_the_same_payloads_and_reaches_the_same_model():
    cfg = make_cfg(rounds=6)
    straight = Federation(cfg)
    for t in range(1, 5):
        straight.round(t)
    again = resumed(cfg, *snapshot(straight))
    for t in (5, 6):
        sent_straight, _ = straight.round(t)
        sent_again, _ = again.round(t)
        assert [record_nbytes(m.content) for m in sent_again] == [record_nbytes(m.content) for m in sent_straight]
    for key in straight.arrays:
        np.testing.assert_array_equal(straight.arrays[key].numpy(), again.arrays[key].numpy())


def test_resume_after_a_crash_mid_round_tolerates_clients_one_round_ahead():
    cfg = make_cfg(rounds=6)
    straight = Federation(cfg)
    for t in range(1, 5):
        straight.round(t)
    arrays, strategy_state, _ = snapshot(straight)
    straight.round(5)
    # The server died after round 5's clients trained and saved W_5, before its checkpoint.
    again = resumed(cfg, arrays, strategy_state, snapshot(straight)[2])
    assert again.strategy.sampled_partitions(5) == [2, 4]
    assert again.strategy.holds.get(2) == 2 and 4 not in again.strategy.holds  # both hold W_5 in fact
    straight.round(6)
    again.round(5)
    again.round(6)
    for key in straight.arrays:
        np.testing.assert_array_equal(straight.arrays[key].numpy(), again.arrays[key].numpy())
    assert again.base_gap <= 1e-6


def test_client_refuses_a_catch_up_it_cannot_apply():
    cfg = make_cfg(rounds=3)
    fed = Federation(cfg)
    fed.round(1)
    fed.round(2)
    pid = 5  # trained in rounds 1 and 2, sampled again in round 3 (seed 0)
    assert fed.strategy.sampled_partitions(3) == [0, 5] and fed.strategy.holds[pid] == 2
    fed.contexts[pid] = Context(run_id=1, node_id=NODE_OFFSET + pid, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match=r"this client holds W_1 but the server sent the rounds since 2; its saved"):
        fed.round(3)


def test_unreachable_ratio_is_a_config_error_before_ray(tmp_path, capsys):
    cfg = make_cfg(**{"fedmud.skip": "1-1", "fedmud.ratio": 0.03125})
    with pytest.raises(ConfigError, match=r"fedmud.ratio=0.03125 is unreachable"):
        preflight(cfg, load_federated_data(cfg))
    with pytest.raises(ConfigError, match=r"fedmud.skip=2-1 leaves none of the model's 3 Linear/Conv layers"):
        preflight(make_cfg(**{"fedmud.skip": "2-1"}), load_federated_data(cfg))
    path = tmp_path / "c.toml"
    path.write_text(config_mod.dumps(cfg))
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fedmud.ratio=0.03125 is unreachable" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert not ray.is_initialized()


def test_config_errors_name_key_value_and_allowed():
    with pytest.raises(ConfigError, match=r"^fedmud.ratio = 0: must be a number in \(0, 1\]$"):
        make_cfg(**{"fedmud.ratio": 0})
    with pytest.raises(ConfigError, match=r"^fedmud.skip = '1:1': must be 'F-L'"):
        make_cfg(**{"fedmud.skip": "1:1"})
    with pytest.raises(ConfigError, match=r"^fedmud.target = 'weight': needs fedmud.decomposition = 'lowrank'"):
        make_cfg(**{"fedmud.target": "weight"})
    cfg = make_cfg()
    assert {k: cfg[k] for k in cfg if k.startswith("fedmud.")} == {
        "fedmud.aggregation": "aad", "fedmud.decomposition": "bkd", "fedmud.init_scale": 5.0,
        "fedmud.ratio": 0.25, "fedmud.skip": "0-0", "fedmud.target": "update",
    }


def test_layout_splits_the_plain_model_exactly():
    cfg = make_cfg()
    data = load_federated_data(cfg)
    layout = MUDLayout.of(build_mud_model(cfg, data.input_shape, data.num_classes))
    plain = build_model(cfg, data.input_shape, data.num_classes).state_dict()
    assert set(layout.base_keys) | set(layout.dense_keys) == set(plain)
    assert not set(layout.base_keys) & set(layout.dense_keys)
    assert layout.bytes_of(layout.base_keys + layout.dense_keys) == sum(t.numel() * 4 for t in plain.values())
    # Catch-up of max_catch_up rounds is cheaper than W, one more round is not.
    w, f = layout.bytes_of(layout.base_keys), layout.bytes_of(layout.factor_keys)
    assert layout.max_catch_up * f < w <= (layout.max_catch_up + 1) * f
    assert math.isfinite(layout.realized_ratio) and layout.realized_ratio <= 0.25 + 0.001
