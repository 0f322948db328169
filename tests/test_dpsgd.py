"""Client-side DP-SGD with cumulative per-client accounting (``shared/specs/fedsvd.md`` §3, §7 "Privacy budget")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from torch import nn

from fedlr.lowrank.lora import add_lora, load_lora_state, lora_layers, lora_state
from fedlr.privacy import (
    BudgetExceededError,
    ClientAccountant,
    PrivacyBudget,
    calibrate_noise_multiplier,
    dp_local_sgd,
    dp_steps,
    sample_rate,
)

SEED = 7
DELTA = 1e-5
N, BATCH = 96, 32  # q = 1/3
ROUNDS = 30
BUDGET = PrivacyBudget(epsilon=3.0, delta=DELTA)
Q = sample_rate(BATCH, N)
TAU = dp_steps(N, BATCH, epochs=1)  # 3 steps per round


@pytest.fixture(scope="module")
def sigma() -> float:
    return calibrate_noise_multiplier(BUDGET, sample_rate=Q, rounds=ROUNDS, steps_per_round=TAU)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(N, 40, generator=gen), torch.randint(0, 10, (N,), generator=gen)


def lora_mlp(method: str = "fedsvd") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return add_lora(model, 4, 4, method, seed=SEED)


def opacus_epsilon(noise_multiplier: float, q: float, steps: int) -> float:
    """ε of Opacus's own RDP accountant, stepped one optimizer step at a time."""
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=noise_multiplier, sample_rate=q)
    return reference.get_epsilon(delta=DELTA)


def train_round(model: nn.Module, data, sigma: float, accountant: ClientAccountant, seed: int, **kwargs):
    x, y = data
    return dp_local_sgd(
        model, x, y, epochs=1, batch_size=BATCH, lr=0.5, noise_multiplier=sigma, max_grad_norm=2.0,
        accountant=accountant, seed=seed, **kwargs,
    )


# --------------------------------------------------------------------------- calibration


def test_round_length_and_sample_rate():
    assert (Q, TAU) == (1 / 3, 3)
    assert dp_steps(1440, 64, epochs=2) == 44  # ⌊n/b⌋ = len(DPDataLoader) per epoch
    assert dp_steps(10, 64, epochs=1) == 1 and sample_rate(64, 10) == 1.0
    assert dp_steps(N, BATCH, steps=10) == 10
    with pytest.raises(ValueError, match="exactly one of epochs and steps"):
        dp_steps(N, BATCH, epochs=1, steps=3)
    with pytest.raises(ValueError, match=r"epsilon=inf; allowed: a finite number > 0"):
        PrivacyBudget(float("inf"), DELTA)


def test_calibration_reaches_the_target_at_the_planned_steps(sigma):
    # Worst case: the client takes part in all R rounds, T = R·τ steps.
    epsilon = opacus_epsilon(sigma, Q, ROUNDS * TAU)
    assert BUDGET.epsilon - 0.01 <= epsilon <= BUDGET.epsilon
    # Opacus 1.6, RDP, δ = 1e-5: the σ of ε = 3 at q = 1/3 over 30 rounds × 3 steps.
    assert sigma == pytest.approx(4.90, abs=0.01)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["fedsvd", "fedavg-lora"])
def test_dp_step_is_clipped_sgd_on_per_example_gradients_of_the_trained_factors(method, data):
    # σ = 0 and q = 1 make the DP step deterministic: Σ_i clip_C(g_i) / n.
    model = lora_mlp(method)
    load_lora_state(model, {f"{n}.B": 0.3 * torch.randn(layer.B.shape) for n, layer in lora_layers(model)})
    x, y = data[0][:16], data[1][:16]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(len(y))]
    norms = [float(torch.sqrt(sum(g.square().sum() for g in per_example))) for per_example in grads]
    # C at the median norm: half the examples are clipped, half keep their scale.
    clip, lr = float(np.median(norms)), 0.5
    assert min(norms) < clip < max(norms)
    factors = [min(1.0, clip / (norm + 1e-6)) for norm in norms]  # Opacus's clip factor
    total = [sum(f * g[j] for f, g in zip(factors, grads, strict=True)) for j in range(len(params))]
    expected = [p.detach() - lr * t / len(y) for p, t in zip(params, total, strict=True)]
    dp_local_sgd(
        model, x, y, steps=1, batch_size=len(y), lr=lr, noise_multiplier=0.0, max_grad_norm=clip,
        accountant=ClientAccountant(), seed=SEED,
    )
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def test_dp_training_moves_only_b(sigma, data):
    model = lora_mlp("fedsvd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, steps = train_round(model, data, sigma, ClientAccountant(), SEED)
    after = model.state_dict()
    # A, W₀, biases and the head are bit-identical; both B's moved.
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"0.lora_B.weight", "2.lora_B.weight"}
    assert steps == TAU and np.isfinite(loss)
    # Opacus's hooks and per-sample attributes are gone: the model can train again.
    assert not hasattr(model, "autograd_grad_sample_hooks")
    assert all(not hasattr(p, "grad_sample") and p.grad is None for p in model.parameters())


