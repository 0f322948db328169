"""A privacy probe for layer-wise LDP: analytic first-layer gradient inversion
of single-sample releases (``shared/specs/fedre.md`` §9 "Privacy probe", claim F2).

For a Linear first layer with bias, the gradient of one sample's loss is
G = g_b xᵀ for the weight and g_b for the bias, so the input is recovered
exactly as x = Gᵀ g_b / ‖g_b‖² (the observation behind Phong et al., *Privacy-
Preserving Deep Learning via Additively Homomorphic Encryption*, IEEE TIFS
2018, and the analytic step of DLG-style attacks, Zhu et al., NeurIPS 2019).
One SGD step's update is −η times the gradient and clipping scales weight and
bias alike (one layer), so the same formula applied to a *released* update
gives the attacker's estimate x̂; the LDP noise is all that stands in its way.
Unlike optimization-based inversion (DLG, Geiping et al. 2020), it needs no
iterations, so hundreds of probes take milliseconds on the MLPs here.

Reconstruction quality is reported inside the client's sensitive region M and
outside it, as the spec asks (MSE), and as **cosine similarity** between x̂
and x restricted to the region. Cosine is the headline number
(``attack_similarity``): it is 1 for a perfect reconstruction and about 0 when
x̂ is noise, it is bounded, and it ignores the scale of x̂, which the division
by the noisy ‖g̃_b‖² makes heavy-tailed; MSE inherits that heavy tail.
Probes whose region of x is all zero (blank digit borders) have no defined
cosine and are skipped for that region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedlr.config import Config
from fedlr.data import FederatedData
from fedlr.privacy.ldp import (
    LayerBudget,
    network_layer_of,
    parametrized_layers,
    privatize_update,
    psi_scores,
    public_indices,
    release_budgets,
    sensitive_mask,
    trained_layers,
)
from fedlr.training import derive_seed

__all__ = ["attack_summary", "first_layer", "invert_first_layer", "probe_releases", "single_sample_updates"]

ATTACK_STREAM = 14  # seed stream of the probes' noise (cf. fedlr.privacy.ldp.NOISE_STREAM)


def first_layer(model: nn.Module) -> str:
    """The name of the first parametrized layer; it must be a Linear with bias."""
    name = parametrized_layers(model)[0]
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear) or module.bias is None:
        raise ValueError(f"the first layer {name!r} is {type(module).__name__}; the inversion needs a Linear with bias")
    return name


def invert_first_layer(weight_update: Tensor, bias_update: Tensor) -> Tensor:
    """x̂ = Gᵀ g_b / ‖g_b‖² from a (released) first-layer update (G, g_b); exact without noise.

    Any common scale of G and g_b (the learning rate, the sign of a step,
    clipping) cancels. Returns zeros when g_b = 0, which carries no information.
    """
    norm2 = float(bias_update.double().pow(2).sum())
    if norm2 == 0.0:
        return torch.zeros(weight_update.shape[1], dtype=weight_update.dtype)
    return weight_update.T @ bias_update / norm2


def single_sample_updates(model: nn.Module, x: Tensor, y: Tensor, lr: float) -> dict[str, Tensor]:
    """One SGD step's update −η·∇ℓ(x_i) of every trainable parameter, for each sample i (batch 1).

    Returns name → tensor of shape (N, *parameter shape), via per-sample
    gradients (``torch.func``); ``model`` is unchanged.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {name: -lr * g for name, g in grads.items()}


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def probe_releases(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    budgets: Mapping[str, LayerBudget],
    layer_of: Callable[[str], str],
    *,
    clip: float,
    noise: str,
    lr: float,
    generator: torch.Generator,
) -> dict[str, list[float]]:
    """Release each probe's single-sample update through the LDP mechanism and invert its first layer.

    Parameters
    ----------
    model
        The model the probes' updates are computed on (e.g. the final global model).
    x, y
        Probe samples (N, *input shape) and labels.
    mask
        The sensitive region M (input shape).
    budgets
        Per-layer budgets of the release (:func:`fedlr.privacy.ldp.release_budgets`).
    layer_of
        Parameter name → layer.
    clip, noise
        ``privacy.clip`` and ``privacy.ldp_noise``.
    lr
        η of the single SGD step.
    generator
        Seeds the noise of every probe in turn.

    Returns
    -------
    dict[str, list[float]]
        Per probe: ``similarity`` and ``similarity_other`` (cosine inside and
        outside M, only probes whose region of x is non-zero), ``mse_sensitive``
        and ``mse_other`` (mean squared error inside and outside M).
    """
    updates = single_sample_updates(model, x, y, lr)
    layer = first_layer(model)
    inside = mask.flatten().bool()
    result: dict[str, list[float]] = {"similarity": [], "similarity_other": [], "mse_sensitive": [], "mse_other": []}
    for i in range(len(y)):
        update = {k: v[i].cpu() for k, v in updates.items()}
        released, _ = privatize_update(update, layer_of, budgets, clip, noise, generator)
        x_hat = invert_first_layer(released[f"{layer}.weight"], released[f"{layer}.bias"])
        target = x[i].flatten().cpu()
        regions = ((inside, "similarity", "mse_sensitive"), (~inside, "similarity_other", "mse_other"))
        for region, cosine, mse in regions:
            result[mse].append(float((x_hat[region] - target[region]).double().pow(2).mean()))
            if target[region].abs().sum() > 0:
                result[cosine].append(_cosine(x_hat[region], target[region]))
    return result


