"""LoRA adapters and FedSVD's server-side SVD re-factorization: pure tensor math, free of Flower.

Reference: S. Lee, S. Park, D. B. Lee et al., *FedSVD: Adaptive Orthogonalization
for Private Federated Learning with LoRA*, NeurIPS 2025, arXiv 2505.12805
(official code ``seanie12/fed-svd``). Every section number below (§) refers to
``shared/specs/fedsvd.md``.

An adapted Linear layer computes h = W₀x + (α/r)·B A x with A ∈ ℝ^{r×d_in} and
B ∈ ℝ^{d_out×r} (§1). A and B live in two separate bias-free ``nn.Linear``
modules, ``lora_A`` and ``lora_B``, so that Opacus computes per-sample
gradients of exactly the trainable factor and never of a frozen one (§3.4, §8
"Mixed modules"). Three methods share the layer and differ in what trains:

===============  ===============  =====================================================
method           trained factors  what the server does with A
===============  ===============  =====================================================
``fedavg-lora``  A and B          averages the clients' A's (FedIT)
``ffa-lora``     B                nothing: A stays at its seeded init
``fedsvd``       B                re-derives A from the SVD of B·A (paper Eq. 7)
===============  ===============  =====================================================

In every method W₀, every bias and every layer without an adapter, including
the classifier head, are frozen [paper, §1]. Messages carry flat dicts keyed
``"<layer>.A"`` / ``"<layer>.B"``, the layer being its ``named_modules()`` name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedlr.lowrank.mud import aggregate_factors, frozen_factor
from fedlr.training import derive_seed

__all__ = [
    "FACTORS",
    "LORA_METHODS",
    "SVD_SOLVERS",
    "TRAINED_FACTORS",
    "LoRALinear",
    "add_lora",
    "aggregate_lora",
    "initial_a",
    "load_lora_state",
    "lora_layers",
    "lora_state",
    "orthonormality_error",
    "reconstruction_error",
    "refactorize",
    "refactorize_state",
    "svd_due",
]

LORA_METHODS = ("fedsvd", "ffa-lora", "fedavg-lora")
FACTORS = ("A", "B")
TRAINED_FACTORS: dict[str, tuple[str, ...]] = {"fedsvd": ("B",), "ffa-lora": ("B",), "fedavg-lora": ("A", "B")}
SVD_SOLVERS = ("qr", "randomized")
# Singular values at or below this fraction of σ₁ count as zero (§2 "Rank-deficient M").
RANK_RTOL = 1e-7
# A Gram–Schmidt candidate whose residual keeps less than this fraction of its
# norm lies (numerically) in the span already built and is skipped.
GRAM_SCHMIDT_RTOL = 1e-6


# --------------------------------------------------------------------------- layer


class LoRALinear(nn.Module):
    """h = W₀x + b₀ + (α/r)·B A x, the adapted linear layer of §1.

    W₀ and b₀ stay in the wrapped ``base`` layer; A and B are the weights of
    the bias-free ``lora_A`` (d_in → r) and ``lora_B`` (r → d_out) layers. The
    scaling α/r stays in the forward pass and is never folded into B, so the
    server re-factorizes the unscaled product B·A (§2 "Properties", [code]).

    Parameters
    ----------
    base
        The layer to adapt, kept as is (its parameters are frozen by :func:`add_lora`).
    rank
        r, with 1 ≤ r ≤ min(d_in, d_out): the SVD step needs r orthonormal
        rows of length d_in and r orthonormal columns of length d_out.
    alpha
        α; the adapter output is scaled by α/r.
    a_init
        Initial A, shape (r, d_in); B starts at zero, so the adapted layer
        first computes exactly what ``base`` does.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, a_init: Tensor) -> None:
        super().__init__()
        d_out, d_in = base.weight.shape
        if not 1 <= rank <= min(d_in, d_out):
            raise ValueError(f"lora rank={rank} for a {d_in}->{d_out} Linear; allowed: 1 <= rank <= {min(d_in, d_out)}")
        if tuple(a_init.shape) != (rank, d_in):
            raise ValueError(f"a_init has shape {tuple(a_init.shape)}, expected {(rank, d_in)}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        # skip_init: the factors are set right below, so drawing PyTorch's
        # default init would only consume the global RNG as a side effect.
        self.lora_A = nn.utils.skip_init(nn.Linear, d_in, rank, bias=False, **like)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, d_out, bias=False, **like)
        with torch.no_grad():
            self.lora_A.weight.copy_(a_init)
            self.lora_B.weight.zero_()

    @property
    def A(self) -> nn.Parameter:  # noqa: N802 — the paper's symbol
        """A ∈ ℝ^{r×d_in}, the down-projection."""
        return self.lora_A.weight

    @property
    def B(self) -> nn.Parameter:  # noqa: N802 — the paper's symbol
        """B ∈ ℝ^{d_out×r}, the up-projection."""
        return self.lora_B.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


