"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Alg. 2)
on Flower's strategy: the averaged client update is a pseudo-gradient for a
server-side Adam step with learning rate ``fedadam.eta``."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam as FlowerFedAdam

from strategies.base import FedlrStrategy


class FedAdam(FedlrStrategy, FlowerFedAdam):
    """Flower's FedAdam; its moments ``m_t``/``v_t`` are checkpointed for resume."""

    def state_dict(self) -> dict[str, Any]:
        return {"m_t": self.m_t, "v_t": self.v_t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m_t, self.v_t = state["m_t"], state["v_t"]
