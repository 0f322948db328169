"""FedMUD models from a fedlr configuration, and what of them travels.

Li et al., *The Panaceas for Improving Low-Rank Decomposition in
Communication-Efficient Federated Learning*, ICML 2025, arXiv 2505.23176;
§ numbers refer to ``shared/specs/fedmud.md``.

The server strategy (``strategies.fedmud``), the client trainer
(``clients.fedmud_trainer``) and the pre-flight check build the same
decomposed model here and read the same :class:`MUDLayout` from it, so all
three agree on which state-dict entries are trainable factors, which are the
frozen base W and which stay dense, and on the round seeds σ_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from fedlr.config import Config
from fedlr.lowrank.mud import LayerSpec, decompose_model, layer_specs, model_factors
from fedlr.models import build_model
from fedlr.training import derive_seed

# Seed stream of the round seeds σ_t, distinct from client sampling (1,
# strategies.base) and local batch order (2, clients.trainer).
ROUND_SEED_STREAM = 3


def round_seed(run_seed: int, server_round: int) -> int:
    """σ_t, the seed of round t's frozen factors (§3 step 1).

    A pure function of the run seed and the round, unlike [code]'s unseeded
    ``random.randint``: a resumed run and a client replaying round s for
    catch-up both re-draw exactly the factors the clients of round s trained with.
    """
    return derive_seed(run_seed, ROUND_SEED_STREAM, server_round)


def parse_skip(text: str) -> tuple[int, int]:
    """``"F-L"`` → (F, L): Linear/Conv layers left dense at the front and back (§2).

    ``fedlr.config.resolve`` has already checked the syntax of ``fedmud.skip``.
    """
    front, back = text.split("-")
    return int(front), int(back)


def build_mud_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``fedlr.models.build_model`` decomposed as ``[fedmud]`` says (§2, §2.3).

    Every process builds the same W from the run seed, so W is never shipped
    at the start: a client that has not trained yet holds W_1 already.

    Raises
    ------
    ValueError
        If the ratio is unreachable or ``skip`` leaves nothing to decompose
        (``strategies.preflight`` turns it into a configuration error, exit 2).
    """
    return decompose_model(
        build_model(cfg, input_shape, num_classes),
        decomposition=cfg["fedmud.decomposition"],
        aggregation=cfg["fedmud.aggregation"],
        ratio=cfg["fedmud.ratio"],
        init_scale=cfg["fedmud.init_scale"],
        skip=parse_skip(cfg["fedmud.skip"]),
        target=cfg["fedmud.target"],
    )


@dataclass(frozen=True)
class MUDLayout:
    """Which state-dict entries of a FedMUD model are what, and their sizes.

    Attributes
    ----------
    specs
        Layer name → :class:`LayerSpec`, in layer-index order (the seeds' index).
    target
        ``"update"`` (MUD) or ``"weight"`` (FedLMT baseline, §2.4).
    factor_keys
        Trainable factors, ``"<layer>.left"`` / ``"<layer>.right"``.
    dense_keys
        Entries trained, sent and averaged in full: biases, norm layers and
        skipped layers (§2). With :attr:`base_keys` they make up the plain
        model's state dict, the server's global model.
    base_keys
        ``"<layer>.weight"`` of the decomposed layers: W in the plain model.
    nbytes
        Payload bytes of every key above.
    realized_ratio
        Trainable entries over the dense model's after ratio forcing (§2.3).
    """

    specs: dict[str, LayerSpec]
    target: str
    factor_keys: tuple[str, ...]
    dense_keys: tuple[str, ...]
    base_keys: tuple[str, ...]
    nbytes: dict[str, int]
    realized_ratio: float

    @classmethod
    def of(cls, model: nn.Module) -> MUDLayout:
        """Read the layout of a model returned by :func:`build_mud_model`."""
        specs = layer_specs(model)
        factors = model_factors(model)
        base = tuple(f"{name}.weight" for name in specs)
        state = model.state_dict()
        nbytes = {key: t.numel() * t.element_size() for key, t in state.items()}
        # target="weight" keeps no W buffer, but the plain model still has W = U V.
        itemsize = next(iter(factors.values())).element_size()
        nbytes.update({key: spec.numel * itemsize for key, spec in zip(base, specs.values(), strict=True)})
        return cls(
            specs=specs,
            target=next(iter(specs.values())).target,
            factor_keys=tuple(factors),
            dense_keys=tuple(k for k in state if k not in factors and k not in base),
            base_keys=base,
            nbytes=nbytes,
            realized_ratio=float(model.mud_realized_ratio),
        )

    @property
    def upload_keys(self) -> tuple[str, ...]:
        """What a client sends after training: trainable factors and dense entries (§3 step 5)."""
        return self.factor_keys + self.dense_keys

    def bytes_of(self, keys: tuple[str, ...]) -> int:
        """Payload bytes of ``keys``."""
        return sum(self.nbytes[k] for k in keys)

    @property
    def max_catch_up(self) -> int:
        """The most logged rounds a client may download instead of the plain model.

        Catch-up costs the dense entries plus one factor set per missed round;
        it is sent only while strictly cheaper than W_t itself (§3 step 3).
        """
        # Both options carry the dense entries, so compare n factor sets with W alone.
        return math.ceil(self.bytes_of(self.base_keys) / self.bytes_of(self.factor_keys)) - 1
