"""LoRA adapters and FedSVD's SVD re-factorization (Lee et al., NeurIPS 2025, arXiv 2505.12805):
invariants of ``shared/specs/fedsvd.md`` §7."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedlr.lowrank.lora import (
    LoRALinear,
    add_lora,
    aggregate_lora,
    initial_a,
    load_lora_state,
    lora_layers,
    lora_state,
    orthonormality_error,
    reconstruction_error,
    refactorize,
    refactorize_state,
    svd_due,
)
from fedlr.models import CNN1D
from fedlr.training import local_sgd

SEED = 7
RANK = 8


def mlp(alpha: float = RANK, method: str = "fedsvd", seed: int = SEED) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)
    )
    return add_lora(model, RANK, alpha, method, seed=seed)


def random_b(model: nn.Module, gen: torch.Generator, scale: float = 0.5) -> dict[str, torch.Tensor]:
    return {f"{name}.B": scale * torch.randn(layer.B.shape, generator=gen) for name, layer in lora_layers(model)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# --------------------------------------------------------------------------- layer and wrapping


def test_forward_is_w0x_plus_scaled_bax():
    torch.manual_seed(1)
    base = nn.Linear(12, 9)
    layer = LoRALinear(base, 4, alpha=10.0, a_init=torch.randn(4, 12))
    with torch.no_grad():
        layer.B.copy_(torch.randn(9, 4))
    x = torch.randn(5, 12)
    expected = base(x) + (10.0 / 4) * x @ layer.A.T @ layer.B.T
    np.testing.assert_allclose(layer(x).detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "trained"),
    [("fedsvd", {"lora_B"}), ("ffa-lora", {"lora_B"}), ("fedavg-lora", {"lora_A", "lora_B"})],
)
def test_add_lora_freezes_everything_but_the_trained_factors(method, trained):
    model = mlp(method=method)
    names = [name for name, _ in lora_layers(model)]
    assert names == ["1", "3"]  # every hidden Linear; the head "5" stays a plain, frozen Linear
    assert isinstance(model[5], nn.Linear) and not isinstance(model[5], LoRALinear)
    expected = {f"{layer}.{factor}.weight" for layer in names for factor in trained}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected


def test_init_is_seeded_peft_default_with_zero_b_and_leaves_the_model_function():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    x = torch.randn(6, 40)
    expected = plain(x).detach()
    rng_before = torch.random.get_rng_state()
    model = add_lora(plain, RANK, RANK, "fedsvd", seed=SEED)
    # skip_init: wrapping does not consume the global RNG.
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.equal(model(x), expected)  # B₀ = 0
    for index, (_, layer) in enumerate(lora_layers(model)):
        d_in = layer.A.shape[1]
        assert torch.count_nonzero(layer.B) == 0
        assert torch.equal(layer.A, initial_a(RANK, d_in, SEED, index))
        assert float(layer.A.abs().max()) <= 1 / math.sqrt(d_in)
        assert float(layer.A.abs().max()) > 0.9 / math.sqrt(d_in)  # uniform on the full PEFT range
    # Server and clients agree on A₀ from the seed alone; another seed draws another A₀.
    assert torch.equal(lora_state(mlp(seed=SEED))["1.A"], lora_state(model)["1.A"])
    assert not torch.equal(lora_state(mlp(seed=SEED + 1))["1.A"], lora_state(model)["1.A"])


def test_add_lora_errors_are_named():
    with pytest.raises(ValueError, match=r"method='lora'; allowed: fedsvd, ffa-lora, fedavg-lora"):
        mlp(method="lora")
    with pytest.raises(ValueError, match=r"LoRA target '2' must be an nn.Linear, got ReLU"):
        add_lora(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()), 2, 2, "fedsvd", seed=0, targets=["2"])
    # CNN1D's only Linear is its head: the default targets would adapt nothing.
    with pytest.raises(ValueError, match=r"has 1 Linear layer\(s\); .* pass targets= explicitly"):
        add_lora(CNN1D(40, 10), 2, 2, "fedsvd", seed=0)
    plain = nn.Sequential(nn.Linear(40, 6), nn.ReLU(), nn.Linear(6, 10))
    with pytest.raises(ValueError, match=r"lora rank=8 for a 40->6 Linear; allowed: 1 <= rank <= 6"):
        add_lora(plain, 8, 8, "fedsvd", seed=0)
    assert isinstance(plain[0], nn.Linear) and not any(isinstance(m, LoRALinear) for m in plain.modules())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(mlp(), RANK, RANK, "fedsvd", seed=0)


# --------------------------------------------------------------------------- messaging


def test_lora_state_round_trip_and_upload_size():
    gen = torch.Generator().manual_seed(2)
    sender, receiver = mlp(), mlp()
    load_lora_state(sender, random_b(sender, gen))
    up = lora_state(sender, which=("B",))
    assert sorted(up) == ["1.B", "3.B"]
    # bytes_up = 4·Σ_layers d_out·r (§7 "Upload size"): float32 B's only.
    assert all(v.dtype == torch.float32 for v in up.values())
    assert sum(4 * v.numel() for v in up.values()) == 4 * (64 + 48) * RANK
    load_lora_state(receiver, {k: v.numpy() for k, v in lora_state(sender).items()})
    for key, value in lora_state(sender).items():
        assert torch.equal(lora_state(receiver)[key], value)
    x = torch.randn(4, 40)
    assert torch.equal(receiver(x), sender(x))


def test_load_lora_state_refuses_partial_or_mismatched_states():
    model = mlp()
    state = lora_state(model)
    with pytest.raises(ValueError, match=r"has B for \['1'\] but not for \['3'\]"):
        load_lora_state(model, {"1.B": state["1.B"]})
    with pytest.raises(ValueError, match=r"'1.B' has shape \(8, 64\), expected \(64, 8\)"):
        load_lora_state(model, {**state, "1.B": state["1.B"].T})
    with pytest.raises(ValueError, match="no adapted layer '5'"):
        load_lora_state(model, {**state, "5.B": torch.zeros(10, RANK)})
    with pytest.raises(ValueError, match="is not '<layer>.A' or '<layer>.B'"):
        load_lora_state(model, {"1.lora_B.weight": state["1.B"]})


def test_aggregate_is_the_num_examples_weighted_mean():
    gen = torch.Generator().manual_seed(3)
    model = mlp()
    states = [random_b(model, gen) for _ in range(3)]
    n = [120, 45, 300]
    agg = aggregate_lora(states, n)
    for key in states[0]:
        expected = sum(nk * s[key].double() for nk, s in zip(n, states, strict=True)) / sum(n)
        np.testing.assert_allclose(agg[key].numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"client 1 sent LoRA keys \['1.B'\], client 0 sent \['1.B', '3.B'\]"):
        aggregate_lora([states[0], {"1.B": states[1]["1.B"]}], n[:2])


def test_svd_due_follows_period_and_warmup():
    assert [svd_due(r, 1) for r in (1, 2, 3)] == [True, True, True]
    assert [svd_due(r, 2) for r in (1, 2, 3, 4)] == [False, True, False, True]
    assert [svd_due(r, 1, warmup=2) for r in (1, 2, 3)] == [False, False, True]
    assert not any(svd_due(r, 0) for r in range(1, 10))  # FFA-LoRA: never


# --------------------------------------------------------------------------- re-factorization


@pytest.mark.parametrize("solver", ["qr", "randomized"])
@pytest.mark.parametrize(("d_out", "d_in"), [(64, 40), (20, 96), (8, 8)])
def test_refactorize_is_exact_and_orthonormal(solver, d_out, d_in):
    gen = torch.Generator().manual_seed(d_out * d_in)
    b = torch.randn(d_out, RANK, generator=gen)
    a = initial_a(RANK, d_in, SEED, 0)
    b_new, a_new = refactorize(b, a, solver=solver)
    assert b_new.dtype == a_new.dtype == torch.float32
    assert (b_new.shape, a_new.shape) == (b.shape, a.shape)
    assert orthonormality_error(a_new) <= 1e-5
    assert reconstruction_error(b, a, b_new, a_new) <= 1e-5
    # Canonical sign: each row of Â has a positive largest-magnitude entry.
    assert bool((a_new.gather(1, a_new.abs().argmax(1, keepdim=True)) > 0).all())


def test_qr_route_matches_the_full_svd_of_m():
    gen = torch.Generator().manual_seed(4)
    b, a = torch.randn(64, RANK, generator=gen), initial_a(RANK, 40, SEED, 0)
    b_new, a_new = refactorize(b, a)
    u, sigma, vh = torch.linalg.svd(b.double() @ a.double())
    # B̂ = U_r Σ_r: its column norms are the singular values of M.
    np.testing.assert_allclose(b_new.double().norm(dim=0).numpy(), sigma[:RANK].numpy(), rtol=1e-5)
    assert float(sigma[RANK] / sigma[0]) < 1e-12  # M has rank r, nothing is lost
    # Same singular vectors up to one sign per pair (σ's are distinct here).
    sign = torch.sign((a_new.double() * vh[:RANK]).sum(1))
    np.testing.assert_allclose(a_new.double().numpy(), (sign[:, None] * vh[:RANK]).numpy(), atol=1e-5)
    np.testing.assert_allclose(b_new.double().numpy(), (u[:, :RANK] * sigma[:RANK] * sign).numpy(), atol=1e-4)


def test_rank_deficient_b_keeps_exactness_and_orthonormality():
    gen = torch.Generator().manual_seed(5)
    a = initial_a(RANK, 40, SEED, 0)
    # Rank 3 < r: five singular values vanish; their Â rows are completed from the old A.
    b = torch.randn(64, 3, generator=gen) @ torch.randn(3, RANK, generator=gen)
    b_new, a_new = refactorize(b, a)
    assert orthonormality_error(a_new) <= 1e-5
    assert reconstruction_error(b, a, b_new, a_new) <= 1e-5
    assert torch.count_nonzero(b_new[:, 3:]) == 0 and bool((b_new[:, :3].norm(dim=0) > 0).all())
    # B = 0 (a layer that did not move): B̂ = 0 and Â spans the old A's row space.
    b_new, a_new = refactorize(torch.zeros(64, RANK), a)
    assert torch.count_nonzero(b_new) == 0
    assert orthonormality_error(a_new) <= 1e-5
    projected = (a.double() @ a_new.double().T) @ a_new.double()
    assert rel(projected, a) <= 1e-5
    # Even a degenerate old A still yields r orthonormal rows (standard-basis fallback).
    _, a_new = refactorize(torch.zeros(64, RANK), torch.zeros(RANK, 40))
    assert orthonormality_error(a_new) <= 1e-5


@pytest.mark.parametrize("alpha", [RANK, 16.0])
def test_svd_step_leaves_model_outputs_unchanged(alpha):
    gen = torch.Generator().manual_seed(6)
    model = mlp(alpha=alpha)
    state = {**lora_state(model, which=("A",)), **random_b(model, gen)}
    state["3.B"] = torch.zeros_like(state["3.B"])  # one layer with B = 0
    load_lora_state(model, state)
    x = torch.randn(32, 40, generator=gen)
    before = model(x).detach()
    new_state = refactorize_state(state)
    assert sorted(new_state) == sorted(state)
    load_lora_state(model, new_state)
    assert rel(model(x).detach(), before) <= 1e-5
    for name, layer in lora_layers(model):
        assert orthonormality_error(layer.A) <= 1e-5
        assert reconstruction_error(state[f"{name}.B"], state[f"{name}.A"], layer.B, layer.A) <= 1e-5


def test_same_seed_gives_the_same_a_sequence():
    def a_sequence(solver: str) -> list[torch.Tensor]:
        model = mlp()
        gen = torch.Generator().manual_seed(8)
        sequence = []
        for _ in range(3):
            state = {**lora_state(model, which=("A",)), **random_b(model, gen)}
            load_lora_state(model, refactorize_state(state, solver=solver, seed=SEED))
            sequence.append(lora_state(model, which=("A",))["1.A"])
        return sequence

    for solver in ("qr", "randomized"):
        first, second = a_sequence(solver), a_sequence(solver)
        assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
        assert not torch.equal(first[0], first[1])


# --------------------------------------------------------------------------- local training


@pytest.mark.parametrize("method", ["fedsvd", "ffa-lora", "fedavg-lora"])
def test_local_training_moves_only_the_trained_factors(method):
    model = mlp(method=method)
    gen = torch.Generator().manual_seed(9)
    x, y = torch.randn(64, 40, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local_sgd(model, x, y, epochs=1, batch_size=16, lr=0.5, seed=SEED)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    trained = {"lora_B"} if method != "fedavg-lora" else {"lora_A", "lora_B"}
    assert moved == {f"{layer}.{factor}.weight" for layer in ("1", "3") for factor in trained}
