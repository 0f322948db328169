"""A client's layer-wise LDP release (FedRE, Xiao et al., arXiv 2505.04889;
``shared/specs/fedre.md`` §3–§5, §7), for every update codec.

A trainer calls :func:`open_release` *before* local training, while its model
still holds the round's public starting point (the global model, FedMUD's
re-drawn factors, LoRA's broadcast factors): the per-layer budgets come from
the PSI of the client's preference on the public split and that model only
(§4), never from private data. After training it calls
:meth:`Release.privatize` on exactly the tensors it will upload, with their
values at the start of the round; the release is start + ũ, so every codec's
message format and server arithmetic stay as they are.

What travels besides the arrays and ``num-examples`` (§5 "What the client
sends"): the per-layer budgets ``ldp-epsilons`` and ``ldp-deltas`` (lists,
layers in upload order) and the client's cumulative ``epsilon`` (§7), all in
the MetricRecord. They are public; the server derives each layer's noise
variance from them (:func:`fedlr.privacy.ldp.noise_variance`), so no variance
and no clipped norm is sent. The training loss is not sent: it is computed on
private data and the release does not protect it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import torch
from flwr.app import ConfigRecord, Context
from torch import Tensor, nn

from fedlr.config import Config, parse_tiers
from fedlr.data import load_federated_data
from fedlr.privacy.ldp import (
    NOISE_STREAM,
    LayerBudget,
    LDPLedger,
    client_preference,
    network_layer_of,
    privatize_update,
    psi_scores,
    public_indices,
    release_budgets,
    sensitive_mask,
    trained_layers,
)
from fedlr.training import derive_seed

# This client's LDPLedger in ``context.state``, persisted with it for --resume.
LEDGER_KEY = "ldp-ledger"


_PUBLIC: dict[tuple, tuple[Tensor, Tensor]] = {}


def _public_split(cfg: Config, device: torch.device) -> tuple[Tensor, Tensor]:
    """The public calibration split P (§4) on ``device``, kept per process."""
    data = load_federated_data(cfg)
    key = (id(data), str(device))
    if key not in _PUBLIC:
        idx = public_indices(len(data.y_train), cfg["seed"])
        _PUBLIC.clear()
        _PUBLIC[key] = (torch.from_numpy(data.x_train[idx]).to(device), torch.from_numpy(data.y_train[idx]).to(device))
    return _PUBLIC[key]


_PSI: dict[tuple[str, str], dict[str, float]] = {}


def _psi(
    cfg: Config, model: nn.Module, layer_of: Callable[[str], str], family: str, input_shape: tuple[int, ...]
) -> dict[str, float]:
    """PSI of a mask family on ``model``'s current trainable parameters (§4), kept per process.

    Every client of a round starts from the same public model, so the clients
    of one mask family that land on this actor share one computation; the key
    is a digest of the parameters, so nothing stale is ever reused.
    """
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().numpy().tobytes())
    key = (digest.hexdigest(), family)
    if key not in _PSI:
        if all(k[0] != key[0] for k in _PSI):
            _PSI.clear()  # a new round's model: the old scores can never match again
        device = next(model.parameters()).device
        x, y = _public_split(cfg, device)
        _PSI[key] = psi_scores(model, x, y, sensitive_mask(family, input_shape).to(device), layer_of)
    return _PSI[key]


class Release:
    """One client's release of one round: its per-layer budgets and its noise generator.

    Parameters
    ----------
    cfg
        The resolved configuration (``privacy.*``).
    partition_id, server_round
        Who and when: they seed the noise, which is never reused across rounds.
    epsilon, delta
        (ε_k, δ) of the release; δ = 0 for Laplace noise.
    budgets
        Layer → (ε_{k,l}, δ_{k,l}), in the order the layers appear in the
        upload; they must compose to (ε_k, δ) (§5, basic composition).
    layer_of
        Upload key → layer.
    context
        The node's context; its state keeps the client's :class:`LDPLedger`.
    """

    def __init__(
        self,
        cfg: Config,
        partition_id: int,
        server_round: int,
        epsilon: float,
        delta: float,
        budgets: dict[str, LayerBudget],
        layer_of: Callable[[str], str],
        context: Context,
    ) -> None:
        composed = (math.fsum(b.epsilon for b in budgets.values()), math.fsum(b.delta for b in budgets.values()))
        if not (math.isclose(composed[0], epsilon, rel_tol=1e-9) and math.isclose(composed[1], delta, rel_tol=1e-9)):
            raise ValueError(f"layer budgets compose to {composed}, not to the release's ({epsilon}, {delta})")
        self.cfg = cfg
        self.epsilon, self.delta = epsilon, delta
        self.budgets = budgets
        self.layer_of = layer_of
        self.context = context
        seed = derive_seed(cfg["seed"], NOISE_STREAM, server_round, partition_id)
        self.generator = torch.Generator().manual_seed(seed)

    def privatize(
        self, upload: Mapping[str, Tensor], start: Mapping[str, Tensor], gains: Mapping[str, float] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, float | list[float]]]:
        """Release ``upload``: start + ũ with ũ the clipped, noised ``upload − start`` (§5).

        Parameters
        ----------
        upload
            Everything the client will send (CPU tensors), after training.
        start
            The same entries at the start of the round (what the server sent,
            or what both sides re-draw from a seed).
        gains
            Public per-entry gains: clip and noise g·(upload − start) instead,
            in the units of what the server merges (:func:`privatize_update`).

        Returns
        -------
        tuple[dict[str, Tensor], dict[str, float | list[float]]]
            The arrays to send, and the MetricRecord entries ``ldp-epsilons``
            and ``ldp-deltas`` (per layer, in upload order) and ``epsilon``
            (cumulative, after this release).
        """
        update = {k: upload[k].detach().cpu() - start[k].detach().cpu() for k in upload}
        noised, stats = privatize_update(
            update, self.layer_of, self.budgets, self.cfg["privacy.clip"], self.cfg["privacy.ldp_noise"], self.generator,
            gains,
        )
        released = {k: start[k].detach().cpu() + v for k, v in noised.items()}
        epsilons = [stats[layer].epsilon for layer in stats]
        deltas = [stats[layer].delta for layer in stats]
        ledger = client_ledger(self.context)
        ledger.record(self.epsilon, self.delta)
        self.context.state[LEDGER_KEY] = ConfigRecord(ledger.state_dict())
        return released, {"epsilon": ledger.epsilon, "ldp-epsilons": epsilons, "ldp-deltas": deltas}


def client_ledger(context: Context) -> LDPLedger:
    """This client's cumulative (ε, δ) so far, from ``context.state``."""
    return LDPLedger.from_state(context.state[LEDGER_KEY]) if LEDGER_KEY in context.state else LDPLedger()


