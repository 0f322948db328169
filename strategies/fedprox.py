"""FedProx (Li et al., MLSys 2020, arXiv 1812.06127) on Flower's strategy.

The server side is FedAvg plus ``proximal-mu`` in the train config; the client
adds (mu/2)·||w − w_t||² to its loss (``clients.trainer.local_sgd``)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx as FlowerFedProx

from strategies.base import FedlrStrategy


class FedProx(FedlrStrategy, FlowerFedProx):
    """Flower's FedProx with fedlr's sampling and checks; ``proximal_mu`` from ``fedprox.mu``."""
