"""Atomic per-round checkpoints of the server state, for ``fedlr run --resume``.

A checkpoint holds the round just completed, the global model arrays and the
strategy's own state (``FedlrStrategy.state_dict``). It is written with
write-to-temp-then-rename after the round's metrics line, so a crash at any
point leaves the last complete round recoverable.

The file is a pickle (protocol 5): NumPy arrays, plain containers and, in some
strategies' state, torch tensors. ``torch.save`` wrote the same content in 4 ms
per round on the digits CNN against 0.04 ms, a tenth of a short round; files
written by it (earlier fedlr versions) still load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlr.results import write_atomic

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, server_round: int, arrays: dict[str, np.ndarray], strategy_state: dict[str, Any]) -> None:
    payload = {"round": server_round, "arrays": arrays, "strategy": strategy_state}
    write_atomic(Path(out) / CHECKPOINT, pickle.dumps(payload, protocol=5))


def load_checkpoint(out: Path) -> dict[str, Any] | None:
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    raw = path.read_bytes()
    if raw[:2] == b"PK":  # a zip archive: torch.save, as fedlr wrote checkpoints before
        import io

        # Our own file: NumPy arrays and plain containers, hence weights_only=False.
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    return pickle.loads(raw)