def open_release(
    cfg: Config, partition_id: int, server_round: int, model: nn.Module, context: Context
) -> Release | None:
    """This round's release for ``partition_id``, or None unless ``privacy.mechanism = "ldp"``.

    Call it before local training: PSI (§4) is computed on ``model`` as the
    server sent it, over its trainable parameters grouped by layer, for the
    client's sensitive-feature mask, on the public split; the budget split
    (§5) follows from it and the client's tier.

    Raises
    ------
    BudgetExceededError
        If ``privacy.epsilon_total`` is set and this release would exceed it.
    """
    if cfg["privacy.mechanism"] != "ldp":
        return None
    data = load_federated_data(cfg)
    tiers, masks = parse_tiers(cfg["privacy.tiers"]), cfg["privacy.masks"].split(",")
    preference = client_preference(cfg["seed"], partition_id, cfg["num_clients"], tiers, masks)
    epsilon_k = cfg["privacy.epsilon"] * preference.multiplier
    ledger, cap = client_ledger(context), cfg["privacy.epsilon_total"]
    if cap > 0 and ledger.would_exceed(epsilon_k, cap):
        from fedlr.privacy.dpsgd import BudgetExceededError  # Opacus only when a budget ends

        raise BudgetExceededError(
            f"round {server_round}: a release at epsilon = {epsilon_k:g} would take this client from "
            f"{ledger.epsilon:g} to {ledger.epsilon + epsilon_k:g} > privacy.epsilon_total = {cap:g}"
        )
    layer_of = network_layer_of(cfg, data.input_shape, data.num_classes)
    layers = trained_layers(model, layer_of)
    sensitivity = cfg["privacy.allocation"] == "sensitivity"
    psi = _psi(cfg, model, layer_of, preference.mask, data.input_shape) if sensitivity else None
    budgets = release_budgets(
        layers, psi, allocation=cfg["privacy.allocation"], epsilon=epsilon_k, delta=cfg["privacy.delta"],
        noise=cfg["privacy.ldp_noise"], beta=cfg["privacy.beta"],
    )
    delta = cfg["privacy.delta"] if cfg["privacy.ldp_noise"] == "gaussian" else 0.0
    return Release(cfg, partition_id, server_round, epsilon_k, delta, budgets, layer_of, context)
