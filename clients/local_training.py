"""A client's local training on the privacy axis: plain SGD, or DP-SGD with a
ledger that outlives the round (``shared/specs/fedsvd.md`` §3; DP-SGD: Abadi
et al., CCS 2016; the setting of Lee et al., FedSVD, arXiv 2505.12805).

Every trainer (dense and LoRA) calls :func:`train_local`, so privacy composes
with the method: the method decides which parameters train (``requires_grad``),
this module decides how.

Under ``privacy.mechanism = "dpsgd"`` the client keeps, in its per-node
``context.state`` (which fedlr persists to the run directory and restores on
resume), one ``ConfigRecord`` under :data:`PRIVACY_KEY`:

* ``calibrated_noise_multiplier`` — σ_k, calibrated once, at the client's
  first round, for the worst case of training in every one of the R rounds
  (T = R·τ_k steps at q_k = b/n_k; spec §3.1);
* the :class:`~fedlr.privacy.ClientAccountant` ledger (``mechanism``,
  ``noise_multiplier``, ``sample_rate``, ``steps``), so ε is cumulative over
  every round the client took part in (spec §3.2, §8 "Fresh engines").

The reply then carries the client's cumulative ``epsilon`` and no
``train_loss``: the loss of the private data is not privatized, and sending
it would fall outside the guarantee (``fedlr.privacy.dp_local_sgd``).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context
from torch import nn

from fedlr.config import Config
from fedlr.training import local_sgd

PRIVACY_KEY = "dpsgd"  # this client's entry in context.state
LEDGER_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")  # ClientAccountant.state_dict()


def train_local(
    cfg: Config,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    context: Context,
    seed: int,
    proximal_mu: float = 0.0,
    max_grad_norm: float = 0.0,
) -> dict[str, float]:
    """One round of local training of ``model``'s trainable parameters, in place.

    Parameters
    ----------
    cfg
        Resolved configuration: ``local_epochs``, ``batch_size``, ``lr``,
        ``momentum``, ``weight_decay`` and ``privacy.*``.
    model
        Only parameters with ``requires_grad`` train.
    x, y
        The client's examples, on the model's device.
    context
        The node's context; under DP-SGD its ``state`` holds σ_k and the ledger.
    seed
        Keys the batch order (and, under DP-SGD, the Poisson batches and the noise).
    proximal_mu
        FedProx's μ (0: none).
    max_grad_norm
        Global gradient-norm clip of non-private training (0: none); DP-SGD
        clips each example's gradient to ``privacy.clip`` instead.

    Returns
    -------
    dict[str, float]
        The reply's metrics: ``{"train_loss": ...}``, or under DP-SGD
        ``{"epsilon": ...}``, the client's cumulative ε after this round.

    Raises
    ------
    fedlr.privacy.BudgetExceededError
        Under DP-SGD, before any step, if this round would take the client's
        ε above ``privacy.epsilon`` (the server then stops the run).
    """
    if cfg["privacy.mechanism"] == "dpsgd":
        return _train_dpsgd(cfg, model, x, y, context=context, seed=seed, proximal_mu=proximal_mu)
    loss = local_sgd(
        model, x, y,
        epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
        momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
        proximal_mu=proximal_mu, max_grad_norm=max_grad_norm, seed=seed,
    )
    return {"train_loss": loss}


def _train_dpsgd(
    cfg: Config, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, context: Context, seed: int, proximal_mu: float
) -> dict[str, float]:
    # Imported here: Opacus takes seconds to import, in every Ray actor, and
    # only private runs need it.
    from fedlr.privacy import (
        ClientAccountant,
        PrivacyBudget,
        calibrate_noise_multiplier,
        dp_local_sgd,
        dp_steps,
        sample_rate,
    )

    budget = PrivacyBudget(cfg["privacy.epsilon"], cfg["privacy.delta"])
    accountant = ClientAccountant(cfg["privacy.accountant"])
    if PRIVACY_KEY in context.state:
        record = context.state[PRIVACY_KEY]
        noise_multiplier = float(record["calibrated_noise_multiplier"])
        accountant.load_state_dict({key: record[key] for key in LEDGER_KEYS})
    else:
        n, b = len(y), cfg["batch_size"]
        noise_multiplier = calibrate_noise_multiplier(
            budget, sample_rate=sample_rate(b, n), rounds=cfg["rounds"],
            steps_per_round=dp_steps(n, b, epochs=cfg["local_epochs"]), accountant=cfg["privacy.accountant"],
        )
    dp_local_sgd(
        model, x, y,
        epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
        momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], proximal_mu=proximal_mu,
        noise_multiplier=noise_multiplier, max_grad_norm=cfg["privacy.clip"],
        accountant=accountant, seed=seed, budget=budget,
    )
    context.state[PRIVACY_KEY] = ConfigRecord(
        {"calibrated_noise_multiplier": noise_multiplier, **accountant.state_dict()}
    )
    return {"epsilon": accountant.epsilon(budget.delta)}
