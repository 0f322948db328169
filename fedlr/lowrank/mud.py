"""Model update decomposition (MUD) with block-wise Kronecker factors (BKD) and
aggregation-aware decomposition (AAD): the tensor math of FedMUD, free of Flower.

Reference: S. Li, X. Luo et al., *The Panaceas for Improving Low-Rank
Decomposition in Communication-Efficient Federated Learning*, ICML 2025,
arXiv 2505.23176 (official code ``Leopold1423/fedmud-icml25``, "dmu").
Every section number below (§) refers to ``shared/specs/fedmud.md``.

A decomposed layer computes ``linear(x, W + ΔW(θ))`` or ``conv(x, W + ΔW(θ))``
with W a frozen dense base and θ the trainable factors. Each factorization has
a *left* and a *right* factor: (U, V) in ``lowrank`` mode, the stacks (A, B) of
shape (r_b, s, s) in ``bkd`` mode. Frozen factors (AAD's Ũ, Ṽ / Ã, B̃) are never
sent: they are re-drawn from ``(run_seed, round, layer_index, term)``, term 0
for the left and term 1 for the right factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DECOMPOSITIONS",
    "AGGREGATIONS",
    "TARGETS",
    "LayerSpec",
    "MUDLayer",
    "MUDLinear",
    "MUDConv1d",
    "MUDConv2d",
    "aggregate_factors",
    "aggregation_error",
    "bkd_sizing",
    "decompose_model",
    "delta_from_factors",
    "frozen_factor",
    "layer_specs",
    "load_model_factors",
    "lowrank_rank",
    "matrix_shape",
    "merge_round",
    "model_deltas",
    "model_factors",
    "mud_layers",
    "reset_round",
    "update_gain",
]

DECOMPOSITIONS = ("lowrank", "bkd")
AGGREGATIONS = ("naive", "aad")
TARGETS = ("update", "weight")
# [code] forces the realized ratio to within this slack of the target (§2.3).
RATIO_SLACK = 0.001
RATIO_STEP = 0.001
FACTOR_NAMES = ("left", "right")


# --------------------------------------------------------------------------- sizing


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Matrix view (m, n) of a dense weight for ``lowrank`` factors (§2.1).

    Linear (out, in) stays out×in. Conv2d (out, in, kh, kw) is viewed as
    (out·kh)×(in·kw) as in [code]. Conv1d (out, in, k) is the kh = 1 case of
    the same rule, out×(in·k), which is also the im2col view (one row per
    filter). The view is a plain row-major reshape, so the product U V is
    reshaped back to ``shape`` without permutation.

    Parameters
    ----------
    shape
        Shape of the dense weight, 2-D (Linear) or 3-/4-D (Conv1d/Conv2d).

    Returns
    -------
    tuple[int, int]
        (m, n) with m·n = numel.
    """
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    out_channels, in_channels, *kernel = shape
    return out_channels * math.prod(kernel[:-1]), in_channels * kernel[-1]


def lowrank_rank(m: int, n: int, ratio: float) -> int:
    """Rank r = max(1, ⌈ρ·m·n/(m+n)⌉) so that r(m+n) ≈ ρN (§2.1, [code]).

    Parameters
    ----------
    m, n
        Matrix view of the weight (see :func:`matrix_shape`).
    ratio
        Budget ρ, trainable factor entries over N = m·n.

    Returns
    -------
    int
        The rank of each factor pair.
    """
    return max(1, math.ceil(ratio * m * n / (m + n)))


