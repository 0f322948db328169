"""FedAvg (McMahan et al., 2017) on Flower's own strategy, with fedlr's sampling,
failure checks and byte accounting (:class:`strategies.base.FedlrStrategy`)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from strategies.base import FedlrStrategy


class FedAvg(FedlrStrategy, FlowerFedAvg):
    """Weighted averaging of client models by ``num-examples`` (Flower's FedAvg)."""