# --------------------------------------------------------------------------- model level


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Adapted layers in ``named_modules()`` order; the position is the layer index of A's seed."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def initial_a(rank: int, d_in: int, seed: int, layer_index: int) -> Tensor:
    """A₀ of adapted layer ``layer_index``: PEFT's default init U(−1/√d_in, 1/√d_in) (§2 "Init").

    That is ``kaiming_uniform_(a=√5)``, drawn here from the key
    ``(seed, 0, layer_index, 0)`` of :func:`fedlr.lowrank.mud.frozen_factor`:
    the server and every client build the same A₀ without sending it, and
    FFA-LoRA's fixed random A is exactly this A₀.

    Returns
    -------
    Tensor
        float32 CPU tensor of shape (rank, d_in).
    """
    return frozen_factor((rank, d_in), seed, 0, layer_index, 0, 1 / math.sqrt(d_in))


def _default_targets(model: nn.Module) -> list[str]:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ValueError(
            f"the model has {len(linears)} Linear layer(s); the default LoRA targets are every Linear "
            "but the last (the frozen head), so pass targets= explicitly"
        )
    return linears[:-1]


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    method: str,
    *,
    seed: int,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap Linear layers in :class:`LoRALinear` and freeze everything else (§1, §2 "Init").

    Layer ℓ starts from A₀ = :func:`initial_a` and B₀ = 0. Only Linear layers
    are adapted: the spec places LoRA on Linear layers only (§4).

    Parameters
    ----------
    model
        The pretrained model, modified in place.
    rank, alpha
        r and α of every adapter (§4 default: r = 8, α = r).
    method
        One of :data:`LORA_METHODS`; selects the trainable factors
        (:data:`TRAINED_FACTORS`). All other parameters, W₀, biases and the
        head included, get ``requires_grad=False`` [paper, §1].
    seed
        Run seed keying A₀.
    targets
        ``named_modules()`` names of the Linear layers to adapt. Default: every
        ``nn.Linear`` but the last one, the classifier head, which the spec
        keeps frozen and un-adapted (§4, "output layer frozen").

    Returns
    -------
    nn.Module
        ``model``.

    Raises
    ------
    ValueError
        On an unknown method, a target that is missing or not an ``nn.Linear``,
        a model that already has adapters, or a rank the layer cannot hold.
    """
    if method not in LORA_METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(LORA_METHODS)}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    modules = dict(model.named_modules())
    names = set(_default_targets(model) if targets is None else targets)
    if not names:
        raise ValueError("targets is empty: no layer would be adapted and nothing would train")
    for name in sorted(names):
        if not isinstance(modules.get(name), nn.Linear):
            found = "no such module" if name not in modules else type(modules[name]).__name__
            raise ValueError(f"LoRA target {name!r} must be an nn.Linear, got {found}")
    # Index by position in named_modules() order (as lora_layers() reports it),
    # whatever order targets were given in. All wrappers are built before any
    # is installed, so an invalid rank leaves the model untouched.
    wrappers = {
        name: LoRALinear(modules[name], rank, alpha, initial_a(rank, modules[name].in_features, seed, index))
        for index, name in enumerate(n for n in modules if n in names)
    }
    for name, wrapper in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapper)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for factor in TRAINED_FACTORS[method]:
            getattr(layer, factor).requires_grad_(True)
    return model


def lora_state(model: nn.Module, which: Sequence[str] = FACTORS) -> dict[str, Tensor]:
    """Copies of the LoRA factors, keyed ``"<layer>.A"`` / ``"<layer>.B"``.

    Parameters
    ----------
    model
        A model with adapters (:func:`add_lora`).
    which
        Factors to include: ``("A", "B")`` for the server's broadcast,
        ``TRAINED_FACTORS[method]`` for a client's upload (B only for FedSVD
        and FFA-LoRA, §2 "Up").

    Returns
    -------
    dict[str, Tensor]
        Detached clones, on the model's device.
    """
    unknown = set(which) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown LoRA factors {sorted(unknown)}; allowed: {', '.join(FACTORS)}")
    return {
        f"{name}.{factor}": getattr(layer, factor).detach().clone()
        for name, layer in lora_layers(model)
        for factor in FACTORS
        if factor in which
    }


def _split_key(key: str) -> tuple[str, str]:
    layer, _, factor = key.rpartition(".")
    if factor not in FACTORS or not layer:
        raise ValueError(f"LoRA state key {key!r} is not '<layer>.A' or '<layer>.B'")
    return layer, factor


@torch.no_grad()
def load_lora_state(model: nn.Module, state: Mapping[str, Tensor | np.ndarray]) -> None:
    """Overwrite LoRA factors in place from a flat dict (as from :func:`lora_state`).

    In place, so parameter identities (optimizers, Opacus hooks) survive. A
    factor that appears must appear for every adapted layer: a partial load
    would silently mix two rounds' factors.

    Raises
    ------
    ValueError
        On a key naming no adapted layer, a shape mismatch, or a factor given
        for only some layers.
    """
    layers = dict(lora_layers(model))
    given: dict[str, set[str]] = {factor: set() for factor in FACTORS}
    for key in state:
        layer, factor = _split_key(key)
        if layer not in layers:
            raise ValueError(f"LoRA state key {key!r}: the model has no adapted layer {layer!r}")
        given[factor].add(layer)
    for factor, names in given.items():
        if names and names != set(layers):
            raise ValueError(f"LoRA state has {factor} for {sorted(names)} but not for {sorted(set(layers) - names)}")
    for key, value in state.items():
        layer, factor = _split_key(key)
        target = getattr(layers[layer], factor)
        value = torch.as_tensor(value)
        if value.shape != target.shape:
            raise ValueError(f"LoRA state {key!r} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.copy_(value)


# --------------------------------------------------------------------------- server


def aggregate_lora(
    states: Sequence[Mapping[str, Tensor | np.ndarray]], num_examples: Sequence[int]
) -> dict[str, Tensor]:
    """B_{i+1} = Σ_k (n_k/m_i)·B_k over the sampled clients, m_i = Σ_k n_k [paper Alg. 1].

    Averages every factor the clients sent, key by key: the B's for FedSVD and
    FFA-LoRA (A is not aggregated, every client used the same Â_i), A and B
    separately for FedAvg-LoRA.

    Parameters
    ----------
    states
        One flat LoRA dict per client; all must have the same keys.
    num_examples
        n_k of each client (its ``num-examples``).

    Returns
    -------
    dict[str, Tensor]
        The weighted means, float32.
    """
    if not states:
        raise ValueError("no client states to aggregate")
    keys = set(states[0])
    for k, state in enumerate(states):
        if set(state) != keys:
            raise ValueError(f"client {k} sent LoRA keys {sorted(state)}, client 0 sent {sorted(keys)}")
    return aggregate_factors(states, num_examples)


def svd_due(server_round: int, svd_period: int, warmup: int = 0) -> bool:
    """Whether FedSVD re-factorizes after aggregating round ``server_round`` (§2).

    With Flower's 1-based ``server_round`` = i+1: due iff ``svd_period`` > 0,
    (i+1) mod ``svd_period`` = 0 and i+1 > ``warmup`` ([code] defaults: period
    1, warm-up 0). ``svd_period = 0`` never re-factorizes, which is FFA-LoRA (§5).
    """
    return svd_period > 0 and server_round % svd_period == 0 and server_round > warmup


def _row_signs(vh: Tensor) -> Tensor:
    """±1 per row so that each row's largest-magnitude entry becomes positive."""
    pivot = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return torch.where(pivot < 0, -1.0, 1.0).to(vh)


