"""FedMUD tensor math (Li et al., ICML 2025, arXiv 2505.23176): invariants of spec §7."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedlr.lowrank.mud import (
    LayerSpec,
    MUDConv1d,
    MUDConv2d,
    MUDLinear,
    aggregate_factors,
    aggregation_error,
    bkd_sizing,
    decompose_model,
    delta_from_factors,
    frozen_factor,
    layer_specs,
    load_model_factors,
    lowrank_rank,
    merge_round,
    model_deltas,
    model_factors,
    mud_layers,
    reset_round,
    update_gain,
)

PATTERNS = [(d, a) for d in ("lowrank", "bkd") for a in ("naive", "aad")]
SEED = 7
REPO = Path(__file__).resolve().parents[1]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def random_factors(spec: LayerSpec, gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: scale * torch.randn(shape, generator=gen) for k, shape in spec.factor_shapes.items()}


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    # NumPy's check: torch.testing's first call costs ~1 s of lazy imports.
    np.testing.assert_allclose(np.asarray(actual.detach()), np.asarray(expected), rtol=rtol, atol=atol)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Layers of each supported type, with their input.
LAYERS = {
    "linear": (lambda: nn.Linear(24, 18), MUDLinear, torch.randn(5, 24)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5, padding=2, stride=2), MUDConv1d, torch.randn(3, 4, 20)),
    "conv2d": (lambda: nn.Conv2d(3, 8, (3, 2), padding=1, dilation=2), MUDConv2d, torch.randn(2, 3, 9, 9)),
}


def wrapped(kind: str, decomposition: str, aggregation: str, ratio: float = 0.25):
    make, cls, x = LAYERS[kind]
    torch.manual_seed(1)
    dense = make()
    spec = LayerSpec(tuple(dense.weight.shape), decomposition, aggregation, ratio, init_scale=0.5)
    return dense, cls(copy.deepcopy(dense), spec), x


# --------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    ("shape", "ratio", "r_b", "s", "trainable", "plain_rank"),
    [((256, 256), 1 / 32, 16, 8, 2048, 8), ((256, 40), 1 / 32, 3, 8, 384, 4), ((128, 128), 1 / 8, 64, 4, 2048, 16)],
)
def test_bkd_worked_examples(shape, ratio, r_b, s, trainable, plain_rank):
    numel = shape[0] * shape[1]
    assert bkd_sizing(numel, ratio) == (r_b, s)
    assert r_b * s**4 >= numel
    spec = LayerSpec(shape, "bkd", "aad", ratio, 5.0)
    assert spec.factor_shapes == {"left": (r_b, s, s), "right": (r_b, s, s)}
    assert spec.num_trainable == trainable == 2 * r_b * s * s
    assert 2 * lowrank_rank(*shape, ratio) == plain_rank


def test_lowrank_sizing_and_conv_views():
    assert lowrank_rank(256, 256, 1 / 32) == 4
    assert lowrank_rank(10, 256, 1e-4) == 1
    assert LayerSpec((256, 40), "lowrank", "aad", 1 / 32, 1.0).factor_shapes == {"left": (256, 2), "right": (2, 40)}
    # Conv2d (out, in, kh, kw) -> (out*kh) x (in*kw); Conv1d (out, in, k) -> out x (in*k).
    assert LayerSpec((8, 3, 3, 2), "lowrank", "aad", 0.25, 1.0).factor_shapes == {"left": (24, 2), "right": (2, 6)}
    assert LayerSpec((6, 4, 5), "lowrank", "aad", 0.25, 1.0).factor_shapes == {"left": (6, 2), "right": (2, 20)}


def test_invalid_options_are_named():
    with pytest.raises(ValueError, match=r"fedmud.decomposition='svd'; allowed: lowrank, bkd"):
        LayerSpec((4, 4), "svd", "aad", 0.5, 1.0)
    with pytest.raises(ValueError, match="target='weight' needs decomposition='lowrank'"):
        LayerSpec((4, 4), "bkd", "naive", 0.5, 1.0, target="weight")


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("aggregation", ["naive", "aad"])
def test_bkd_delta_is_truncated_concatenation_of_kron_blocks(aggregation):
    shape = (8, 3, 3, 3)  # N = 216; r_b = 2, s = 4: 512 entries, so truncation matters
    spec = LayerSpec(shape, "bkd", aggregation, 0.25, 2.0)
    gen = torch.Generator().manual_seed(0)
    theta = random_factors(spec, gen)
    a, b = theta["left"].double().numpy(), theta["right"].double().numpy()
    if aggregation == "aad":
        fa, fb = (
            frozen_factor(spec.factor_shapes[k], SEED, 3, 1, term, 2.0).double().numpy() for term, k in enumerate(theta)
        )
        blocks = [np.kron(fa[j], b[j]) + np.kron(a[j], fb[j]) for j in range(len(a))]
    else:
        blocks = [np.kron(a[j], b[j]) for j in range(len(a))]
    expected = np.concatenate([blk.reshape(-1) for blk in blocks])[:216].reshape(shape)
    got = delta_from_factors(spec, theta, SEED, 3, 1)
    assert_close(got, expected, atol=1e-5)


def test_lowrank_delta_is_reshaped_matrix_product():
    spec = LayerSpec((8, 3, 3, 3), "lowrank", "naive", 0.25, 1.0)
    theta = random_factors(spec, torch.Generator().manual_seed(0))
    expected = (theta["left"] @ theta["right"]).reshape(8, 3, 3, 3)
    assert_close(delta_from_factors(spec, theta, SEED, 0, 0), expected)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("decomposition", "aggregation"), PATTERNS)
def test_zero_start_and_dense_equivalence(kind, decomposition, aggregation):
    dense, layer, x = wrapped(kind, decomposition, aggregation)
    layer.reset_factors(SEED, 1, 0)
    assert torch.count_nonzero(layer.delta_w()) == 0
    assert_close(layer(x), dense(x).detach())
    # Only the factors and the bias train; W is a buffer and frozen factors never travel.
    assert {n for n, p in layer.named_parameters()} == {"left", "right", "bias"}
    assert set(layer.state_dict()) == {"weight", "left", "right", "bias"}
    assert set(layer.trainable_factors()) == {"left", "right"}
    # A gradient step moves ΔW off zero (no dead zero-initialized pattern).
    layer(x).square().sum().backward()
    assert layer.right.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize(("decomposition", "aggregation"), PATTERNS)
def test_forward_uses_w_plus_delta_and_server_rebuild_matches(kind, decomposition, aggregation):
    dense, layer, x = wrapped(kind, decomposition, aggregation)
    layer.reset_factors(SEED, 4, 2)
    theta = random_factors(layer.spec, torch.Generator().manual_seed(1), scale=0.1)
    layer.load_trainable_factors(theta)
    delta = layer.delta_w()
    assert torch.equal(delta, delta_from_factors(layer.spec, theta, SEED, 4, 2))
    with torch.no_grad():
        dense.weight += delta
    assert_close(layer(x), dense(x).detach(), atol=1e-5)


def test_reset_draws_naive_left_and_aad_frozen_from_the_seed():
    _, naive, _ = wrapped("linear", "bkd", "naive")
    _, aad, _ = wrapped("linear", "bkd", "aad")
    naive.reset_factors(SEED, 2, 5)
    aad.reset_factors(SEED, 2, 5)
    shapes = naive.spec.factor_shapes
    assert torch.equal(naive.left, frozen_factor(shapes["left"], SEED, 2, 5, 0, 0.5))
    assert torch.equal(aad.left_frozen, frozen_factor(shapes["left"], SEED, 2, 5, 0, 0.5))
    assert torch.equal(aad.right_frozen, frozen_factor(shapes["right"], SEED, 2, 5, 1, 0.5))
    assert torch.count_nonzero(aad.left) == torch.count_nonzero(aad.right) == torch.count_nonzero(naive.right) == 0


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("decomposition", ["lowrank", "bkd"])
def test_aad_averages_updates_exactly_and_naive_does_not(decomposition):
    gen = torch.Generator().manual_seed(3)
    weights = [120.0, 45.0, 300.0, 7.0]
    errors = {}
    for aggregation in ("naive", "aad"):
        spec = LayerSpec((256, 40), decomposition, aggregation, 1 / 8, 5.0)
        thetas = [random_factors(spec, gen) for _ in weights]
        applied = {"fc": delta_from_factors(spec, aggregate_factors(thetas, weights), SEED, 9, 0)}
        clients = [{"fc": delta_from_factors(spec, t, SEED, 9, 0)} for t in thetas]
        errors[aggregation] = aggregation_error(applied, clients, weights)
    assert errors["aad"] <= 1e-6
    assert errors["naive"] > 0.5


def test_aggregate_factors_is_normalized_weighted_mean():
    dicts = [{"x": torch.tensor([1.0, 0.0])}, {"x": np.array([0.0, 4.0], dtype=np.float32)}]
    assert_close(aggregate_factors(dicts, [3, 1])["x"], [0.75, 1.0])
    with pytest.raises(ValueError, match="must sum to a positive number"):
        aggregate_factors(dicts, [0, 0])


# --------------------------------------------------------------------------- rank


def test_bkd_reaches_full_rank_where_matrix_aad_is_capped_at_2r():
    gen = torch.Generator().manual_seed(5)
    bkd = LayerSpec((256, 256), "bkd", "aad", 1 / 32, 5.0)
    low = LayerSpec((256, 256), "lowrank", "aad", 1 / 32, 5.0)
    assert low.num_trainable <= bkd.num_trainable  # equal budget (2,048 each)
    r = low.factor_shapes["left"][1]
    # float32 ΔW: the default tolerance is float32's, so rounding noise is not counted as rank.
    rank_bkd = torch.linalg.matrix_rank(delta_from_factors(bkd, random_factors(bkd, gen), SEED, 1, 0))
    rank_low = torch.linalg.matrix_rank(delta_from_factors(low, random_factors(low, gen), SEED, 1, 0))
    assert rank_bkd == 256
    assert rank_low == 2 * r == 8


# --------------------------------------------------------------------------- seeds


def test_frozen_factors_are_keyed_and_bit_identical_across_processes():
    args = ((16, 8, 8), 2024, 3, 1, 0, 5.0)
    first = frozen_factor(*args)
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(first, frozen_factor(*args))
    assert float(first.abs().max()) <= 5.0
    for changed in ((16, 8, 8), 2025, 3, 1, 0, 5.0), ((16, 8, 8), 2024, 4, 1, 0, 5.0), ((16, 8, 8), 2024, 3, 1, 1, 5.0):
        assert not torch.equal(first, frozen_factor(*changed))
    code = f"from fedlr.lowrank.mud import frozen_factor; print(frozen_factor{args!r}.numpy().tobytes().hex())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first.numpy().tobytes().hex()


# --------------------------------------------------------------------------- model level


def test_merge_then_reset_keeps_the_function():
    model = decompose_model(mlp(), "bkd", "aad", 1 / 32, 5.0)
    x = torch.randn(16, 40)
    reset_round(model, SEED, 1)
    gen = torch.Generator().manual_seed(2)
    load_model_factors(model, {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in model_factors(model).items()})
    before = model(x)
    merge_round(model)
    assert_close(model(x), before.detach(), atol=1e-5)
    reset_round(model, SEED, 2)
    assert_close(model(x), before.detach(), atol=1e-5)


@pytest.mark.parametrize(("decomposition", "aggregation"), PATTERNS)
def test_client_catch_up_equals_server_model(decomposition, aggregation):
    server = decompose_model(mlp(), decomposition, aggregation, 1 / 32, 5.0)
    client = copy.deepcopy(server)
    specs = layer_specs(server)
    weights = {name: layer.weight.clone() for name, layer in mud_layers(server)}
    gen = torch.Generator().manual_seed(4)
    history = {}
    for t in (1, 2, 3):  # server: W_{t+1} = W_t + ΔW(θ̄_t; σ_t) on plain arrays
        history[t] = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in model_factors(server).items()}
        for name, delta in model_deltas(specs, history[t], SEED, t).items():
            weights[name] += delta
    for t in (1, 2, 3):  # a client that missed rounds 1-3 replays them with their own seeds
        reset_round(client, SEED, t)
        load_model_factors(client, history[t])
        merge_round(client)
    for name, layer in mud_layers(client):
        assert_close(layer.weight, weights[name], rtol=0)
    if aggregation == "aad":  # merging with the wrong round's frozen factors is a different model
        wrong = model_deltas(specs, history[1], SEED, 2)["2"]
        assert rel(wrong, model_deltas(specs, history[1], SEED, 1)["2"]) > 0.5


@pytest.mark.parametrize(("decomposition", "aggregation"), PATTERNS)
def test_ratio_forcing_reaches_budget(decomposition, aggregation):
    dense_params = sum(p.numel() for p in mlp().parameters())
    model = decompose_model(mlp(), decomposition, aggregation, 1 / 32, 5.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.mud_realized_ratio == trainable / dense_params <= 1 / 32 + 0.001
    assert 0 < model.mud_internal_ratio <= 1 / 32
    assert [name for name, _ in mud_layers(model)] == ["0", "2", "4"]


def test_ratio_forcing_lowers_the_internal_ratio_when_ceilings_overshoot():
    # Unforced BKD at 1/32 gives 384 + 2048 + 128 factor entries + 522 biases = 3.9%.
    model = decompose_model(mlp(), "bkd", "aad", 1 / 32, 5.0)
    assert model.mud_internal_ratio < 1 / 32 - 0.005


def test_dense_parts_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fedmud.ratio=0.03125 is unreachable: the dense parts alone .* are 0.1689"):
        decompose_model(mlp(), "bkd", "aad", 1 / 32, 5.0, skip=(1, 1))
    model = decompose_model(mlp(), "bkd", "aad", 1 / 4, 5.0, skip=(1, 1))
    assert [name for name, _ in mud_layers(model)] == ["2"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[4], nn.Linear)


def test_decompose_walks_custom_modules_not_only_sequential():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.ModuleDict({"conv": nn.Conv1d(1, 8, 5), "conv2": nn.Conv2d(1, 2, 3)})
            self.head = nn.Linear(8 * 36, 10)

    net = decompose_model(Net(), "bkd", "aad", 1 / 2, 5.0)
    kinds = {name: type(layer) for name, layer in mud_layers(net)}
    assert kinds == {"features.conv": MUDConv1d, "features.conv2": MUDConv2d, "head": MUDLinear}


def test_weight_target_is_a_rank_limited_model():
    model = decompose_model(mlp(), "lowrank", "naive", 1 / 32, 5.0, target="weight")
    x = torch.randn(8, 40)
    _, hidden = mud_layers(model)[1]
    r = hidden.spec.factor_shapes["left"][1]
    assert hidden.weight is None and hidden.left.requires_grad and hidden.right.requires_grad
    assert torch.linalg.matrix_rank(hidden.effective_weight().detach()) == r
    assert model.mud_realized_ratio <= 1 / 32 + 0.001
    model(x).square().sum().backward()
    assert hidden.left.grad.abs().sum() > 0 and hidden.right.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="target='weight' factors persist across rounds"):
        reset_round(model, SEED, 1)


# --------------------------------------------------------------------------- LDP gain


def _operator_norm(layer: MUDLinear, iterations: int = 200) -> float:
    """‖θ ↦ ΔW(θ)‖ by power iteration on the (linear, for AAD) map, through autograd."""
    gen = torch.Generator().manual_seed(0)
    theta = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in layer.trainable_factors().items()}
    frozen = {"left": layer.left_frozen.double(), "right": layer.right_frozen.double()}
    from fedlr.lowrank.mud import _delta

    value = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum(t.square().sum() for t in theta.values()))
        theta = {k: (t / norm).requires_grad_(True) for k, t in theta.items()}
        delta = _delta(layer.spec, theta, frozen)
        value = float(delta.detach().norm())
        grads = torch.autograd.grad(0.5 * delta.square().sum(), list(theta.values()))  # Φᵀ Φ θ
        theta = {k: g.detach() for k, g in zip(theta, grads, strict=True)}
    return value


@pytest.mark.parametrize("decomposition", ["lowrank", "bkd"])
def test_update_gain_bounds_delta_w_within_a_factor_root_two(decomposition):
    """‖ΔW(θ)‖ ≤ L‖θ‖ for every θ (what LDP clipping in ΔW units relies on), and
    L is at most √2 above the exact operator norm (Cauchy–Schwarz over two terms)."""
    layer = MUDLinear(nn.Linear(40, 96), LayerSpec((96, 40), decomposition, "aad", 1 / 8, init_scale=5.0))
    layer.reset_factors(SEED, 3, 1)
    gain = update_gain(layer)
    exact = _operator_norm(layer)
    assert exact <= gain * (1 + 1e-6)
    assert exact >= gain / math.sqrt(2) * (1 - 1e-6)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        theta = random_factors(layer.spec, gen)
        norm = math.sqrt(sum(float(t.square().sum()) for t in theta.values()))
        assert float(delta_from_factors(layer.spec, theta, SEED, 3, 1).norm()) <= gain * norm * (1 + 1e-5)


def test_update_gain_of_naive_is_the_norm_of_the_drawn_left_factor():
    """naive: ΔW = (U₀+a)(0+b) ≈ U₀ b to first order, so L = ‖U₀‖₂."""
    layer = MUDLinear(nn.Linear(40, 96), LayerSpec((96, 40), "lowrank", "naive", 1 / 8, init_scale=5.0))
    layer.reset_factors(SEED, 3, 1)
    assert update_gain(layer) == pytest.approx(float(torch.linalg.matrix_norm(layer.left.double(), ord=2)))
