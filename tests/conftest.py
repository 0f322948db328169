"""Shared fixtures: an isolated data cache and helpers to run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# One data cache for the whole test session, away from the user's ~/.cache/fedlr.
# Set at import time so that Ray actors and CLI subprocesses inherit it.
_CACHE = Path(os.environ.setdefault("FEDLR_CACHE", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "fedlr-data")))

TINY = """\
method = "fedavg"
dataset = "mnist1d"
model = "mlp"
seed = 7
rounds = 2
num_clients = 4
clients_per_round = 2
partition = "iid"
local_epochs = 2
batch_size = 32
lr = 0.1

[data]
num_samples = 1000
"""


@pytest.fixture(scope="module")
def isolated_flower(tmp_path_factory: pytest.TempPathFactory):
    """A private data cache for one test module, and the task identity Flower's
    Message needs outside a ServerApp process (strategy tests without Ray)."""
    from flwr.supercore.task_identity import TaskIdentity

    mp = pytest.MonkeyPatch()
    mp.setenv("FEDLR_CACHE", str(tmp_path_factory.mktemp("cache")))
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        mp.setattr(TaskIdentity, name, value)
    yield
    mp.undo()


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``fedlr`` as a user would (a fresh process), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "fedlr.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


NODE_OFFSET = 1000  # fake Flower node ids in strategy tests: partition id + offset


class LocalGrid:
    """A Flower grid whose nodes are calls of a client function in this process,
    one persistent ``Context`` per client (strategy tests without Ray).

    ``log`` keeps (partition, config sent, metrics replied) of every exchange, in order.
    """

    def __init__(self, cfg: dict[str, Any], client_fn: Callable[..., Any]) -> None:
        from flwr.app import Context, RecordDict

        self.cfg = cfg
        self.client_fn = client_fn
        self.contexts = {
            p: Context(run_id=1, node_id=NODE_OFFSET + p, node_config={"partition-id": p}, state=RecordDict(),
                       run_config={})
            for p in range(cfg["num_clients"])
        }
        self.log: list[tuple[int, dict[str, Any], dict[str, Any]]] = []

    def send_and_receive(self, messages: list[Any], timeout: float | None = None) -> list[Any]:
        from flwr.app import Message

        replies = []
        for msg in messages:
            pid = msg.metadata.dst_node_id - NODE_OFFSET
            content = self.client_fn(self.cfg, pid, msg.content, self.contexts[pid])
            self.log.append((pid, dict(msg.content["config"]), dict(content["metrics"])))
            replies.append(Message(content, reply_to=msg))
        return replies