def bkd_sizing(numel: int, ratio: float) -> tuple[int, int]:
    """Block count and factor size of BKD: r_b = ⌈ρ²N/4⌉, s = ⌈(N/r_b)^¼⌉ (§2.2).

    r_b blocks of s²×s² entries cover N (r_b·s⁴ ≥ N) with 2·r_b·s² ≈ ρN
    trainable entries; since s² ≈ 2/ρ the block size is independent of the
    layer size.

    Parameters
    ----------
    numel
        N, number of entries of the dense weight.
    ratio
        Budget ρ.

    Returns
    -------
    tuple[int, int]
        (r_b, s); the left and right factors have shape (r_b, s, s).
    """
    r_b = math.ceil(ratio**2 * numel / 4)
    # Integer 4th root instead of [code]'s float power: same value, but
    # r_b·s⁴ ≥ N (needed to fill W) is then guaranteed, not subject to rounding.
    q = -(-numel // r_b)
    s = math.isqrt(math.isqrt(q))
    return r_b, s if s**4 == q else s + 1


@dataclass(frozen=True)
class LayerSpec:
    """Everything needed to rebuild a layer's ΔW from its trainable factors.

    The server holds plain weight arrays and one ``LayerSpec`` per decomposed
    layer; :func:`delta_from_factors` turns (spec, factors, seed) into ΔW.

    Parameters
    ----------
    shape
        Shape of the dense weight W.
    decomposition
        ``"lowrank"`` (ΔW = U V, §2.1) or ``"bkd"`` (Kronecker blocks, §2.2).
    aggregation
        ``"naive"`` (both factors trainable, U/A random, V/B zero) or ``"aad"``
        (ΔW = F̃ₗ·right + left·F̃ᵣ with seed-drawn frozen F̃, both trainable
        factors zero at round start).
    ratio
        Internal budget used for sizing (after ratio forcing, §2.3).
    init_scale
        a, frozen factors are U(−a, a).
    target
        ``"update"`` (MUD: factorize ΔW on top of a frozen W) or ``"weight"``
        (FedLMT-style baseline W = U V, §2.4; lowrank and naive only).
    """

    shape: tuple[int, ...]
    decomposition: str
    aggregation: str
    ratio: float
    init_scale: float
    target: str = "update"

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("decomposition", self.decomposition, DECOMPOSITIONS),
            ("aggregation", self.aggregation, AGGREGATIONS),
            ("target", self.target, TARGETS),
        ):
            if value not in allowed:
                raise ValueError(f"fedmud.{key}={value!r}; allowed: {', '.join(allowed)}")
        if self.target == "weight" and (self.decomposition, self.aggregation) != ("lowrank", "naive"):
            # W = U V from scratch has no frozen base to absorb updates and no
            # seed-shared factor: only the FedLMT baseline of §2.4 is defined.
            raise ValueError(
                f"fedmud.target='weight' needs decomposition='lowrank' and aggregation='naive', "
                f"got {self.decomposition!r} and {self.aggregation!r}"
            )
        if not self.ratio > 0 or not self.init_scale > 0:
            raise ValueError(f"ratio and init_scale must be > 0, got {self.ratio} and {self.init_scale}")

    @property
    def numel(self) -> int:
        """N, number of entries of W."""
        return math.prod(self.shape)

    @property
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the left and right factors (trainable and frozen alike)."""
        if self.decomposition == "lowrank":
            m, n = matrix_shape(self.shape)
            r = lowrank_rank(m, n, self.ratio)
            return {"left": (m, r), "right": (r, n)}
        r_b, s = bkd_sizing(self.numel, self.ratio)
        return {"left": (r_b, s, s), "right": (r_b, s, s)}

    @property
    def num_trainable(self) -> int:
        """Trainable factor entries; every pattern trains exactly one left and one right factor."""
        return sum(math.prod(shape) for shape in self.factor_shapes.values())


# --------------------------------------------------------------------------- math


def frozen_factor(
    shape: Sequence[int], run_seed: int, round: int, layer_index: int, term: int, init_scale: float
) -> Tensor:
    """Draw a seed-shared factor U(−a, a), float32, on the CPU (§3 step 1, §7 "Seeds").

    NumPy's ``SeedSequence([run_seed, round, layer_index, term])`` makes the
    value a pure function of its key: bit-identical in every process and on
    every device (move the result afterwards), unlike [code]'s unseeded,
    device-dependent torch generator with only 100 per-layer seeds (§8).

    Parameters
    ----------
    shape
        Factor shape.
    run_seed, round, layer_index, term
        Non-negative integers; ``term`` is 0 for the left and 1 for the right factor.
    init_scale
        a.

    Returns
    -------
    Tensor
        float32 CPU tensor of ``shape``.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([run_seed, round, layer_index, term])))
    return torch.from_numpy(rng.uniform(-init_scale, init_scale, size=tuple(shape)).astype(np.float32))


