"""FedSVD, FFA-LoRA and FedAvg-LoRA without Ray, and DP-SGD on the privacy axis
(Lee et al., NeurIPS 2025, arXiv 2505.12805; ``shared/specs/fedsvd.md`` §2, §3, §7).

The server's ``configure_train``/``aggregate_train`` talk to the real client
function (``clients.trainer.train`` → ``train_lora``) through Flower messages
built in-process, each client keeping its own ``Context``; a few tests hand
the server made-up replies instead, to pin the aggregation and the SVD step.
"""

from __future__ import annotations

import io
import itertools
import pickle
import traceback

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from clients.fedsvd_trainer import _lora_model
from clients.local_training import PRIVACY_KEY
from clients.trainer import train
from fedlr import config as config_mod
from fedlr.cli import main as cli_main
from fedlr.comm import record_nbytes
from fedlr.config import Config, ConfigError
from fedlr.data import cache_dir, load_federated_data, load_task
from fedlr.lowrank.lora import LORA_METHODS, SVD_SOLVERS, aggregate_lora, lora_layers
from fedlr.models import build_model
from fedlr.pretrain import build_lora_model, pretrain, pretrain_key, pretrained_state
from fedlr.privacy import ACCOUNTANTS, BudgetExceededError, ClientAccountant, dp_local_sgd, dp_steps, sample_rate
from fedlr.training import local_sgd
from strategies import build_strategy, preflight
from strategies.base import PrivacyBudgetExhausted
from strategies.fedsvd import LoRAStrategy

NODE_OFFSET = 1000  # fake Flower node ids: partition id + offset
DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("isolated_flower")


def make_cfg(**over) -> Config:
    base = {
        "method": "fedsvd", "dataset": "digits", "width": 32, "seed": 3, "rounds": 3, "num_clients": 4,
        "clients_per_round": 2, "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": 0.5,
        "data.classes": "5-9", "fedsvd.rank": 4, "fedsvd.pretrain_epochs": 3,
    }
    return config_mod.resolve({**base, **over})


# DP-SGD with q = 1 (the batch exceeds every client's ~180 examples) and τ = 2
# steps per round: every client shares one calibration, and Opacus's RDP of
# q = 1 is closed-form, which keeps these tests fast. q < 1 is covered by
# tests/test_dpsgd.py; the plumbing checked here does not depend on q.
DP = {"privacy.mechanism": "dpsgd", "batch_size": 512, "local_epochs": 2}


