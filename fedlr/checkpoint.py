"""Atomic per-round checkpoints of the server state, for ``fedlr run --resume``.

A checkpoint holds the round just completed, the global model arrays and the
strategy's own state (``FedlrStrategy.state_dict``). It is written with
write-to-temp-then-rename after the round's metrics line, so a crash at any
point leaves the last complete round recoverable.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlr.results import write_atomic

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, server_round: int, arrays: dict[str, np.ndarray], strategy_state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"round": server_round, "arrays": arrays, "strategy": strategy_state}, buf)
    write_atomic(Path(out) / CHECKPOINT, buf.getvalue())


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    # Our own file: NumPy arrays and plain containers, hence weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)
