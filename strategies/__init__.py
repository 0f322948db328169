"""Flower server strategies, one file per method, and the ServerApp."""

from __future__ import annotations

from fedlr.config import Config
from fedlr.data import FederatedData
from strategies.base import FedlrStrategy


def preflight(cfg: Config, data: FederatedData) -> None:
    """Method-specific checks that need the data's shapes (for example whether a
    compression ratio is reachable). Raise ``ConfigError`` so the CLI exits 2
    before Ray or Flower starts. Dense methods have nothing to check."""


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
    raise ValueError(f"method {method!r} has no strategy")
