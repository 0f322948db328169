"""Run one experiment through Flower's simulation runtime on the Ray backend.

``fedlr run`` uses ``flwr.simulation.run_simulation`` (deprecated upstream but
present in the pinned 1.41): it runs the ServerApp in-process and the ClientApps
in Ray actors, with no SuperLink, no app bundle and no subprocess per run, so
start-up is a Ray start plus our data cache load. The very same ServerApp and
ClientApp run unchanged under ``flwr run .`` (tests cover both).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlr.config import Config
from fedlr.data import load_federated_data
from fedlr.engine import tuned_engine


class RunFailed(RuntimeError):
    """The run started but did not complete; the message says why."""


class _DropDeprecation(logging.Filter):
    # fedlr chose run_simulation deliberately (see module docstring); the notice
    # would only confuse users of the `fedlr` CLI.
    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated" not in record.getMessage()


def backend_config(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Ray backend settings: per-client resources from ``[simulation]``."""
    from fedlr.raystart import client_resources

    return {
        "client_resources": client_resources(cfg),
        "init_args": {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose},
    }


def _reaper(out: Path, finished: threading.Event) -> Callable[[BaseException | None], None]:
    """Make sure the process ends once the ServerApp has ended.

    Flower's simulation workers block in ``ray.get`` on a client that hangs and
    never notice the stop event, so ``run_simulation`` would not return. Give it
    a grace period, then shut Ray down (which kills the hung actors); as a last
    resort, report the outcome and exit with the run's exit code.
    """

    def on_exit(err: BaseException | None) -> None:
        def reap() -> None:
            if finished.wait(10.0):
                return
            from fedlr.raystart import private_instance, shutdown_ray

            shutdown_ray(lean=private_instance())
            if finished.wait(5.0):
                return
            if err is None:
                print(f"results: {out.resolve()} (Ray was stopped: a timed-out client never returned)", flush=True)
            else:
                print(f"fedlr: run failed: {err}", file=sys.stderr, flush=True)
            os._exit(0 if err is None else 1)

        threading.Thread(target=reap, name="fedlr-reaper", daemon=True).start()

    return on_exit


def run_experiment(cfg: Config, out: Path, *, resume: bool = False, quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` to completion in the Ray simulation and return ``summary.json``.

    Raises :class:`RunFailed` (client failure, server error) after the error is
    recorded in ``out/status.json``; completed rounds stay in ``metrics.jsonl``.
    """
    # Build the dataset cache before Ray starts: actors then only read it, and a
    # missing hub dataset fails here instead of inside every client.
    data = load_federated_data(cfg)
    from strategies import preflight

    preflight(cfg, data)
    # Nothing can fail on the configuration any more: start Ray and the client
    # actors now, in the background, while this process imports the rest.
    from fedlr.raystart import RayStart

    os.environ.setdefault("RAY_DEDUP_LOGS", "0" if verbose else "1")
    # Ray 2.55 announces a future change of GPU visibility at num_gpus = 0; fedlr
    # relies on today's behaviour (actors without a GPU share see none).
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
    ray_start = RayStart(cfg, verbose).begin()

    from flwr.simulation import run_simulation

    from clients.client_app import CLIENT_STATE_DIR, make_client_app
    from strategies.server_app import make_server_app

    flwr_logger = logging.getLogger("flwr")
    # Without --verbose fedlr reports failures itself (once, with the client's
    # traceback); Flower would log each one several times through Ray.
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    flwr_logger.addFilter(_DropDeprecation())
    finished = threading.Event()
    try:
        # fedlr.engine: warm actors, several clients per actor call (balanced by
        # their number of examples), faster delivery, no start-up query.
        sizes = [len(p) for p in data.partitions]
        with tuned_engine(ray_start, client_cost=sizes.__getitem__, clients_per_call=cfg["simulation.clients_per_call"]):
            run_simulation(
                server_app=make_server_app(cfg, out, resume=resume, quiet=quiet, on_exit=_reaper(out, finished)),
                client_app=make_client_app(cfg, out / CLIENT_STATE_DIR),
                num_supernodes=cfg["num_clients"],
                backend_name="ray",
                backend_config=backend_config(cfg, verbose),
                verbose_logging=verbose,
            )
    except Exception as err:
        # The ServerApp's own verdict comes first: a run it completed stays
        # completed even if the engine's teardown then fails (the reaper stops
        # Ray under a client that timed out and was dropped within max_failures).
        if _status(out).get("status") != "completed":
            raise RunFailed(str(err)) from err
    finally:
        finished.set()
        ray_start.close()
    status = _status(out)
    if status.get("status") != "completed":
        raise RunFailed(status.get("error", "the ServerApp ended without completing the run"))
    return json.loads((out / "summary.json").read_text())


def _status(out: Path) -> dict[str, Any]:
    path = out / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}