def _draw_frozen(spec: LayerSpec, run_seed: int, round: int, layer_index: int) -> dict[str, Tensor]:
    return {
        name: frozen_factor(shape, run_seed, round, layer_index, term, spec.init_scale)
        for term, (name, shape) in enumerate(spec.factor_shapes.items())
    }


def _product(spec: LayerSpec, left: Tensor, right: Tensor) -> Tensor:
    """One factorized term reshaped to W's shape: U V, or the BKD block layout.

    BKD: vec(ΔW) is the first N entries of [vec(A_1⊗B_1); …; vec(A_rb⊗B_rb)],
    row-major, i.e. contiguous chunks of the flattened weight and not a 2-D
    tiling (§2.2, §8). (A⊗B)[i·s+j, m·s+n] = A[i,m]·B[j,n], so the einsum's
    (b, i, j, m, n) order *is* the row-major vec of every block, all blocks at once.
    """
    if spec.decomposition == "lowrank":
        flat = left @ right
    else:
        flat = torch.einsum("bim,bjn->bijmn", left, right)
    return flat.reshape(-1)[: spec.numel].reshape(spec.shape)


def _delta(spec: LayerSpec, trainable: Mapping[str, Tensor], frozen: Mapping[str, Tensor | None]) -> Tensor:
    if spec.aggregation == "aad":
        # Each term has exactly one trainable factor, so ΔW is linear in θ and
        # averaging factors averages updates exactly (AAD, §1).
        return _product(spec, frozen["left"], trainable["right"]) + _product(spec, trainable["left"], frozen["right"])
    return _product(spec, trainable["left"], trainable["right"])


def delta_from_factors(
    layer_spec: LayerSpec,
    factors: Mapping[str, Tensor | np.ndarray],
    run_seed: int,
    round: int,
    layer_index: int,
) -> Tensor:
    """Rebuild a layer's ΔW from its trainable factors and the round seed (§3 steps 4, 6).

    Used by the server, which holds plain weight arrays, to merge
    W_{t+1} = W_t + ΔW(θ̄_t; σ_t), and by a returning client to replay missed
    rounds with *their* seeds (§8 "Merge seed"). Returns the same value as
    :meth:`MUDLayer.delta_w` of a layer reset with the same key and loaded
    with the same factors. For ``target="weight"`` the result is W itself.

    Parameters
    ----------
    layer_spec
        The layer's :class:`LayerSpec`.
    factors
        ``{"left": ..., "right": ...}``, trainable factors (tensors or arrays).
    run_seed, round, layer_index
        Key of the frozen factors (unused by ``naive``, which has none).

    Returns
    -------
    Tensor
        float32 CPU tensor of ``layer_spec.shape``.
    """
    trainable = {name: torch.as_tensor(factors[name], dtype=torch.float32) for name in FACTOR_NAMES}
    frozen = _draw_frozen(layer_spec, run_seed, round, layer_index) if layer_spec.aggregation == "aad" else {}
    return _delta(layer_spec, trainable, frozen)


def _normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    return [float(w) / total for w in weights]