def test_dp_training_is_seeded(sigma, data):
    trained = []
    for seed in (SEED, SEED, SEED + 1):
        model = lora_mlp()
        train_round(model, data, sigma, ClientAccountant(), seed)
        trained.append(lora_state(model, which=("B",))["0.B"])
    assert torch.equal(trained[0], trained[1])
    assert not torch.equal(trained[0], trained[2])


def test_empty_poisson_batches_take_noise_only_steps(data):
    # q = 1/48: with 40 steps, several batches are empty; each still takes its step.
    model, accountant = lora_mlp(), ClientAccountant()
    x, y = data[0][:48], data[1][:48]
    loss, steps = dp_local_sgd(
        model, x, y, steps=40, batch_size=1, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
        accountant=accountant, seed=SEED,
    )
    assert steps == 40 and accountant.history == [(1.0, 1 / 48, 40)]
    assert np.isfinite(loss) and all(torch.isfinite(v).all() for v in lora_state(model).values())


def test_batchnorm_is_refused_even_when_frozen(data):
    model = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.Linear(16, 16), nn.Linear(16, 10))
    add_lora(model, 2, 2, "fedsvd", seed=SEED, targets=["2"])
    with pytest.raises(ValueError, match=r"DP-SGD cannot train a model with BatchNorm \(1\)"):
        train_round(model, data, 1.0, ClientAccountant(), SEED)


# --------------------------------------------------------------------------- accounting


def test_epsilon_is_cumulative_matches_opacus_and_survives_a_state_round_trip(sigma, data):
    model, accountant = lora_mlp(), ClientAccountant()
    assert accountant.epsilon(DELTA) == 0.0
    epsilons = []
    for server_round in (1, 2):
        train_round(model, data, sigma, accountant, SEED + server_round)
        epsilons.append(accountant.epsilon(DELTA))
    # A client sampled in m = 2 rounds reports the ε of m·τ steps, as Opacus computes it.
    assert accountant.history == [(sigma, Q, 2 * TAU)]
    assert epsilons[1] == opacus_epsilon(sigma, Q, 2 * TAU)
    assert 0 < epsilons[0] < epsilons[1]
    # The ledger is plain Python (Flower's context.state, JSON checkpoints) ...
    state = json.loads(json.dumps(accountant.state_dict()))
    assert state == {"mechanism": "rdp", "noise_multiplier": [sigma], "sample_rate": [Q], "steps": [2 * TAU]}
    # ... and a new process that restores it carries on instead of starting from 0.
    restored = ClientAccountant()
    restored.load_state_dict(state)
    assert restored.epsilon(DELTA) == epsilons[1]
    train_round(model, data, sigma, restored, SEED + 3)
    assert restored.steps == 3 * TAU
    assert epsilons[1] < restored.epsilon(DELTA) == opacus_epsilon(sigma, Q, 3 * TAU)
    with pytest.raises(ValueError, match="a 'rdp' ledger cannot be loaded into a 'prv' accountant"):
        ClientAccountant("prv").load_state_dict(state)


def test_would_exceed_triggers_exactly_when_the_next_round_would_exceed(sigma, data):
    accountant = ClientAccountant()
    done = (ROUNDS - 1) * TAU  # the client took part in the first R − 1 rounds
    accountant.load_state_dict({"mechanism": "rdp", "noise_multiplier": [sigma], "sample_rate": [Q], "steps": [done]})
    planned = opacus_epsilon(sigma, Q, ROUNDS * TAU)
    projected = accountant.projected_epsilon(DELTA, noise_multiplier=sigma, sample_rate=Q, steps=TAU)
    assert projected == planned
    check = {"noise_multiplier": sigma, "sample_rate": Q}
    assert not accountant.would_exceed(PrivacyBudget(planned, DELTA), TAU, **check)
    assert accountant.would_exceed(PrivacyBudget(float(np.nextafter(planned, 0)), DELTA), TAU, **check)
    # Round R fits the calibrated budget and ends exactly where it was projected.
    model = lora_mlp()
    train_round(model, data, sigma, accountant, SEED, budget=BUDGET)
    assert accountant.epsilon(DELTA) == projected <= BUDGET.epsilon
    # Round R + 1 is refused before any step: model and ledger are untouched.
    assert accountant.would_exceed(BUDGET, TAU, **check)
    before = lora_state(model)
    refused = r"would take the client from epsilon=2\.99\d+ to 3\.0\d+ > budget 3\.0"
    with pytest.raises(BudgetExceededError, match=refused):
        train_round(model, data, sigma, accountant, SEED + 1, budget=BUDGET)
    assert accountant.steps == ROUNDS * TAU
    assert all(torch.equal(v, lora_state(model)[k]) for k, v in before.items())
