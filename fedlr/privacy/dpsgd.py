"""Client-side DP-SGD on Opacus, with a per-client accountant that persists across rounds.

The guarantee is example-level (ε, δ)-DP for each client's own data against an
untrusted server; the global model inherits it by post-processing. It is *not*
client-level DP (``shared/specs/fedsvd.md`` §1 "Threat model"; every § below
refers to that spec). DP-SGD itself is Abadi et al., *Deep Learning with
Differential Privacy*, CCS 2016: clip each example's gradient to norm C, add
N(0, σ²C²) to the sum, divide by the expected batch size.

Three pieces, used in this order by a trainer:

1. :func:`calibrate_noise_multiplier`, once per run and client. **Worst case
   [fedlr, §3.1]:** the client is assumed to be sampled in *every* one of the R
   rounds, T = R·τ steps, with no amplification from client sampling. Cheaper
   assumptions (expected participation R·K′/K as in [code], or amplification by
   secret client sampling) are not per-client guarantees, because the sampling
   is done by the untrusted server.
2. :class:`ClientAccountant`, whose history of (σ, q, steps) the client keeps
   in its per-node state between rounds: a fresh ``PrivacyEngine`` per round,
   as in [code] and Flower's Opacus example, would reset ε every round (§8).
3. :func:`dp_local_sgd`, one round of local training, which checks the budget
   *before* the first noisy step and records every step in the accountant.

Why not ``PrivacyEngine.make_private``: it needs a ``DataLoader`` and owns the
accountant, whereas fedlr's client data are in-memory tensors and the
accountant must outlive the round. :func:`dp_local_sgd` uses the same
separable parts ``make_private`` assembles — ``GradSampleModule`` (hooks
mode, §3.4) and ``DPOptimizer`` with Opacus's own accountant step hook — and
draws Poisson batches exactly as Opacus's ``UniformWithReplacementSampler``
does (each example independently with probability q), from a seeded generator.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedlr.training import derive_seed

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceededError",
    "ClientAccountant",
    "PrivacyBudget",
    "calibrate_noise_multiplier",
    "dp_local_sgd",
    "dp_steps",
    "sample_rate",
]

# Opacus accountants whose history is a list of (σ, q, steps), which is what
# ClientAccountant serializes. "gdp" is an asymptotic approximation, not a bound.
ACCOUNTANTS = ("rdp", "prv")
# Seed streams under the seed given to dp_local_sgd.
_SAMPLING_STREAM, _NOISE_STREAM = 0, 1

HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class PrivacyBudget:
    """A per-client (ε, δ) target (§3: δ = 1e-5, ε ∈ {3, 6}).

    ε = ∞ (no privacy) is not a budget: train without DP-SGD instead.
    """

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon={self.epsilon}; allowed: a finite number > 0 (train non-privately for inf)")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta}; allowed: 0 < delta < 1")


class BudgetExceededError(RuntimeError):
    """Raised before a round whose steps would take a client's ε past its budget."""


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = b/n of a client with n examples, capped at 1."""
    if batch_size < 1 or num_examples < 1:
        raise ValueError(f"batch_size={batch_size} and num_examples={num_examples} must be >= 1")
    return min(1.0, batch_size / num_examples)


def dp_steps(num_examples: int, batch_size: int, *, epochs: int | None = None, steps: int | None = None) -> int:
    """Noisy optimizer steps in one round: τ = ``steps``, or ``epochs`` × ⌊n/b⌋ (at least 1 per epoch).

    An epoch under Poisson sampling is ⌊1/q⌋ = ⌊n/b⌋ steps, the length of
    Opacus's ``DPDataLoader``. Use this one function both to plan the
    calibration and in :func:`dp_local_sgd`, so the two never disagree.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    count = steps if steps is not None else epochs * max(1, num_examples // batch_size)
    if count < 1:
        raise ValueError(f"a round needs at least one step, got epochs={epochs}, steps={steps}")
    return count


def _check_accountant(mechanism: str) -> None:
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"privacy accountant={mechanism!r}; allowed: {', '.join(ACCOUNTANTS)}")