def aggregate_factors(
    factor_dicts: Sequence[Mapping[str, Tensor | np.ndarray]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Weighted mean θ̄ = Σ_k w_k θ_k, key by key (§3 step 6).

    Parameters
    ----------
    factor_dicts
        One dict of arrays per client (e.g. from :func:`model_factors`).
    weights
        Non-negative client weights, e.g. ``num-examples``; normalized here to
        sum to 1 (w_k = n_k/Σn).

    Returns
    -------
    dict[str, Tensor]
        The averaged arrays, float32.
    """
    w = _normalized(weights)
    return {
        key: sum(wk * torch.as_tensor(d[key], dtype=torch.float32) for wk, d in zip(w, factor_dicts, strict=True))
        for key in factor_dicts[0]
    }


def aggregation_error(
    applied_delta: Mapping[str, Tensor],
    client_deltas: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
) -> float:
    """‖applied ΔW − Σ_k w_k ΔW_k‖ / ‖Σ_k w_k ΔW_k‖ over all layers (§7).

    0 up to float rounding for AAD, of order 1 for naive factor averaging
    (claim C3).

    Parameters
    ----------
    applied_delta
        Layer name → ΔW the server applied.
    client_deltas
        Per client, layer name → ΔW_k rebuilt from the client's own factors.
    weights
        Client weights, normalized here.

    Returns
    -------
    float
        Relative Frobenius error over the concatenation of all layers.
    """
    mean = aggregate_factors(client_deltas, weights)
    num = sum(float(torch.sum((applied_delta[k].float() - mean[k]) ** 2)) for k in mean)
    den = sum(float(torch.sum(v**2)) for v in mean.values())
    if den == 0:  # all clients sent a zero update: only an exact zero is exact
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


# --------------------------------------------------------------------------- layers


class MUDLayer(nn.Module):
    """A Linear/Conv layer whose weight is W + ΔW(θ) (§2), or U V for ``target="weight"``.

    W is a persistent *buffer*, so ``parameters()`` is exactly what a client
    trains and sends: the two trainable factors plus the dense bias. Frozen
    factors (AAD only) are non-persistent buffers: they never travel (§3 step 5).
    The update-target factors are zero until :meth:`reset_factors` is called,
    which the protocol does at every round start (§3 step 4).

    Parameters
    ----------
    weight
        Dense weight, copied into W (update) or factorized by truncated SVD (weight).
    bias
        Dense bias, kept as a trainable parameter (or None).
    spec
        The layer's :class:`LayerSpec`; ``spec.shape`` must match ``weight``.
    """

    def __init__(self, weight: Tensor, bias: nn.Parameter | None, spec: LayerSpec) -> None:
        super().__init__()
        if tuple(weight.shape) != spec.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match spec shape {spec.shape}")
        self.spec = spec
        w = weight.detach().clone()
        shapes = spec.factor_shapes
        if spec.target == "update":
            self.register_buffer("weight", w)
            left, right = (w.new_zeros(shapes[name]) for name in FACTOR_NAMES)
        else:
            self.register_buffer("weight", None)
            left, right = _balanced_svd(w, shapes["left"][1])
        self.left = nn.Parameter(left)
        self.right = nn.Parameter(right)
        aad = spec.aggregation == "aad"
        self.register_buffer("left_frozen", torch.zeros_like(left) if aad else None, persistent=False)
        self.register_buffer("right_frozen", torch.zeros_like(right) if aad else None, persistent=False)
        self.register_parameter("bias", bias)

    def _require_update_target(self, what: str) -> None:
        if self.spec.target != "update":
            raise RuntimeError(f"{what} applies to target='update'; target='weight' factors persist across rounds")

    def delta_w(self) -> Tensor:
        """ΔW(θ) in W's shape (for ``target="weight"``: the weight U V itself)."""
        return _delta(
            self.spec,
            {"left": self.left, "right": self.right},
            {"left": self.left_frozen, "right": self.right_frozen},
        )

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with: W + ΔW, or U V for ``target="weight"``."""
        delta = self.delta_w()
        return delta if self.weight is None else self.weight + delta

    def _zero_start(self) -> None:
        # Zero exactly the factors that start each round at zero, so ΔW = 0:
        # right for naive (left stays random), both for AAD.
        self.right.zero_()
        if self.spec.aggregation == "aad":
            self.left.zero_()

    @torch.no_grad()
    def reset_factors(self, run_seed: int, round: int, layer_index: int) -> None:
        """Round start: re-draw the seeded factors and zero the trainable ones (§3 step 4).

        naive: left ← U(−a, a) drawn from term 0 (trainable), right ← 0.
        aad: frozen left/right ← terms 0/1, trainable left/right ← 0.
        In-place, so parameter identities (optimizers, hooks) survive.
        """
        self._require_update_target("reset_factors")
        drawn = {k: v.to(self.left) for k, v in _draw_frozen(self.spec, run_seed, round, layer_index).items()}
        if self.spec.aggregation == "aad":
            self.left_frozen.copy_(drawn["left"])
            self.right_frozen.copy_(drawn["right"])
        else:
            self.left.copy_(drawn["left"])
        self._zero_start()

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW, then zero the zero-start factors so the layer's function is unchanged.

        Must run while the factors of the round being merged are loaded, i.e.
        before :meth:`reset_factors` for the next round (§8 "Merge seed").
        """
        self._require_update_target("merge")
        self.weight += self.delta_w()
        self._zero_start()

    def trainable_factors(self) -> dict[str, Tensor]:
        """Copies of the trainable factors, ``{"left": ..., "right": ...}`` (what a client uploads)."""
        return {name: getattr(self, name).detach().clone() for name in FACTOR_NAMES}

    @torch.no_grad()
    def load_trainable_factors(self, factors: Mapping[str, Tensor | np.ndarray]) -> None:
        """Overwrite the trainable factors in place, e.g. with the averaged θ̄."""
        for name in FACTOR_NAMES:
            getattr(self, name).copy_(torch.as_tensor(factors[name]))


def _balanced_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r factors of the default-init W, split as U√S, √S Vᵀ.

    [fedlr] choice for the FedLMT baseline (§2.4): keeps the model's default
    initialization scale and is a function of W, which the server broadcasts.
    """
    m, n = matrix_shape(weight.shape)
    u, s, vh = torch.linalg.svd(weight.reshape(m, n).double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight), (root[:, None] * vh[:rank]).to(weight)


class MUDLinear(MUDLayer):
    """Decomposed :class:`torch.nn.Linear`; W has shape (out, in)."""

    def __init__(self, module: nn.Linear, spec: LayerSpec) -> None:
        super().__init__(module.weight, module.bias, spec)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class _MUDConv(MUDLayer):
    _conv: Callable[..., Tensor]  # F.conv1d or F.conv2d, set by the subclass

    def __init__(self, module: nn.Conv1d | nn.Conv2d, spec: LayerSpec) -> None:
        if module.padding_mode != "zeros":
            raise ValueError(f"padding_mode={module.padding_mode!r} is not supported; use 'zeros'")
        super().__init__(module.weight, module.bias, spec)
        self.stride, self.padding, self.dilation, self.groups = (
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class MUDConv1d(_MUDConv):
    """Decomposed :class:`torch.nn.Conv1d`; lowrank views W (out, in, k) as out×(in·k)."""

    _conv = staticmethod(F.conv1d)


class MUDConv2d(_MUDConv):
    """Decomposed :class:`torch.nn.Conv2d`; lowrank views W (out, in, kh, kw) as (out·kh)×(in·kw)."""

    _conv = staticmethod(F.conv2d)


_WRAPPERS: dict[type[nn.Module], type[MUDLayer]] = {
    nn.Linear: MUDLinear,
    nn.Conv1d: MUDConv1d,
    nn.Conv2d: MUDConv2d,
}


def _factor_operator_norm(spec: LayerSpec, multiplier: Tensor) -> float:
    """Operator norm of θ ↦ one term of ΔW whose other factor is ``multiplier``.

    lowrank: θ ↦ M θ (or θ M) has norm ‖M‖₂, the largest singular value.
    BKD: θ_b ↦ M_b ⊗ θ_b fills its own contiguous chunk of vec(ΔW) per block
    (:func:`_product`), and ‖M_b ⊗ θ_b‖_F = ‖M_b‖_F·‖θ_b‖_F, so the norm is
    max_b ‖M_b‖_F. Truncating vec(ΔW) to N entries can only lower it.
    """
    m = multiplier.detach().double()
    if spec.decomposition == "lowrank":
        return float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0
    return float(torch.linalg.matrix_norm(m, ord="fro").max())


def update_gain(layer: MUDLayer) -> float:
    """L with ‖ΔW(θ)‖_F ≤ L·‖θ‖₂ for the layer's trainable factors θ at round start.

    Used to clip and noise a FedMUD upload in ΔW units under layer-wise LDP
    (``shared/specs/fedre.md`` §5, "every update codec"): a release of the
    factors z = L·θ clipped to C_l bounds the *update* the server merges by
    ‖ΔW‖ ≤ C_l, as for a dense upload, and the factor noise N(0, s²/L²) adds
    ΔW noise of energy at most s²·dim θ, against s²·d_l for a dense release.
    Without it a clip in factor units lets the frozen factors (entries up to
    ``init_scale``) multiply both the update and its noise, and training
    diverges (measured: NaN at ε = 100).

    ΔW is linear in θ for AAD: ΔW = P(F̃ₗ, right) + P(left, F̃ᵣ), so by
    Cauchy–Schwarz L = √(‖θ ↦ P(F̃ₗ, θ)‖² + ‖θ ↦ P(θ, F̃ᵣ)‖²) is exact as a
    bound. For ``naive`` (and ``target="weight"``) the product of two trainable
    factors is bilinear; L is the same expression at the round-start factors,
    which bounds the first-order change of ΔW. L depends only on seed-drawn
    or broadcast values, so it is public: using it costs no privacy.
    """
    if layer.spec.aggregation == "aad":
        left_mult, right_mult = layer.left_frozen, layer.right_frozen
    else:
        left_mult, right_mult = layer.left, layer.right
    return math.sqrt(
        _factor_operator_norm(layer.spec, left_mult) ** 2 + _factor_operator_norm(layer.spec, right_mult) ** 2
    )


# --------------------------------------------------------------------------- model level


def mud_layers(model: nn.Module) -> list[tuple[str, MUDLayer]]:
    """Decomposed layers in ``named_modules()`` order; the position is the layer index of the seeds."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MUDLayer)]


def layer_specs(model: nn.Module) -> dict[str, LayerSpec]:
    """Layer name → :class:`LayerSpec`, in layer-index order (what the server keeps)."""
    return {name: layer.spec for name, layer in mud_layers(model)}


def _num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def decompose_model(
    model: nn.Module,
    decomposition: str,
    aggregation: str,
    ratio: float,
    init_scale: float,
    skip: tuple[int, int] = (0, 0),
    target: str = "update",
) -> nn.Module:
    """Replace every Linear/Conv1d/Conv2d by its MUD wrapper, with ratio forcing (§2, §2.3).

    Walks ``named_modules()`` (not only ``nn.Sequential``, unlike [code], §8),
    keeps each original weight as W and its bias dense, and leaves the first
    ``skip[0]`` and last ``skip[1]`` of those layers dense. The ceilings of the
    sizing rules can push the realized ratio above ρ, so, as in [code], the
    internal ratio is lowered in steps of 0.001 until

        realized = trainable params after / trainable params before ≤ ρ + 0.001.

    Parameters
    ----------
    model
        The dense model, modified in place.
    decomposition, aggregation, init_scale, target
        See :class:`LayerSpec`.
    ratio
        Target budget ρ in (0, 1].
    skip
        (front, back) layers left dense; [fedlr] default (0, 0).

    Returns
    -------
    nn.Module
        ``model``, with ``model.mud_realized_ratio`` (measured on the built
        model, for ``summary.json``) and ``model.mud_internal_ratio`` set.

    Raises
    ------
    ValueError
        On invalid options, if ``skip`` leaves no layer to decompose, or if ρ
        cannot be reached, in particular when the dense parts (biases, norms,
        skipped layers) alone exceed it — where [code] silently bottoms out
        above the budget.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"fedmud.ratio={ratio}; allowed: 0 < ratio <= 1")
    front, back = skip
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(_WRAPPERS))]
    chosen = layers[front : len(layers) - back]
    if not chosen:
        # Nothing to factorize would silently turn FedMUD into FedAvg.
        raise ValueError(
            f"fedmud.skip={front}-{back} leaves none of the model's {len(layers)} Linear/Conv layers "
            f"to decompose; allowed: front + back < {len(layers)}"
        )
    total = _num_trainable(model)
    dense = total - sum(m.weight.numel() for _, m in chosen)
    if dense / total > ratio:
        raise ValueError(
            f"fedmud.ratio={ratio} is unreachable: the dense parts alone (biases, norms and the "
            f"skip={front}-{back} layers) are {dense / total:.4f} of the model's parameters; "
            f"allowed: ratio >= {dense / total:.4f}, or skip fewer layers"
        )

    def specs_at(internal: float) -> list[LayerSpec]:
        return [
            LayerSpec(tuple(m.weight.shape), decomposition, aggregation, internal, init_scale, target)
            for _, m in chosen
        ]

    step = 0
    while True:
        internal = ratio - step * RATIO_STEP
        if internal <= 0:
            raise ValueError(
                f"fedmud.ratio={ratio} is unreachable: even the smallest factors exceed ratio + {RATIO_SLACK} "
                f"(dense parts alone are {dense / total:.4f}); allowed: a larger ratio"
            )
        specs = specs_at(internal)
        if (dense + sum(s.num_trainable for s in specs)) / total - ratio <= RATIO_SLACK:
            break
        step += 1

    for (name, module), spec in zip(chosen, specs, strict=True):
        parent_name, _, child = name.rpartition(".")
        wrapper = next(w for t, w in _WRAPPERS.items() if isinstance(module, t))
        setattr(model.get_submodule(parent_name), child, wrapper(module, spec))
    model.mud_internal_ratio = internal
    model.mud_realized_ratio = _num_trainable(model) / total
    return model


def reset_round(model: nn.Module, run_seed: int, round: int) -> None:
    """Round start on every decomposed layer: re-draw frozen factors, zero trainable ones (§3 step 4)."""
    for index, (_, layer) in enumerate(mud_layers(model)):
        layer.reset_factors(run_seed, round, index)


def merge_round(model: nn.Module) -> None:
    """W ← W + ΔW on every decomposed layer with the currently loaded factors (§3 steps 4, 6)."""
    for _, layer in mud_layers(model):
        layer.merge()


def model_factors(model: nn.Module) -> dict[str, Tensor]:
    """Trainable factors of all decomposed layers, keyed ``"<layer>.left"`` / ``"<layer>.right"``.

    The keys are the parameters' ``state_dict`` names, so the flat dict can go
    straight to :func:`aggregate_factors` and :func:`load_model_factors`.
    """
    return {
        f"{name}.{key}": value for name, layer in mud_layers(model) for key, value in layer.trainable_factors().items()
    }


def load_model_factors(model: nn.Module, factors: Mapping[str, Tensor | np.ndarray]) -> None:
    """Load a flat factor dict (as from :func:`model_factors`) into every decomposed layer."""
    for name, layer in mud_layers(model):
        layer.load_trainable_factors({key: factors[f"{name}.{key}"] for key in FACTOR_NAMES})


def model_deltas(
    specs: Mapping[str, LayerSpec], factors: Mapping[str, Tensor | np.ndarray], run_seed: int, round: int
) -> dict[str, Tensor]:
    """Layer name → ΔW from a flat factor dict, for the server merge and catch-up (§3).

    Parameters
    ----------
    specs
        Output of :func:`layer_specs`; its order gives the layer indices.
    factors
        Flat factor dict, keys ``"<layer>.left"`` / ``"<layer>.right"``.
    run_seed, round
        Key of the round's frozen factors.
    """
    return {
        name: delta_from_factors(spec, {k: factors[f"{name}.{k}"] for k in FACTOR_NAMES}, run_seed, round, index)
        for index, (name, spec) in enumerate(specs.items())
    }
