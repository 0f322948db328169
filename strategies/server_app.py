"""The fedlr ServerApp: discovers the nodes, runs the method's strategy, records results.

Two ways in, one code path (:func:`run_server`):

* ``fedlr run`` builds the app with :func:`make_server_app` around an already
  resolved config (``run_simulation`` leaves ``context.run_config`` empty);
* ``flwr run .`` loads the module-level :data:`app`, which reads the config path
  and output directory from ``[tool.flwr.app.config]`` (keys ``config``, ``out``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlr import config as config_mod
from fedlr.checkpoint import load_checkpoint, save_checkpoint
from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.engine import registered_nodes, tune_grid
from fedlr.results import RunRecorder, read_metrics
from fedlr.training import evaluate
from strategies import build_strategy
from strategies.base import ClientFailure, Diverged

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.toml"
NODE_WAIT_S = 120.0
# Start-up queries under fedlr run: enough to reach every actor of a machine
# (actors = CPUs / simulation.num_cpus), far fewer than 10,000 nodes.
WARM_UP_QUERIES = 32


def _query(grid: Grid, node_ids: list[int], cfg: Config) -> list[Message]:
    """Send the start-up query to ``node_ids``; every node must answer without error."""
    queries = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=nid, message_type=MessageType.QUERY)
        for nid in node_ids
    ]
    # A generous floor: under load, actors start slowly, and a short round timeout
    # (meant for training) must not abort start-up.
    timeout = max(NODE_WAIT_S, cfg["simulation.round_timeout"])
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    if len(replies) < len(queries):
        raise RuntimeError(
            f"{len(queries) - len(replies)} of {len(queries)} nodes did not answer the start-up query within "
            f"{timeout:.0f} s (machine overloaded, or nodes down?)"
        )
    for msg in replies:
        if msg.has_error():
            raise ClientFailure(f"node {msg.metadata.src_node_id} failed the start-up query: {msg.error.reason}")
    return replies


def discover_nodes(grid: Grid, cfg: Config) -> dict[int, int]:
    """Map Flower node ids to partition ids by querying every node once.

    Node ids are random 64-bit integers; partition ids come from each node's
    ``node_config``. Sampling on partition ids makes runs reproducible. Under
    ``fedlr run`` the engine runs in this process and the mapping Flower drew
    is read directly (:func:`fedlr.engine.registered_nodes`): no query, no Ray
    call per node. Under ``flwr run`` and deployments every node is asked.
    """
    expected = cfg["num_clients"]
    captured = registered_nodes(timeout=NODE_WAIT_S)
    if captured is not None:
        if len(captured) != expected or set(captured) != set(grid.get_node_ids()):
            raise RuntimeError(f"the simulation registered {len(captured)} nodes but num_clients = {expected}")
        if sorted(captured.values()) != list(range(expected)):
            raise RuntimeError(f"partition ids {sorted(captured.values())} are not 0..{expected - 1}")
        # Warm the engine: Ray's actors start (and import torch) on their first
        # message. A few queries, under the generous start-up timeout, absorb that,
        # so round 1's simulation.round_timeout measures training as every other round.
        warm = sorted(captured, key=captured.__getitem__)[:WARM_UP_QUERIES]
        for msg in _query(grid, warm, cfg):
            if int(msg.content["info"]["partition-id"]) != captured[msg.metadata.src_node_id]:
                raise RuntimeError(f"node {msg.metadata.src_node_id} disagrees with the engine's partition mapping")
        return captured
    deadline = time.monotonic() + NODE_WAIT_S
    while len(node_ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(node_ids)} of num_clients = {expected} nodes connected within {NODE_WAIT_S:.0f} s"
            )
        time.sleep(0.05)
    if len(node_ids) > expected:
        raise RuntimeError(
            f"{len(node_ids)} nodes are connected but num_clients = {expected}; "
            "start exactly num_clients SuperNodes (flwr run: --federation-config num-supernodes=N)"
        )
    node_to_partition: dict[int, int] = {}
    for msg in _query(grid, node_ids, cfg):
        info = msg.content["info"]
        if int(info["num-partitions"]) != expected:
            raise RuntimeError(
                f"node {msg.metadata.src_node_id} has num-partitions = {int(info['num-partitions'])} "
                f"but num_clients = {expected}"
            )
        node_to_partition[msg.metadata.src_node_id] = int(info["partition-id"])
    if sorted(node_to_partition.values()) != list(range(expected)):
        raise RuntimeError(f"partition ids {sorted(node_to_partition.values())} are not 0..{expected - 1}")
    return node_to_partition


def run_server(grid: Grid, cfg: Config, out: Path, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run one experiment on ``grid`` and write its outputs to ``out``.

    On any failure ``status.json`` records the error before it propagates, and
    every round completed so far is already in ``metrics.jsonl``.
    """
    recorder = RunRecorder(out, cfg, quiet=quiet)
    tune_grid(grid)
    try:
        data = load_federated_data(cfg)
        x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
        strategy = build_strategy(cfg, discover_nodes(grid, cfg))
        # The strategy decides what the global model is (LoRA: adapters on a frozen W₀).
        model, arrays = strategy.build_global_model(data.input_shape, data.num_classes)
        first_round, rows = 1, []
        checkpoint = load_checkpoint(out) if resume else None
        if checkpoint is not None:
            arrays = _arrays_from(checkpoint["arrays"])
            strategy.load_state_dict(checkpoint["strategy"])
            first_round = checkpoint["round"] + 1
            rows = [r for r in read_metrics(out) if r["round"] <= checkpoint["round"]]
            strategy.restore_metrics(rows)
        recorder.start(rows)

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
            strategy.load_global_arrays(model, arrays)
            return evaluate(model, x_test, y_test)

        def on_round(server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
            row["wall_s"] = round(recorder.elapsed(), 3)
            recorder.log_round(row)
            state = {k: v.numpy() for k, v in arrays.items()}
            save_checkpoint(out, server_round, state, strategy.state_dict())

        if first_round == 1:
            row0 = {"round": 0, **evaluate_fn(0, arrays), "bytes_up": 0, "bytes_down": 0, "clients": 0}
            row0["wall_s"] = round(recorder.elapsed(), 3)
            recorder.log_round(row0)
        final = strategy.run_rounds(grid, arrays, evaluate_fn, on_round, first_round)
        extra = strategy.summary_extra()
        if cfg["privacy.attack"]:
            # FedRE's privacy probe (shared/specs/fedre.md §9): invert single-sample LDP releases on the final model.
            from fedlr.privacy.attack import attack_summary

            strategy.load_global_arrays(model, final)
            extra.update(attack_summary(cfg, model, data))
        return recorder.finish(extra)
    except BaseException as err:
        # "diverged" is a result of the configuration, not a fault: sweeps and studies tell them apart.
        status = "diverged" if isinstance(err, Diverged) else "failed"
        recorder.set_status(status, error=f"{type(err).__name__}: {err}")
        raise


def _arrays_from(state: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(v) for k, v in state.items()})


def make_server_app(
    cfg: Config,
    out: Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    on_exit: Callable[[BaseException | None], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to a resolved config (used by ``fedlr run``).

    ``on_exit`` runs in the ServerApp thread when the run ends, with the error or
    None; the runner uses it to reap clients that hang (Flower would wait for
    them forever, even after a round has gone on without them).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        error: BaseException | None = None
        try:
            run_server(grid, cfg, out, resume=resume, quiet=quiet)
        except BaseException as err:
            error = err
            raise
        finally:
            if on_exit is not None:
                on_exit(error)

    return app


# ``flwr run .`` entry point: configuration from [tool.flwr.app.config].
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config.get("config", "")) or str(DEFAULT_CONFIG)
    cfg = config_mod.load(path)
    out = str(context.run_config.get("out", "")) or str(Path.cwd() / "results" / time.strftime("flwr-%Y%m%d-%H%M%S"))
    run_server(grid, cfg, Path(out))
