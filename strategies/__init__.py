"""Flower server strategies, one file per method, and the ServerApp."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlr.config import LORA_METHODS, Config, ConfigError
from fedlr.data import FederatedData

if TYPE_CHECKING:  # importing strategies.base loads torch and Flower; preflight of dense methods needs neither
    from strategies.base import FedlrStrategy


def preflight(cfg: Config, data: FederatedData) -> None:
    """Method-specific checks that need the data's shapes (for example whether a
    compression ratio is reachable). Raise ``ConfigError`` so the CLI exits 2
    before Ray or Flower starts. Dense methods have nothing to check."""
    if cfg["method"] == "fedmud":
        # An unreachable fedmud.ratio (spec §2.3) or a skip that leaves no layer
        # is only known once the model is built on the data's input shape.
        from fedlr.lowrank.fedmud import build_mud_model

        try:
            build_mud_model(cfg, data.input_shape, data.num_classes)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg["method"] in LORA_METHODS:
        # Builds (and caches) the pretrained W₀ before Ray starts, so that the
        # server and every client load the same file; checks fedsvd.pretrained
        # and that every adapted layer can hold fedsvd.rank.
        from fedlr.pretrain import build_lora_model

        try:
            build_lora_model(cfg, data.input_shape, data.num_classes)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def build_strategy(cfg: Config, node_to_partition: dict[int, int]) -> FedlrStrategy:
    """The strategy for ``cfg['method']`` (methods are validated in ``fedlr.config``)."""
    method = cfg["method"]
    common = {"cfg": cfg, "node_to_partition": node_to_partition}
    if method == "fedavg":
        from strategies.fedavg import FedAvg

        return FedAvg(**common)
    if method == "fedprox":
        from strategies.fedprox import FedProx

        return FedProx(**common, proximal_mu=cfg["fedprox.mu"])
    if method == "fedadam":
        from strategies.fedadam import FedAdam

        return FedAdam(
            **common, eta=cfg["fedadam.eta"], eta_l=cfg["lr"], beta_1=cfg["fedadam.beta_1"],
            beta_2=cfg["fedadam.beta_2"], tau=cfg["fedadam.tau"],
        )
    if method == "fedmud":
        from fedlr.data import load_federated_data
        from strategies.fedmud import FedMUD

        data = load_federated_data(cfg)  # memoised: the server has loaded it already
        return FedMUD(**common, input_shape=data.input_shape, num_classes=data.num_classes)
    if method in LORA_METHODS:
        from strategies.fedsvd import LoRAStrategy

        return LoRAStrategy(**common)
    if method == "fedre":
        from fedlr.data import load_federated_data
        from strategies.fedre import FedRE

        data = load_federated_data(cfg)  # memoised: the server has loaded it already
        return FedRE(**common, input_shape=data.input_shape, num_classes=data.num_classes)
    if method == "daringfed":
        from fedlr.data import load_federated_data
        from strategies.daringfed import DaringFed

        data = load_federated_data(cfg)  # memoised: the server has loaded it already
        return DaringFed(
            **common, input_shape=data.input_shape, num_classes=data.num_classes,
            partition_sizes=[len(p) for p in data.partitions],
        )
    raise ValueError(f"method {method!r} has no strategy")
