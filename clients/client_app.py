"""The fedlr ClientApp: answers the start-up query and trains on its partition.

The partition comes from ``context.node_config["partition-id"]`` in simulation
and deployment alike; everything else from the resolved config. Datasets and
models are cached in :mod:`clients.trainer` (an importable module, so the cache
survives across messages inside one Ray actor; ``shared/specs/flower-notes.md``).

A failure re-raises with the partition id and the full traceback in the
message, so the server's error reply names the client and what went wrong.
"""

from __future__ import annotations

import pickle
import time
import traceback
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import trainer
from fedlr import config as config_mod
from fedlr.config import Config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
CLIENT_STATE_DIR = "client_state"  # inside the run directory
_CONFIGS: dict[str, Config] = {}


class ClientError(RuntimeError):
    """A client's training failed; carries the partition id and traceback."""


class InjectedFault(RuntimeError):
    """Raised on purpose by ``[faults]`` to exercise failure handling."""


def _inject_fault(cfg: Config, partition_id: int, server_round: int) -> None:
    if cfg["faults.client"] == partition_id and cfg["faults.round"] == server_round:
        if cfg["faults.kind"] == "hang":
            time.sleep(10 * 24 * 3600)
        raise InjectedFault(f"faults.client = {partition_id}: injected failure in round {server_round}")


def _state_dir_from_context(context: Context) -> Path | None:
    out = str(context.run_config.get("out", ""))
    return Path(out) / CLIENT_STATE_DIR if out else None


def _config_from_context(context: Context) -> Config:
    path = str(context.run_config.get("config", "")) or str(DEFAULT_CONFIG)
    if path not in _CONFIGS:
        _CONFIGS[path] = config_mod.load(path)
    return _CONFIGS[path]


def _state_path(state_dir: Path, partition_id: int) -> Path:
    return state_dir / f"client-{partition_id}.pkl"


def restore_state(context: Context, state_dir: Path | None, partition_id: int) -> None:
    """Load this client's persisted state into an empty ``context.state``.

    Flower keeps ``context.state`` only for the life of one run; a resumed run is
    a new one. Methods whose clients hold state across rounds (FedMUD's base W,
    a DP accountant) find it restored here, as a real device would from its disk.
    """
    if state_dir is None or len(context.state) > 0:
        return
    path = _state_path(state_dir, partition_id)
    if path.is_file():
        restored = pickle.loads(path.read_bytes())
        for key, record in restored.items():
            context.state[key] = record


def persist_state(context: Context, state_dir: Path | None, partition_id: int) -> None:
    """Write ``context.state`` atomically after a successful round."""
    if state_dir is None or len(context.state) == 0:
        return
    from fedlr.results import write_atomic

    write_atomic(_state_path(state_dir, partition_id), pickle.dumps(context.state))


def make_client_app(cfg: Config | None = None, state_dir: Path | None = None) -> ClientApp:
    """A ClientApp bound to ``cfg`` and a client-state directory, or reading both
    from ``run_config`` (``config``; ``out``/client_state) if ``cfg`` is None."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        info = MetricRecord(
            {
                "partition-id": int(context.node_config["partition-id"]),
                "num-partitions": int(context.node_config["num-partitions"]),
            }
        )
        return Message(RecordDict({"info": info}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partition_id = int(context.node_config["partition-id"])
        try:
            if cfg is not None:
                resolved, states = cfg, state_dir
            else:
                resolved, states = _config_from_context(context), _state_dir_from_context(context)
            _inject_fault(resolved, partition_id, int(msg.content["config"]["server-round"]))
            restore_state(context, states, partition_id)
            content = trainer.train(resolved, partition_id, msg.content, context)
            persist_state(context, states, partition_id)
        except Exception as err:
            raise ClientError(f"client {partition_id} failed:\n{traceback.format_exc()}") from err
        return Message(content, reply_to=msg)

    return app


# ``flwr run .`` entry point.
app = make_client_app()