def _complete_rows(kept: Tensor, previous: Tensor, rank: int) -> Tensor:
    """Extend the k orthonormal rows ``kept`` to ``rank`` rows by Gram–Schmidt (§2 "Rank-deficient M").

    Candidates are the previous Â's rows, then the standard basis (reached only
    if the previous Â is itself rank-deficient). Projecting out twice keeps
    the rows orthonormal to float64 precision ("twice is enough").
    """
    d_in = previous.shape[1]
    rows = list(kept)
    candidates = [*previous, *torch.eye(d_in, dtype=previous.dtype, device=previous.device)]
    for candidate in candidates:
        if len(rows) == rank:
            break
        norm = candidate.norm()
        if norm == 0:
            continue
        v = candidate
        if rows:
            basis = torch.stack(rows)
            for _ in range(2):
                v = v - basis.T @ (basis @ v)
        if v.norm() > GRAM_SCHMIDT_RTOL * norm:
            rows.append(v / v.norm())
    return torch.stack(rows)


def refactorize(
    B: Tensor,  # noqa: N803 — the paper's symbols
    A: Tensor,  # noqa: N803
    *,
    solver: str = "qr",
    niter: int = 2,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """FedSVD's SVD step, B̂ = U_r Σ_r and Â = V_rᵀ with M = B·A = U Σ Vᵀ [paper Eq. 7, §2].

    ``solver="qr"`` is the exact route of §2 "Computation [fedlr]", which
    never forms the d_out×d_in matrix M: B = Q_B R_B and Aᵀ = Q_A R_A (reduced
    QR), then the r×r SVD R_B R_Aᵀ = U′ Σ V′ᵀ gives U = Q_B U′ and V = Q_A V′.
    ``solver="randomized"`` forms M and uses ``torch.svd_lowrank`` (Halko et
    al.) with ``niter`` power iterations, as in [paper Table 5].

    Singular values σ_j ≤ 1e-7·σ₁ count as zero. Their rows of Â are completed
    by Gram–Schmidt of the previous A's rows against the kept ones, with zero
    columns in B̂, so exactness and orthonormality hold even for B = 0 (§2
    "Rank-deficient M"). Each row of Â is signed so its largest-magnitude
    entry is positive. Everything runs in float64 and is cast back.

    Parameters
    ----------
    B
        Aggregated B_{i+1}, shape (d_out, r) — unscaled (α/r is never folded in).
    A
        The round's Â_i, shape (r, d_in).
    solver
        ``"qr"`` (exact, default) or ``"randomized"``.
    niter
        Power iterations of the randomized solver (paper: 2 or 10).
    seed
        Seed of the randomized solver's test matrix, for a reproducible Â sequence.

    Returns
    -------
    tuple[Tensor, Tensor]
        (B̂_{i+1}, Â_{i+1}) with B̂Â = B·A and ÂÂᵀ = I_r, each in its input's dtype and device.
    """
    if solver not in SVD_SOLVERS:
        raise ValueError(f"solver={solver!r}; allowed: {', '.join(SVD_SOLVERS)}")
    d_out, rank = B.shape
    if A.shape[0] != rank or not rank <= min(d_out, A.shape[1]):
        raise ValueError(f"B {tuple(B.shape)} and A {tuple(A.shape)} are not factors of rank r <= min(d_out, d_in)")
    # On the CPU: the matrices are at most d_out×r and r×d_in (M for the
    # randomized solver), and the seeded test matrix then needs no device RNG.
    b, a = B.detach().double().cpu(), A.detach().double().cpu()
    if solver == "qr":
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        u_core, sigma, vh_core = torch.linalg.svd(r_b @ r_a.T)
        u, vh = q_b @ u_core, vh_core @ q_a.T
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            u, sigma, v = torch.svd_lowrank(b @ a, q=rank, niter=niter)
        vh = v.T
    keep = int((sigma > RANK_RTOL * sigma[0]).sum()) if sigma[0] > 0 else 0
    b_new = torch.cat([u[:, :keep] * sigma[:keep], b.new_zeros(d_out, rank - keep)], dim=1)
    a_new = vh[:keep] if keep == rank else _complete_rows(vh[:keep], a, rank)
    # Singular pairs are defined up to a joint sign; fixing it makes Â a
    # function of M alone (for distinct σ's), which the decentralized variant
    # needs (§2) and which makes the step independent of the LAPACK build.
    sign = _row_signs(a_new)
    return (b_new * sign).to(B), (a_new * sign[:, None]).to(A)


def refactorize_state(
    state: Mapping[str, Tensor | np.ndarray], *, solver: str = "qr", niter: int = 2, seed: int = 0
) -> dict[str, Tensor]:
    """Apply :func:`refactorize` to every layer of a flat ``{"<layer>.A", "<layer>.B"}`` dict.

    The server's whole SVD step (§2): pass the aggregated B's together with the
    round's Â's; the result is the next round's broadcast. Layer ℓ (in sorted
    key order) seeds the randomized solver with ``derive_seed(seed, ℓ)``.

    Returns
    -------
    dict[str, Tensor]
        (Â_{i+1}, B̂_{i+1}) for every layer, float32, same keys as ``state``.
    """
    layers = sorted({_split_key(key)[0] for key in state})
    result: dict[str, Tensor] = {}
    for index, layer in enumerate(layers):
        try:
            b, a = (torch.as_tensor(state[f"{layer}.{f}"], dtype=torch.float32) for f in ("B", "A"))
        except KeyError as err:
            raise ValueError(f"refactorize_state needs both A and B of layer {layer!r}; missing {err}") from None
        result[f"{layer}.B"], result[f"{layer}.A"] = refactorize(
            b, a, solver=solver, niter=niter, seed=derive_seed(seed, index)
        )
    return result


# --------------------------------------------------------------------------- diagnostics


def orthonormality_error(A: Tensor) -> float:  # noqa: N803
    """‖AAᵀ − I_r‖_F in float64 (§7 "Orthonormality"; ≤ 1e-5 after every SVD step)."""
    a = A.detach().double()
    return float(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype, device=a.device)))


def reconstruction_error(B_old: Tensor, A_old: Tensor, B_new: Tensor, A_new: Tensor) -> float:  # noqa: N803
    """‖B̂Â − B Â_old‖_F / ‖B Â_old‖_F in float64 (§7 "Reconstruction").

    0 when both products are zero, ∞ when only the old one is.
    """
    old = B_old.detach().double() @ A_old.detach().double()
    diff = float(torch.linalg.matrix_norm(B_new.detach().double() @ A_new.detach().double() - old))
    den = float(torch.linalg.matrix_norm(old))
    if den == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / den