def attack_summary(cfg: Config, model: nn.Module, data: FederatedData) -> dict[str, float]:
    """The probe of §9 on ``model`` for every mask family of ``privacy.masks``: ``summary.json`` entries.

    For each family, the first ``privacy.attack_probes`` samples of the public
    split are released one at a time, as a client with that mask would
    release them at the per-release ``privacy.epsilon`` (tier multiplier 1):
    budgets from PSI on the public split, ``privacy.clip``, ``privacy.ldp_noise``,
    one SGD step at ``lr``. Noise is seeded from the run seed and the family.

    Returns
    -------
    dict[str, float]
        ``attack_similarity`` and ``attack_similarity_other`` (mean cosine
        inside and outside the sensitive region), ``attack_mse_sensitive`` and
        ``attack_mse_other``, pooled over the families' probes.
    """
    device = next(model.parameters()).device
    layer_of = network_layer_of(cfg, data.input_shape, data.num_classes)
    idx = public_indices(len(data.y_train), cfg["seed"])
    public = (torch.from_numpy(data.x_train[idx]).to(device), torch.from_numpy(data.y_train[idx]).to(device))
    probes = slice(0, cfg["privacy.attack_probes"])
    pooled: dict[str, list[float]] = {}
    for index, family in enumerate(cfg["privacy.masks"].split(",")):
        mask = sensitive_mask(family, data.input_shape).to(device)
        psi = psi_scores(model, *public, mask, layer_of) if cfg["privacy.allocation"] == "sensitivity" else None
        budgets = release_budgets(
            trained_layers(model, layer_of), psi, allocation=cfg["privacy.allocation"], epsilon=cfg["privacy.epsilon"],
            delta=cfg["privacy.delta"], noise=cfg["privacy.ldp_noise"], beta=cfg["privacy.beta"],
        )
        generator = torch.Generator().manual_seed(derive_seed(cfg["seed"], ATTACK_STREAM, index))
        result = probe_releases(
            model, public[0][probes], public[1][probes], mask, budgets, layer_of,
            clip=cfg["privacy.clip"], noise=cfg["privacy.ldp_noise"], lr=cfg["lr"], generator=generator,
        )
        for key, values in result.items():
            pooled.setdefault(key, []).extend(values)
    return {f"attack_{key}": float(np.mean(values)) if values else math.nan for key, values in pooled.items()}