def reply(msg: Message, arrays: dict[str, torch.Tensor], num_examples: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": num_examples})})
    return Message(content, reply_to=msg)


class Federation:
    """Server strategy plus one persistent Context per client, driven round by round."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.data = load_federated_data(cfg)
        self.strategy: LoRAStrategy = build_strategy(cfg, {NODE_OFFSET + p: p for p in range(cfg["num_clients"])})
        self.model, self.arrays = self.strategy.build_global_model(self.data.input_shape, self.data.num_classes)
        self.contexts = {
            p: Context(
                run_id=1, node_id=NODE_OFFSET + p, node_config={"partition-id": p}, state=RecordDict(), run_config={}
            )
            for p in range(cfg["num_clients"])
        }
        self.epsilons: list[float | None] = []

    def send(self, t: int) -> list[Message]:
        self.strategy.round_extra = {}
        return list(self.strategy.configure_train(t, self.arrays, ConfigRecord({"server-round": t}), None))

    def round(self, t: int) -> tuple[list[Message], list[Message]]:
        sent = self.send(t)
        replies = []
        for msg in sent:
            pid = msg.metadata.dst_node_id - NODE_OFFSET
            replies.append(Message(train(self.cfg, pid, msg.content, self.contexts[pid]), reply_to=msg))
        replies = self.strategy.check_replies(t, sent, replies)
        self.arrays, _ = self.strategy.aggregate_train(t, replies)
        self.epsilons.append(self.strategy.track_epsilon(t, replies))
        return sent, replies


def factors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def layer_names(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rpartition(".")[0] for k in state})


# --------------------------------------------------------------------------- configuration


def test_constants_match_the_modules_that_implement_them():
    # fedlr.config stays free of torch/opacus imports, so it repeats these names.
    assert config_mod.LORA_METHODS == LORA_METHODS
    assert config_mod.SCHEMA["fedsvd.solver"].choices == SVD_SOLVERS
    assert config_mod.SCHEMA["privacy.accountant"].choices == ACCOUNTANTS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.mechanism=dpsgd", "norm=batch"],
         "norm = 'batch': BatchNorm mixes the examples of a batch, which DP-SGD (privacy.mechanism = 'dpsgd') "
         "cannot allow; use 'group' or 'none'"),
        (["data.classes=''"],
         "data.classes = '': shares every class with fedsvd.source_classes = '0-4', whose training examples fedlr "
         "pretrains on; the clients' task must use other classes, e.g. data.classes = '5-9' with source '0-4'"),
        (["data.classes='4-8'"],
         "data.classes = '4-8': shares classes [4] with fedsvd.source_classes = '0-4', whose training examples "
         "fedlr pretrains on; the clients' task must use other classes, e.g. data.classes = '5-9' with source '0-4'"),
        (["data.classes='5-8'"],
         "data.classes = '5-8': has 4 classes but fedsvd.source_classes = '0-4' has 5; the frozen head needs as many"),
        (["privacy.delta=1"], "privacy.delta = 1: must be a number in (0, 1)"),
        (["privacy.mechanism=dpsgd", "method=fedmud"],
         "privacy.mechanism = 'dpsgd': not available for method = 'fedmud'; methods with DP-SGD clients: fedavg, "
         "fedprox, fedadam, fedsvd, ffa-lora, fedavg-lora"),
        (["model=cnn4"], "model = 'cnn4': LoRA (method = 'fedsvd') adapts hidden Linear layers under a frozen "
                          "head; use one of 'mlp', 'cnn'"),
    ],
)
def test_invalid_settings_exit_2_with_one_line_naming_the_key(tmp_path, capsys, overrides, message):
    path = tmp_path / "c.toml"
    path.write_text(config_mod.dumps(make_cfg()))
    args = [a for o in overrides for a in ("--set", o)]
    assert cli_main(["run", str(path), "--out", str(tmp_path / "out"), *args]) == 2
    assert capsys.readouterr().err == f"fedlr: error: {message}\n"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"fedsvd.rank": 33}, "fedsvd.rank = 33: lora rank=33 for a 64->32 Linear; allowed: 1 <= rank <= 32"),
        ({"fedsvd.pretrained": "/nonexistent/w0.pt"}, "fedsvd.pretrained = '/nonexistent/w0.pt': no such file"),
    ],
)
def test_preflight_rejects_what_only_the_model_reveals(over, message):
    # Known once the model is built on the data; preflight runs before Ray starts (fedlr.runner).
    cfg = make_cfg(**over)
    with pytest.raises(ConfigError) as err:
        preflight(cfg, load_federated_data(cfg))
    assert str(err.value) == message


# --------------------------------------------------------------------------- task shift, W₀


def test_federated_task_and_pretraining_task_are_disjoint_relabelled_classes():
    cfg = make_cfg()
    data = load_federated_data(cfg)
    assert data.num_classes == 5 and set(np.unique(data.y_train)) == set(np.unique(data.y_test)) == set(range(5))
    x_all, y_all, _, _ = load_task(cfg, ())
    x_src, _, _, _ = load_task(cfg, (0, 1, 2, 3, 4))
    # Relabelled 5..9 → 0..4; together the two tasks are the whole training set, with no example twice.
    assert len(data.y_train) + len(x_src) == len(y_all)
    np.testing.assert_array_equal(data.x_train, x_all[y_all >= 5])
    np.testing.assert_array_equal(data.y_train, y_all[y_all >= 5] - 5)
    # W₀ is deterministic from the config: the cached file (which the server and
    # every client load) equals a fresh pretraining bit for bit.
    cached = pretrained_state(cfg, data.input_shape, data.num_classes)
    assert (cache_dir() / f"pretrained-{pretrain_key(cfg)}.pt").is_file()
    fresh = pretrain(cfg, data.input_shape, data.num_classes).state_dict()
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)


def test_a_given_pretrained_state_dict_is_used_if_it_fits(tmp_path):
    cfg = make_cfg()
    data = load_federated_data(cfg)
    path = tmp_path / "w0.pt"
    shapes = pretrained_state(cfg, data.input_shape, data.num_classes)
    torch.save({k: torch.full_like(v, 0.01) for k, v in shapes.items()}, path)
    model = build_lora_model(make_cfg(**{"fedsvd.pretrained": str(path)}), data.input_shape, data.num_classes)
    assert torch.equal(model.net[3].base.weight, torch.full((32, 32), 0.01))
    # No source task is needed with a given model, but its head must fit the task (10 classes here).
    every_class = make_cfg(**{"fedsvd.pretrained": str(path), "data.classes": ""})
    with pytest.raises(ValueError, match=r"does not fit model = 'mlp' \(width 32, 10 classes\): size mismatch"):
        build_lora_model(every_class, data.input_shape, 10)


# --------------------------------------------------------------------------- server: aggregation and SVD


def test_svd_step_gives_orthonormal_a_and_keeps_the_aggregated_product_and_the_outputs():
    cfg = make_cfg(rounds=1)
    fed = Federation(cfg)
    sent = fed.send(1)
    assert all(set(m.content["arrays"]) == set(fed.arrays) for m in sent)  # FedSVD sends A and B
    gen = torch.Generator().manual_seed(0)
    state = factors(fed.arrays)
    uploads = [{k: torch.randn(v.shape, generator=gen) for k, v in state.items() if k.endswith(".B")} for _ in sent]
    sizes = [100, 300]
    new, _ = fed.strategy.aggregate_train(1, [reply(m, u, n) for m, u, n in zip(sent, uploads, sizes, strict=True)])
    new = factors(new)
    mean_b = aggregate_lora(uploads, sizes)
    for layer in layer_names(state):
        a_old, a, b = state[f"{layer}.A"].double(), new[f"{layer}.A"].double(), new[f"{layer}.B"].double()
        assert torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype)) <= 1e-5
        target = mean_b[f"{layer}.B"].double() @ a_old
        assert torch.linalg.matrix_norm(b @ a - target) <= 1e-5 * torch.linalg.matrix_norm(target)
    assert fed.strategy.round_extra["orthonormality_error"] <= 1e-5
    assert 0 < fed.strategy.round_extra["reconstruction_error"] <= 1e-5
    assert fed.strategy.round_extra["aggregation_error"] <= 1e-5  # A is shared: B̄A is the mean of B_kA
    # The SVD step does not change the model's function (§7 "Reconstruction").
    x = torch.from_numpy(fed.data.x_test[:64])
    before, after = build_lora_model(cfg, fed.data.input_shape, 5), build_lora_model(cfg, fed.data.input_shape, 5)
    fed.strategy.load_global_arrays(before, ArrayRecord({**state, **mean_b}))
    fed.strategy.load_global_arrays(after, ArrayRecord(new))
    torch.testing.assert_close(after(x), before(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ffa-lora", "fedavg-lora", "fedsvd-period-2"])
def test_without_an_svd_step_the_server_applies_the_weighted_mean_exactly(method):
    over = {"fedsvd.svd_period": 2} if method == "fedsvd-period-2" else {"method": method}
    fed = Federation(make_cfg(rounds=1, **over))
    trained = ("A", "B") if method == "fedavg-lora" else ("B",)
    sent = fed.send(1)
    down = {"ffa-lora": {"B"}}.get(method, {"A", "B"})  # FFA-LoRA's A₀ never travels
    assert all({k.rpartition(".")[2] for k in m.content["arrays"]} == down for m in sent)
    state = factors(fed.arrays)
    gen = torch.Generator().manual_seed(1)
    uploads = [{k: torch.randn(v.shape, generator=gen) for k, v in state.items() if k[-1] in trained} for _ in sent]
    new, _ = fed.strategy.aggregate_train(1, [reply(m, u, n) for m, u, n in zip(sent, uploads, (7, 21), strict=True)])
    expected = {**state, **{k: (7 * uploads[0][k] + 21 * uploads[1][k]) / 28 for k in uploads[0]}}
    for key, value in factors(new).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    assert fed.strategy.round_extra["reconstruction_error"] == 0.0
    orthonormality = fed.strategy.round_extra["orthonormality_error"]
    assert orthonormality > 0.5  # A₀ (or the averaged A) is far from orthonormal
    aggregation = fed.strategy.round_extra["aggregation_error"]
    assert aggregation > 1e-2 if method == "fedavg-lora" else aggregation <= 1e-5  # B̄Ā ≠ mean of B_kA_k


def test_a_reply_with_other_factors_is_a_protocol_error():
    fed = Federation(make_cfg(rounds=1, method="ffa-lora"))
    sent = fed.send(1)
    state = factors(fed.arrays)
    with pytest.raises(ValueError, match=r"round 1: client \d sent arrays .*'net\.1\.A'.*; ffa-lora expects"):
        fed.strategy.aggregate_train(1, [reply(m, state, 10) for m in sent])


# --------------------------------------------------------------------------- clients


@pytest.mark.parametrize(("method", "mechanism"), [("fedsvd", "none"), ("fedsvd", "dpsgd"), ("fedavg-lora", "dpsgd")])
def test_local_training_changes_only_the_trained_factors_and_uploads_only_them(method, mechanism):
    cfg = make_cfg(method=method, **(DP if mechanism == "dpsgd" else {}))
    fed = Federation(cfg)
    sent = fed.send(1)
    msg = sent[0]
    pid = msg.metadata.dst_node_id - NODE_OFFSET
    before = build_lora_model(cfg, fed.data.input_shape, fed.data.num_classes)
    fed.strategy.load_global_arrays(before, fed.arrays)
    content = train(cfg, pid, msg.content, fed.contexts[pid])
    after = _lora_model(cfg, fed.data.input_shape, fed.data.num_classes, torch.device("cpu")).state_dict()
    changed = {k for k, v in before.state_dict().items() if not torch.equal(v, after[k])}
    trained = {"fedsvd": ("lora_B",), "fedavg-lora": ("lora_A", "lora_B")}[method]
    # W₀, biases and the head bit-identical (no silent wrapper corruption, spec §8); every trained factor moved.
    assert changed == {f"{n}.{f}.weight" for n, _ in lora_layers(before) for f in trained}
    uploaded = content["arrays"]
    assert set(uploaded) == {f"{n}.{f[-1]}" for n, _ in lora_layers(before) for f in trained}
    # Upload size (§7): 4·Σ d_out·r per client for B only.
    b_bytes = 4 * sum(layer.B.numel() for _, layer in lora_layers(before))
    assert record_nbytes(content) == (b_bytes if method == "fedsvd" else 4 * sum(
        layer.A.numel() + layer.B.numel() for _, layer in lora_layers(before)))
    metrics = content["metrics"]
    # Under DP the loss of the private data is not sent; the cumulative ε is.
    assert set(metrics) == ({"num-examples", "epsilon"} if mechanism == "dpsgd" else {"num-examples", "train_loss"})


def test_reported_epsilon_is_opacus_cumulative_never_decreases_and_ends_within_budget():
    rounds = 4
    cfg = make_cfg(rounds=rounds, **DP, **{"privacy.epsilon": 3.0})
    fed = Federation(cfg)
    per_client: dict[int, list[float]] = {p: [] for p in range(cfg["num_clients"])}
    round_max = []
    for t in range(1, rounds + 1):
        _, replies = fed.round(t)
        for r in replies:
            per_client[r.metadata.src_node_id - NODE_OFFSET].append(float(r.content["metrics"]["epsilon"]))
        round_max.append(max(float(r.content["metrics"]["epsilon"]) for r in replies))
    # Seeded sampling (seed 3): clients take part in 0, 4, 3 and 1 of the 4 rounds.
    assert [len(per_client[p]) for p in range(4)] == [0, 4, 3, 1]
    assert PRIVACY_KEY not in fed.contexts[0].state
    for pid, epsilons in ((p, e) for p, e in per_client.items() if e):
        n = len(fed.data.partitions[pid])
        tau = dp_steps(n, cfg["batch_size"], epochs=cfg["local_epochs"])
        sigma = float(fed.contexts[pid].state[PRIVACY_KEY]["calibrated_noise_multiplier"])
        # A client sampled in m rounds reports the ε of m·τ steps, as Opacus's own accountant steps them.
        reference = RDPAccountant()
        for m, epsilon in enumerate(epsilons, 1):
            for _ in range(tau):
                reference.step(noise_multiplier=sigma, sample_rate=sample_rate(cfg["batch_size"], n))
            assert epsilon == pytest.approx(reference.get_epsilon(delta=DELTA), rel=1e-12), (pid, m)
        assert all(a < b for a, b in zip(epsilons, epsilons[1:], strict=False))
        # Calibrated for the worst case of all R rounds: reached exactly by client 1.
        assert epsilons[-1] <= 3.0 and (epsilons[-1] >= 3.0 - 0.01) == (pid == 1)
    # The server's epsilon: the largest cumulative ε of any client so far.
    assert fed.epsilons == list(itertools.accumulate(round_max, max))


def test_a_client_that_would_exceed_its_budget_refuses_and_the_server_stops_the_run():
    cfg = make_cfg(rounds=2, clients_per_round=4, max_failures=3, **DP)
    fed = Federation(cfg)
    fed.round(1)
    fed.round(2)
    # A third round is more than this run was calibrated for (as if rounds had been raised).
    sent = fed.send(3)
    replies = []
    for msg in sent:
        pid = msg.metadata.dst_node_id - NODE_OFFSET
        ledger = dict(fed.contexts[pid].state[PRIVACY_KEY]) if PRIVACY_KEY in fed.contexts[pid].state else None
        try:
            train(cfg, pid, msg.content, fed.contexts[pid])
        except BudgetExceededError:  # what clients.client_app sends back: the traceback, named
            reason = f"client {pid} failed:\n{traceback.format_exc()}"
            replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
            assert dict(fed.contexts[pid].state[PRIVACY_KEY]) == ledger  # nothing spent
        else:
            raise AssertionError(f"client {pid} trained a round its budget cannot pay for")
    first = min(m.metadata.dst_node_id - NODE_OFFSET for m in sent)
    with pytest.raises(PrivacyBudgetExhausted) as err:
        fed.strategy.check_replies(3, sent, replies)  # even though max_failures would tolerate them
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"round 3: stopped, client {first} would exceed its privacy budget: this round's ")
    assert f"> budget {cfg['privacy.epsilon']} (delta=1e-05)" in text


def test_dense_methods_train_with_dp_sgd_too():
    cfg = make_cfg(method="fedprox", **DP, **{"fedprox.mu": 0.5, "data.classes": ""})
    fed = Federation(cfg)
    fed.round(1)
    assert fed.epsilons[0] is not None and 0 < fed.epsilons[0] <= cfg["privacy.epsilon"]


def test_dp_sgd_extras_are_plain_sgd_when_noise_and_clipping_vanish():
    # σ = 0, C huge and q = 1: each DP step is the full-batch gradient step, so
    # momentum, weight decay and FedProx's term must match local_sgd exactly.
    cfg = make_cfg(method="fedavg")
    data = load_federated_data(cfg)
    x, y = (torch.from_numpy(a) for a in data.client(0))
    extras = {"momentum": 0.9, "weight_decay": 0.01, "proximal_mu": 0.5}
    models = [build_model(cfg, data.input_shape, data.num_classes) for _ in range(2)]  # same seed, same init
    local_sgd(models[0], x, y, epochs=3, batch_size=len(y), lr=0.1, seed=0, **extras)
    dp_local_sgd(models[1], x, y, steps=3, batch_size=len(y), lr=0.1, noise_multiplier=0.0, max_grad_norm=1e9,
                 accountant=ClientAccountant(), seed=0, **extras)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- resume


def test_checkpointed_state_resumes_to_the_same_model_and_epsilon():
    cfg = make_cfg(rounds=4, **DP)
    straight = Federation(cfg)
    straight.round(1)
    straight.round(2)
    # What fedlr.checkpoint and clients.client_app persist, through the same round trips.
    buf = io.BytesIO()
    arrays = {k: v.numpy() for k, v in straight.arrays.items()}
    torch.save({"arrays": arrays, "strategy": straight.strategy.state_dict()}, buf)
    clients = {p: pickle.dumps(c.state) for p, c in straight.contexts.items()}
    rows = [{"round": t, "epsilon": e} for t, e in enumerate(straight.epsilons, 1)]

    again = Federation(cfg)  # a new Flower run: new strategy, new contexts
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    again.arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in saved["arrays"].items()})
    again.strategy.load_state_dict(saved["strategy"])
    again.strategy.restore_metrics(rows)
    for pid, state in clients.items():
        again.contexts[pid] = Context(run_id=2, node_id=NODE_OFFSET + pid, node_config={}, state=pickle.loads(state),
                                      run_config={})
    for t in (3, 4):
        straight.round(t)
        again.round(t)
        assert again.strategy.round_extra == straight.strategy.round_extra
    for key in straight.arrays:
        np.testing.assert_array_equal(straight.arrays[key].numpy(), again.arrays[key].numpy())
    assert again.epsilons == straight.epsilons[2:]
