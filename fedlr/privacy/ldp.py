"""Layer-wise local differential privacy on model updates (FedRE): pure math, free of Flower.

Reference: T. Xiao, Y. Li, Y. Zhou et al., *FedRE: Robust and Effective
Federated Learning with Privacy Preference*, arXiv 2505.04889. The paper's
full text was not available: apart from what its abstract states (LDP on the
uploaded gradients, less budget for layers carrying more privacy-sensitive
information, an aggregation that accounts for the perturbation), every formula
here is fedlr's own formalization in ``shared/specs/fedre.md``, whose sections
(§) and equations this module cites. It is not a faithful re-implementation.

A release (§2) is one client's perturbed update ũ_k = u_k + noise, u_k being
everything the client uploads minus its value at the start of the round, for
any update codec (dense ΔW, FedMUD factors, LoRA factors). A *layer* is one
parametrized module of the plain network (weight plus bias); an upload entry
belongs to the layer whose module name is its longest dotted prefix
(:func:`layer_resolver`), so ``net.1.weight``, FedMUD's ``net.1.left`` and
LoRA's ``net.1.B`` all belong to layer ``net.1``.

Pipeline of one release (§3–§5), then the server (§6–§7):

1. :func:`psi_scores`: per-layer privacy-sensitive information of the
   client's sensitive-feature mask, on the public calibration split (§4).
2. :func:`release_budgets` (:func:`allocation_weights`, :func:`layer_budgets`):
   split the per-release budget ε_k over the layers, less to higher PSI (§5).
3. :func:`privatize_update`: clip each layer and add Gaussian (analytic
   Gaussian mechanism) or Laplace noise calibrated to its budget (§5).
4. :func:`noise_variance`, :func:`aggregation_weights`: the server recomputes
   each release's per-coordinate noise variance from the public budgets and
   weights the clients per layer by n_k/(v_{k,l} + τ_l²) (§6).
5. :class:`LDPLedger`: basic composition across layers and rounds (§7).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import log_ndtr, ndtr
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedlr.config import LDP_MASKS, Config
from fedlr.models import build_model
from fedlr.training import derive_seed

__all__ = [
    "ALLOCATIONS",
    "NOISES",
    "LDPLedger",
    "LayerBudget",
    "LayerRelease",
    "PrivacyPreference",
    "aggregate_noise_variance",
    "aggregation_weights",
    "allocation_weights",
    "analytic_gaussian_delta",
    "analytic_gaussian_sigma",
    "client_preference",
    "estimate_tau2",
    "group_by_layer",
    "layer_bound",
    "layer_budgets",
    "layer_resolver",
    "mask_families",
    "network_layer_of",
    "noise_variance",
    "parametrized_layers",
    "privatize_update",
    "psi_scores",
    "public_indices",
    "release_budgets",
    "sensitive_mask",
    "trained_layers",
]

ALLOCATIONS = ("uniform", "sensitivity")
NOISES = ("gaussian", "laplace")
# §5: a sensitivity weight never drops below FLOOR_FRACTION / L.
FLOOR_FRACTION = 0.1
# §4: the public calibration split is this fraction of the training set.
PUBLIC_FRACTION = 0.05
# Seed streams under the run seed (cf. strategies.base.SAMPLING_STREAM, clients.trainer.TRAIN_STREAM).
NOISE_STREAM, PREFERENCE_STREAM, PUBLIC_STREAM = 11, 12, 13
_TIER_ATTRIBUTE, _MASK_ATTRIBUTE = 0, 1


# ----------------------------------------------------------------------------- layers (§2)


def parametrized_layers(model: nn.Module) -> tuple[str, ...]:
    """Names of the modules that own parameters directly: the layers of §2 "Layers".

    Call it on the *plain* network (``fedlr.models.build_model``): its layer
    names are what every codec's keys start with.
    """
    return tuple(
        name for name, module in model.named_modules() if name and next(module.parameters(False), None) is not None
    )


def layer_resolver(layers: Iterable[str]) -> Callable[[str], str]:
    """``layer_of(key)``: the layer whose name is the longest dotted prefix of ``key``.

    Parameters
    ----------
    layers
        Layer names, e.g. :func:`parametrized_layers` of the plain network.

    Returns
    -------
    Callable[[str], str]
        Maps ``"net.1.weight"``, ``"net.1.left"`` (FedMUD), ``"net.1.B"`` and
        ``"net.1.lora_B.weight"`` (LoRA) to ``"net.1"``; raises ``KeyError``
        for a key under no layer, since an entry without a layer would travel
        without noise.
    """
    names = frozenset(layers)

    def layer_of(key: str) -> str:
        parts = key.split(".")
        for end in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in names:
                return prefix
        raise KeyError(f"{key!r} belongs to no layer; layers: {', '.join(sorted(names))}")

    return layer_of


@functools.lru_cache(maxsize=8)
def _network_layer_of(
    model: str, norm: str, width: int, seed: int, input_shape: tuple[int, ...], num_classes: int
) -> Callable[[str], str]:
    cfg = {"model": model, "norm": norm, "width": width, "seed": seed}
    return layer_resolver(parametrized_layers(build_model(cfg, input_shape, num_classes)))


def network_layer_of(cfg: Config, input_shape: Sequence[int], num_classes: int) -> Callable[[str], str]:
    """``layer_of`` for the layers of ``cfg``'s plain network, shared by clients and server (memoised)."""
    return _network_layer_of(cfg["model"], cfg["norm"], cfg["width"], cfg["seed"], tuple(input_shape), num_classes)