@functools.lru_cache(maxsize=256)  # clients of equal size share σ; a bisection costs seconds
def calibrate_noise_multiplier(
    budget: PrivacyBudget,
    *,
    sample_rate: float,
    rounds: int,
    steps_per_round: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """σ_k for the worst case of participating in every round: T = R·τ steps at rate q_k (§3.1).

    Opacus's ``get_noise_multiplier`` bisects σ until ε(σ, q, T) ∈
    [ε − tolerance, ε], so the returned σ never overshoots the budget at the
    planned T. Calibration and tracking must use the same accountant (Opacus's
    ``get_noise_multiplier`` defaults to RDP, ``PrivacyEngine`` to PRV).

    Parameters
    ----------
    budget
        Target (ε, δ) of the whole run.
    sample_rate
        q_k = b/n_k (:func:`sample_rate`).
    rounds
        R, the number of rounds of the run.
    steps_per_round
        τ (:func:`dp_steps`).
    accountant
        ``"rdp"`` (default) or ``"prv"``.
    epsilon_tolerance
        Bisection tolerance on ε.

    Returns
    -------
    float
        The noise multiplier σ_k (noise std over clipping norm).
    """
    _check_accountant(accountant)
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds={rounds} and steps_per_round={steps_per_round} must be >= 1")
    return float(
        get_noise_multiplier(
            target_epsilon=budget.epsilon,
            target_delta=budget.delta,
            sample_rate=sample_rate,
            steps=rounds * steps_per_round,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )


@functools.lru_cache(maxsize=1024)
def _epsilon(mechanism: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    # Memoized: one evaluation costs ~0.25 s (RDP) to ~0.6 s (PRV), and the ε
    # projected before a round is exactly the one reported after it.
    if not history:
        return 0.0
    scratch = create_accountant(mechanism)
    scratch.history = list(history)
    return float(scratch.get_epsilon(delta=delta))


class ClientAccountant:
    """One client's privacy ledger across rounds, around an Opacus RDP or PRV accountant (§3.2).

    The ledger is Opacus's history, a list of (σ, q, steps) entries in which
    consecutive steps with the same (σ, q) are merged. :meth:`state_dict`
    turns it into plain Python lists, so it fits Flower's per-node
    ``context.state`` (a ``ConfigRecord``) or a JSON checkpoint, and
    :meth:`load_state_dict` restores it in the next round: ε is cumulative
    over every round the client took part in.

    Parameters
    ----------
    mechanism
        ``"rdp"`` (default) or ``"prv"``; must be the one used for calibration.
    """

    def __init__(self, mechanism: str = "rdp") -> None:
        _check_accountant(mechanism)
        self._accountant: IAccountant = create_accountant(mechanism)

    @property
    def mechanism(self) -> str:
        """The Opacus accounting mechanism, ``"rdp"`` or ``"prv"``."""
        return self._accountant.mechanism()

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the (σ, q, steps) entries."""
        return list(self._accountant.history)

    @property
    def steps(self) -> int:
        """Noisy steps taken so far, over all rounds."""
        return sum(n for _, _, n in self._accountant.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative ε(δ) of every step recorded so far; 0 before the first."""
        return _epsilon(self.mechanism, tuple(self._accountant.history), delta)

    def projected_epsilon(self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε(δ) the accountant will report after ``steps`` more steps at (σ, q).

        The extra steps are merged into the history exactly as Opacus's
        ``step`` merges them, so the value is the one reported after the round,
        not an approximation of it.
        """
        history = list(self._accountant.history)
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        if history and history[-1][:2] == entry[:2]:
            history[-1] = (*entry[:2], history[-1][2] + entry[2])
        else:
            history.append(entry)
        return _epsilon(self.mechanism, tuple(history), delta)

    def would_exceed(self, budget: PrivacyBudget, steps: int, *, noise_multiplier: float, sample_rate: float) -> bool:
        """Whether ``steps`` more steps at (σ, q) would take ε(δ) above ``budget.epsilon``.

        Check it before a round: a client calibrated for R rounds returns
        False for each of its first R rounds, and True once a run goes longer
        than planned (a resumed or extended run) or takes more steps per round.
        """
        projected = self.projected_epsilon(
            budget.delta, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps
        )
        return projected > budget.epsilon

    def attach(self, optimizer: DPOptimizer, sample_rate: float) -> None:
        """Record every noisy step of ``optimizer`` at rate q, through Opacus's own accountant hook."""
        optimizer.attach_step_hook(self._accountant.get_optimizer_hook_fn(sample_rate))

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain Python.

        Keys: ``mechanism`` (str), ``noise_multiplier`` and ``sample_rate``
        (lists of float) and ``steps`` (list of int), one element per entry.
        """
        history = self._accountant.history
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": [float(s) for s, _, _ in history],
            "sample_rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ledger saved by :meth:`state_dict` (replaces the current one).

        Raises
        ------
        ValueError
            If the mechanism differs (ε of different accountants do not
            compose) or the lists have different lengths.
        """
        if state["mechanism"] != self.mechanism:
            raise ValueError(f"a {state['mechanism']!r} ledger cannot be loaded into a {self.mechanism!r} accountant")
        columns = [list(state[key]) for key in ("noise_multiplier", "sample_rate", "steps")]
        if len({len(c) for c in columns}) != 1:
            raise ValueError(f"privacy ledger columns have different lengths: {[len(c) for c in columns]}")
        self._accountant.history = [(float(s), float(q), int(n)) for s, q, n in zip(*columns, strict=True)]


def _check_dp_model(model: nn.Module) -> None:
    # A BatchNorm mixes the examples of a batch (and updates its running
    # statistics from them) even when frozen, which Opacus's validator lets
    # through; per-example clipping then bounds nothing (§8).
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if batch_norms:
        raise ValueError(
            f"DP-SGD cannot train a model with BatchNorm ({', '.join(batch_norms)}): it mixes examples; "
            "use norm = 'group' or 'none'"
        )
    ModuleValidator.validate(model, strict=True)


def dp_local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: ClientAccountant,
    seed: int,
    epochs: int | None = None,
    steps: int | None = None,
    budget: PrivacyBudget | None = None,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
) -> tuple[float, int]:
    """One round of DP-SGD on (x, y), in place, updating only parameters with ``requires_grad`` (§3).

    Each step draws a Poisson batch (every example independently with
    q = :func:`sample_rate`), computes per-example gradients of the trainable
    parameters only (for FedSVD/FFA-LoRA: the ``lora_B`` weights), clips each
    example's to norm C, adds N(0, σ²C²) and divides by the expected batch
    size q·n, then takes an SGD step (a fresh optimizer per round; no
    momentum by default [paper]). An empty Poisson batch still takes its noise-only step:
    skipping it would reveal that the batch was empty. There is no gradient
    accumulation across ``backward()`` calls (§3.3).

    Parameters
    ----------
    model
        Trained in place; frozen parameters are never touched and get no
        per-example gradients. Must not contain BatchNorm.
    x, y
        The client's examples and labels (on the model's device).
    batch_size
        Expected Poisson batch size b, so q = b/n.
    lr
        SGD learning rate.
    noise_multiplier
        σ, from :func:`calibrate_noise_multiplier`.
    max_grad_norm
        Per-example clipping norm C (§3: 2).
    accountant
        The client's ledger; every noisy step is recorded in it.
    seed
        Keys the batch sampling and the noise, e.g.
        ``derive_seed(run_seed, stream, round, partition)``.
    epochs, steps
        Exactly one: the round's length (:func:`dp_steps`); the spec uses τ
        ``steps`` per round.
    budget
        If given, the round is refused before its first step when it would
        take the client's ε above ``budget.epsilon``.
    momentum, weight_decay
        Of the SGD step, as in :func:`fedlr.training.local_sgd`.
    proximal_mu
        FedProx's μ: the gradient μ(w − w_t) of (μ/2)·‖w − w_t‖², w_t being
        the weights at entry, is added to the privatized gradient. Like
        momentum and weight decay it depends on no example, so it is
        post-processing and costs no privacy; clipping it would only bias it.

    Returns
    -------
    tuple[float, int]
        Mean cross-entropy over the examples drawn, and the number of noisy
        steps taken. The loss is *not* privatized: sending it to an untrusted
        server is outside the DP guarantee.

    Raises
    ------
    BudgetExceededError
        If ``budget`` is given and this round would exceed it; the model and
        the accountant are then unchanged.
    """
    n = len(y)
    q = sample_rate(batch_size, n)
    num_steps = dp_steps(n, batch_size, epochs=epochs, steps=steps)
    sigma = float(noise_multiplier)
    if budget is not None and accountant.would_exceed(budget, num_steps, noise_multiplier=sigma, sample_rate=q):
        raise BudgetExceededError(
            f"this round's {num_steps} DP-SGD steps (sigma={sigma:.4g}, q={q:.4g}) would take the client from "
            f"epsilon={accountant.epsilon(budget.delta):.4f} to "
            f"{accountant.projected_epsilon(budget.delta, noise_multiplier=sigma, sample_rate=q, steps=num_steps):.4f}"
            f" > budget {budget.epsilon} (delta={budget.delta}); the noise was calibrated for fewer rounds or steps"
        )
    _check_dp_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    # loss_reduction="sum" for the per-example gradients (an empty batch then
    # has loss 0, not NaN) and the optimizer's mean over the *expected* batch
    # size: together this is Opacus's Poisson-sampling "mean" semantics.
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    gsm.forbid_grad_accumulation()
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        expected_batch_size=round(q * n),
        loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(derive_seed(seed, _NOISE_STREAM)),
    )
    accountant.attach(optimizer, q)
    sampler = torch.Generator().manual_seed(derive_seed(seed, _SAMPLING_STREAM))
    gsm.train()
    total, count = 0.0, 0
    try:
        with warnings.catch_warnings():
            # The first adapter's input x·Aᵀ needs no gradient, so PyTorch warns
            # that the full backward hook sees output gradients only — all that
            # Opacus's Linear grad sampler uses (per-example backprop ⊗ activation).
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            for _ in range(num_steps):
                idx = (torch.rand(n, generator=sampler) < q).nonzero().squeeze(1).to(x.device)
                loss = F.cross_entropy(gsm(x[idx]), y[idx], reduction="sum")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if anchor is None:
                    optimizer.step()
                elif optimizer.pre_step():  # clip, noise, scale and account: DPOptimizer.step's first half
                    for p, a in zip(params, anchor, strict=True):
                        p.grad.add_(p.detach() - a, alpha=proximal_mu)
                    optimizer.original_optimizer.step()
                total += float(loss.detach())
                count += len(idx)
        optimizer.zero_grad(set_to_none=True)
    finally:
        # Remove the hooks and per-sample attributes even on failure, so the
        # model object can be reused next round (Opacus refuses double hooks).
        gsm.to_standard_module()
    return total / max(count, 1), num_steps