def group_by_layer(keys: Iterable[str], layer_of: Callable[[str], str]) -> dict[str, list[str]]:
    """Keys grouped by layer, layers in order of first appearance (the order of every per-layer list)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(layer_of(key), []).append(key)
    return groups


# ----------------------------------------------------------------------- preferences (§3)


@dataclass(frozen=True)
class PrivacyPreference:
    """One client's privacy preference (§3): budget multiplier m_k and mask family."""

    multiplier: float
    mask: str


def mask_families(input_shape: Sequence[int]) -> tuple[str, ...]:
    """The sensitive-feature mask families for inputs of ``input_shape`` (channels first, §3)."""
    if len(input_shape) - 1 in LDP_MASKS:
        return LDP_MASKS[len(input_shape) - 1]
    raise ValueError(f"no sensitive-feature masks for input shape {tuple(input_shape)}; need (C, L) or (C, H, W)")


def sensitive_mask(family: str, input_shape: Sequence[int]) -> Tensor:
    """M ∈ {0, 1}^{input_shape} of a mask family (§3), as a float tensor.

    1-D (C, L): ``w0``, ``w1``, ``w2`` are the thirds [0, L/3), [L/3, 2L/3),
    [2L/3, L) with rounded bounds (for L = 40: [0, 13), [13, 27), [27, 40)).
    2-D (C, H, W): ``center`` is the central H/2 × W/2 block, ``left`` the
    left half of the columns, ``top`` the top H/4 rows (for 8×8 digits: the
    central 4×4, the left four columns, the top two rows). Every channel alike.
    """
    families = mask_families(input_shape)
    if family not in families:
        raise ValueError(
            f"mask {family!r} is not defined for input shape {tuple(input_shape)}; allowed: {', '.join(families)}"
        )
    mask = torch.zeros(tuple(input_shape))
    if len(input_shape) == 2:
        length = input_shape[1]
        third = families.index(family)
        mask[:, round(third * length / 3) : round((third + 1) * length / 3)] = 1.0
    else:
        h, w = input_shape[1:]
        if family == "center":
            mask[:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
        elif family == "left":
            mask[:, :, : w // 2] = 1.0
        else:
            mask[:, : max(1, h // 4), :] = 1.0
    return mask


def client_preference(
    seed: int, partition_id: int, num_clients: int, tiers: Sequence[float], masks: Sequence[str]
) -> PrivacyPreference:
    """Client k's preference, a seeded draw from the run seed (§3).

    Each attribute is dealt round-robin over a seeded permutation of the
    clients, so the tiers and the mask families are balanced (``"1,0.25"``
    makes exactly half the clients, up to one, 4× stricter) and the two
    attributes are independent. Server and client compute the same value; the
    budgets it implies are public anyway (§4 "Why the public split").
    """
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"partition_id {partition_id} is not in 0..{num_clients - 1}")

    def dealt(attribute: int, values: Sequence[Any]) -> Any:
        order = np.random.default_rng(derive_seed(seed, PREFERENCE_STREAM, attribute)).permutation(num_clients)
        return values[int(np.flatnonzero(order == partition_id)[0]) % len(values)]

    return PrivacyPreference(multiplier=float(dealt(_TIER_ATTRIBUTE, tiers)), mask=str(dealt(_MASK_ATTRIBUTE, masks)))


def public_indices(num_train: int, seed: int) -> np.ndarray:
    """Training-set indices of the public calibration split P, 5% of it (§1, §4), sorted.

    P is public: clients and the server may all hold it, and PSI computed on it
    depends on no client's private data.
    """
    size = max(1, round(PUBLIC_FRACTION * num_train))
    rng = np.random.default_rng(derive_seed(seed, PUBLIC_STREAM))
    return np.sort(rng.choice(num_train, size=size, replace=False))


# ------------------------------------------------------------------------------- PSI (§4)


def psi_scores(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    layer_of: Callable[[str], str],
    chunk_size: int = 128,
) -> dict[str, float]:
    """Per-layer privacy-sensitive information of a mask (§4):

    PSI_l = mean over x ∈ P of ‖g_l(x) − g_l(x ⊙ (1 − M))‖ / (‖g_l(x)‖ + ‖g_l(x ⊙ (1 − M))‖),

    g_l(x) being the per-sample gradient of the cross-entropy with respect to
    the *trainable* parameters of layer l (what the client will release).

    Parameters
    ----------
    model
        The current global model as the client trains it (any codec); left unchanged.
    x, y
        The public calibration split P (inputs and labels).
    mask
        M, broadcastable to one input (:func:`sensitive_mask`).
    layer_of
        Parameter name → layer (:func:`layer_resolver`).
    chunk_size
        Samples per vectorized per-sample-gradient batch (memory bound only).

    Returns
    -------
    dict[str, float]
        Layer → PSI ∈ [0, 1] (triangle inequality); 0 for every layer when M = 0.
        A sample whose two gradients are both zero contributes 0.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    buffers = dict(model.named_buffers())
    groups = group_by_layer(params, layer_of)

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    keep = (1.0 - mask).to(x)
    totals = dict.fromkeys(groups, 0.0)
    for start in range(0, len(y), chunk_size):
        xs, ys = x[start : start + chunk_size], y[start : start + chunk_size]
        full, masked = per_sample(params, xs, ys), per_sample(params, xs * keep, ys)
        for layer, keys in groups.items():
            a = torch.cat([full[k].flatten(1) for k in keys], 1)
            b = torch.cat([masked[k].flatten(1) for k in keys], 1)
            denominator = a.norm(dim=1) + b.norm(dim=1)
            ratio = torch.where(denominator > 0, (a - b).norm(dim=1) / denominator.clamp_min(1e-30), 0.0)
            totals[layer] += float(ratio.sum())
    return {layer: total / len(y) for layer, total in totals.items()}


# -------------------------------------------------------------------- budget split (§5)


def allocation_weights(psi: Sequence[float], allocation: str, beta: float = 4.0) -> np.ndarray:
    """Allocation weights w_l (Σ w_l = 1) of the per-release budget (§5).

    ``uniform``: w_l = 1/L. ``sensitivity``: w_l ∝ exp(−β·PSI_l) (a softmax of
    −β·PSI), then the floor w_l ≥ 0.1/L. The floor is applied as a projection:
    floored layers sit exactly at 0.1/L and the others are rescaled to fill
    the rest, repeated until none is below, so Σ w_l = 1 *and* every floor
    holds (a single clamp-then-renormalize can push a floored weight back under
    it). Rescaling by one factor keeps the order: a higher PSI gets a strictly
    smaller weight unless both sit at the floor.
    """
    scores = np.asarray(psi, dtype=np.float64)
    count = len(scores)
    if count == 0:
        raise ValueError("no layers to allocate a budget to")
    if allocation == "uniform":
        return np.full(count, 1.0 / count)
    if allocation != "sensitivity":
        raise ValueError(f"allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    logits = -beta * scores
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    floor = FLOOR_FRACTION / count
    floored = np.zeros(count, dtype=bool)
    while True:
        below = ~floored & (weights < floor)
        if not below.any():
            return weights
        floored |= below
        free = ~floored
        weights[floored] = floor
        weights[free] *= (1.0 - floor * floored.sum()) / weights[free].sum()


@dataclass(frozen=True)
class LayerBudget:
    """One layer's share (ε_{k,l}, δ_{k,l}) of a release's budget (§5); δ = 0 for Laplace."""

    epsilon: float
    delta: float


def layer_budgets(weights: Sequence[float], epsilon: float, delta: float, noise: str) -> list[LayerBudget]:
    """(ε_{k,l}, δ_{k,l}) = (w_l·ε_k, w_l·δ) for Gaussian, (w_l·ε_k, 0) for Laplace (§5).

    By basic composition (Dwork & Roth, *The Algorithmic Foundations of
    Differential Privacy*, 2014, Thm. 3.16) the release of all layers is
    (Σ_l ε_{k,l}, Σ_l δ_{k,l}) = (ε_k, δ)-LDP, or ε_k-LDP for Laplace (§7).
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon = {epsilon}: must be > 0")
    if noise == "gaussian" and not 0 < delta < 1:
        raise ValueError(f"delta = {delta}: must be in (0, 1) for Gaussian noise")
    if noise not in NOISES:
        raise ValueError(f"noise {noise!r}; allowed: {', '.join(NOISES)}")
    share = 1.0 if noise == "gaussian" else 0.0
    return [LayerBudget(epsilon=float(w) * epsilon, delta=float(w) * delta * share) for w in weights]


def trained_layers(model: nn.Module, layer_of: Callable[[str], str]) -> list[str]:
    """The layers of ``model``'s trainable parameters, in parameter order: what a release covers."""
    return list(group_by_layer((name for name, p in model.named_parameters() if p.requires_grad), layer_of))


def release_budgets(
    layers: Sequence[str],
    psi: Mapping[str, float] | None,
    *,
    allocation: str,
    epsilon: float,
    delta: float,
    noise: str,
    beta: float = 4.0,
) -> dict[str, LayerBudget]:
    """Per-layer budgets (ε_{k,l}, δ_{k,l}) of one release (§5): allocation weights, then the split.

    ``psi`` (layer → PSI, :func:`psi_scores`) is needed for ``sensitivity``
    only. PSI depends only on the public model, the public split and the
    preference, so the budgets can travel in the clear (§4 "Why the public split").
    """
    if allocation == "sensitivity" and psi is None:
        raise ValueError("allocation 'sensitivity' needs the layers' PSI scores")
    scores = [psi[layer] for layer in layers] if allocation == "sensitivity" else [0.0] * len(layers)
    weights = allocation_weights(scores, allocation, beta)
    return dict(zip(layers, layer_budgets(weights, epsilon, delta, noise), strict=True))


# ----------------------------------------------------------------------- mechanisms (§5)


def layer_bound(noise: str, clip: float, size: int, total: int) -> float:
    """A layer's clipping bound (§5): C_l = C·√(d_l/d) on the L2 norm (Gaussian),
    S_l = C·d_l/√d on the L1 norm (Laplace).

    Σ_l C_l² = C², so the whole release has L2 norm at most C; Σ_l S_l = C·√d
    bounds the L1 norm of any update of L2 norm C.
    """
    if noise == "gaussian":
        return clip * math.sqrt(size / total)
    if noise == "laplace":
        return clip * size / math.sqrt(total)
    raise ValueError(f"noise {noise!r}; allowed: {', '.join(NOISES)}")


def analytic_gaussian_delta(sigma: float, epsilon: float, sensitivity: float) -> float:
    """δ(σ) of the Gaussian mechanism with L2 sensitivity Δ at ε, exactly (Balle & Wang, ICML 2018, Thm. 8):

    Φ(Δ/(2σ) − εσ/Δ) − e^ε Φ(−Δ/(2σ) − εσ/Δ).

    The second term is evaluated as exp(ε + log Φ(·)), which neither overflows
    for large ε nor loses the tail.
    """
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    return float(ndtr(a - b) - math.exp(epsilon + float(log_ndtr(-a - b))))


@functools.lru_cache(maxsize=4096)
def _unit_sigma(epsilon: float, delta: float, rtol: float) -> float:
    # σ/Δ depends only on (ε, δ): calibrate at Δ = 1 and scale.
    hi = 1.0
    while analytic_gaussian_delta(hi, epsilon, 1.0) > delta:
        hi *= 2.0
    lo = hi
    while analytic_gaussian_delta(lo, epsilon, 1.0) <= delta:
        lo /= 2.0
    # Invariant: δ(lo) > δ ≥ δ(hi); δ(σ) is decreasing in σ.
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if analytic_gaussian_delta(mid, epsilon, 1.0) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float, rtol: float = 1e-10) -> float:
    """Smallest σ for which N(0, σ²I) noise is (ε, δ)-DP at L2 sensitivity Δ (§5 "Gaussian").

    The analytic Gaussian mechanism (Balle & Wang, *Improving the Gaussian
    Mechanism for Differential Privacy*, ICML 2018, Thm. 8 and Alg. 1), found
    by bisection on :func:`analytic_gaussian_delta`. Valid for every ε > 0,
    unlike the classical σ = Δ·√(2 ln(1.25/δ))/ε (Dwork & Roth 2014, Thm. A.1),
    which holds only for ε < 1, and smaller than it there.

    Returns
    -------
    float
        σ with δ(σ) ≤ δ and δ(σ·(1 − rtol)) > δ.
    """
    if not (epsilon > 0 and 0 < delta < 1 and sensitivity > 0):
        raise ValueError(f"need epsilon > 0, 0 < delta < 1, sensitivity > 0; got {epsilon}, {delta}, {sensitivity}")
    return sensitivity * _unit_sigma(float(epsilon), float(delta), float(rtol))


def noise_variance(noise: str, budget: LayerBudget, bound: float) -> float:
    """Per-coordinate noise variance v_{k,l} of a layer (§5), public because the budget is.

    Sensitivity Δ_l = 2·bound (two clipped updates differ by at most twice the
    bound; §2: any two local datasets are neighbours). Gaussian: v = s² with s
    from :func:`analytic_gaussian_sigma`. Laplace: b = Δ_l/ε_{k,l} (Dwork &
    Roth 2014, Thm. 3.6), v = 2b². ε = ∞ gives 0.
    """
    if math.isinf(budget.epsilon):
        return 0.0
    sensitivity = 2.0 * bound
    if noise == "gaussian":
        return analytic_gaussian_sigma(budget.epsilon, budget.delta, sensitivity) ** 2
    if noise == "laplace":
        return 2.0 * (sensitivity / budget.epsilon) ** 2
    raise ValueError(f"noise {noise!r}; allowed: {', '.join(NOISES)}")


@dataclass(frozen=True)
class LayerRelease:
    """What :func:`privatize_update` did to one layer."""

    size: int  # d_l
    epsilon: float  # ε_{k,l}
    delta: float  # δ_{k,l}
    bound: float  # C_l (L2, Gaussian) or S_l (L1, Laplace)
    norm: float  # the layer's norm before clipping, in the bound's norm
    variance: float  # v_{k,l}, per coordinate


def _noise(shape: torch.Size, noise: str, variance: float, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype) * math.sqrt(variance)
    # Lap(0, b) = b·(E₁ − E₂) for independent standard exponentials; torch's
    # Laplace distribution takes no generator, exponential_ does.
    scale = math.sqrt(variance / 2.0)
    e1 = torch.empty(shape, dtype=dtype).exponential_(generator=generator)
    e2 = torch.empty(shape, dtype=dtype).exponential_(generator=generator)
    return (e1 - e2) * scale


@torch.no_grad()
def privatize_update(
    update: Mapping[str, Tensor],
    layer_of: Callable[[str], str],
    budgets: Mapping[str, LayerBudget],
    clip: float,
    noise: str,
    generator: torch.Generator,
    gains: Mapping[str, float] | None = None,
) -> tuple[dict[str, Tensor], dict[str, LayerRelease]]:
    """One LDP release of an update, layer by layer (§5).

    For each layer l (the entries of ``update`` grouped by ``layer_of``, d_l
    coordinates, d = Σ_l d_l): clip u_l to its bound (:func:`layer_bound`),
    then add noise of variance :func:`noise_variance`. A layer with
    ε_{k,l} = ∞ is released as it is (§10 "With ε = ∞ the release equals the update").

    Parameters
    ----------
    update
        Name → tensor of what will be uploaded, minus its value at the start
        of the round (a dense ΔW, FedMUD factors, LoRA factors...). On CPU.
    layer_of
        Name → layer (:func:`layer_resolver`).
    budgets
        Layer → (ε_{k,l}, δ_{k,l}), one per layer of ``update``.
    clip
        C, the L2 bound of the whole update.
    noise
        ``"gaussian"`` or ``"laplace"``.
    generator
        Seeded per client and round, e.g. ``derive_seed(seed, NOISE_STREAM,
        round, partition)``: noise is reproducible and never reused across rounds.
    gains
        Optional name → g_k > 0, public. The mechanism then runs on z = g·u
        (clip and noise in z units) and ũ = z̃/g is released: the same
        guarantee, since z ↦ z/g is post-processing of a public bijection.
        FedMUD passes g = :func:`fedlr.lowrank.mud.update_gain` for its factors
        so that the clip bounds ΔW rather than the factors. ``norm``, ``bound``
        and ``variance`` in the returned stats are in z units.

    Returns
    -------
    tuple[dict[str, Tensor], dict[str, LayerRelease]]
        The noisy update ũ (same keys and order) and, per layer, what was done.
    """
    groups = group_by_layer(update, layer_of)
    if set(groups) != set(budgets):
        raise ValueError(f"budgets for layers {sorted(budgets)} but the update has layers {sorted(groups)}")
    gains = dict(gains or {})
    if any(not (g > 0 and math.isfinite(g)) for g in gains.values()):
        raise ValueError(f"gains must be finite and > 0, got {gains}")
    if unknown := set(gains) - set(update):
        raise ValueError(f"gains for entries {sorted(unknown)} that the update does not have")
    update = {k: v * gains[k] if k in gains else v for k, v in update.items()}
    total = sum(update[k].numel() for k in update)
    released: dict[str, Tensor] = {}
    stats: dict[str, LayerRelease] = {}
    for layer, keys in groups.items():
        budget = budgets[layer]
        size = sum(update[k].numel() for k in keys)
        bound = layer_bound(noise, clip, size, total)
        order = 2 if noise == "gaussian" else 1
        norm = float(torch.linalg.vector_norm(torch.cat([update[k].flatten() for k in keys]).double(), ord=order))
        variance = noise_variance(noise, budget, bound)
        scale = 1.0 if math.isinf(budget.epsilon) or norm <= bound else bound / norm
        for k in keys:
            clipped = update[k] * scale
            if variance:
                clipped = clipped + _noise(clipped.shape, noise, variance, generator, clipped.dtype)
            released[k] = clipped / gains[k] if k in gains else clipped
        stats[layer] = LayerRelease(size, budget.epsilon, budget.delta, bound, norm, variance)
    return {k: released[k] for k in update}, stats


# ------------------------------------------------------------- variance-aware aggregation (§6)


def estimate_tau2(updates: np.ndarray, variances: Sequence[float]) -> float:
    """Method-of-moments between-client signal variance of one layer (§6 step 1):

    τ_l² = max(0, Σ_k ‖ũ_{k,l} − ū_l‖² / ((K′−1)·d_l) − (1/K′)·Σ_k v_{k,l}).

    Parameters
    ----------
    updates
        (K′, d_l) noisy updates of the layer.
    variances
        v_{k,l}, per coordinate, one per client.

    Returns
    -------
    float
        τ_l² ≥ 0; 0 for a single client (no spread to estimate).
    """
    updates = np.asarray(updates, dtype=np.float64)
    count, size = updates.shape
    if count < 2:
        return 0.0
    spread = float(((updates - updates.mean(0)) ** 2).sum()) / ((count - 1) * size)
    return max(0.0, spread - float(np.mean(variances)))


def aggregation_weights(num_examples: Sequence[float], variances: Sequence[float], tau2: float) -> np.ndarray:
    """a_{k,l} = (n_k/(v_{k,l} + τ_l²)) / Σ_j (n_j/(v_{j,l} + τ_l²)) (§6 step 2).

    Equal variances give n_k-weighted FedAvg exactly; with τ = 0 and equal n_k
    they are the inverse-variance weights that minimize the aggregate's noise
    variance Σ_k a_k² v_k. Clients with v + τ² = 0 (no noise, no spread) are
    the limit of that formula: they share all the weight by n_k.
    """
    n = np.asarray(num_examples, dtype=np.float64)
    total = np.asarray(variances, dtype=np.float64) + tau2
    exact = total == 0
    raw = np.where(exact, n, 0.0) if exact.any() else n / total
    return raw / raw.sum()


def aggregate_noise_variance(weights: Sequence[float], variances: Sequence[float]) -> float:
    """Per-coordinate noise variance Σ_k a_k² v_k of a weighted mean of independent releases."""
    a, v = np.asarray(weights, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    return float((a**2 * v).sum())


# ---------------------------------------------------------------------------- accounting (§7)


@dataclass
class LDPLedger:
    """One client's cumulative (ε, δ) by basic composition over its releases (§7).

    A release is (ε_k, δ)-LDP, or ε_k-LDP for Laplace (δ = 0), because its
    layers' budgets compose to that (:func:`layer_budgets`); releases then add
    up (Dwork & Roth 2014, Thm. 3.16), so after m releases at a fixed ε_k the
    client is at (m·ε_k, m·δ). The ledger adds the release's nominal ε_k, not
    the floating-point sum of its layers' shares, which can differ from it in
    the last bit. A tighter RDP figure for Gaussian releases is not computed:
    ``epsilon`` is what the per-layer budgets add up to (§7). :meth:`state_dict`
    holds scalars only, so it fits a Flower ``ConfigRecord`` in ``context.state``.
    """

    epsilon: float = 0.0
    delta: float = 0.0
    releases: int = 0

    def record(self, epsilon: float, delta: float) -> None:
        """Add one (ε_k, δ)-LDP release."""
        if not (epsilon > 0 and 0 <= delta < 1):
            raise ValueError(f"a release needs epsilon > 0 and 0 <= delta < 1, got {epsilon}, {delta}")
        self.epsilon += epsilon
        self.delta += delta
        self.releases += 1

    def would_exceed(self, epsilon: float, epsilon_total: float) -> bool:
        """Whether one more release at ``epsilon`` would take the total above ``epsilon_total`` (§7)."""
        return self.epsilon + epsilon > epsilon_total * (1.0 + 1e-12)

    def state_dict(self) -> dict[str, float | int]:
        """``epsilon``, ``delta`` and ``releases``."""
        return {"epsilon": self.epsilon, "delta": self.delta, "releases": self.releases}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> LDPLedger:
        """The ledger :meth:`state_dict` described."""
        return cls(epsilon=float(state["epsilon"]), delta=float(state["delta"]), releases=int(state["releases"]))
