"""An early, lean Ray start for ``fedlr run`` (the actors and backend: :mod:`fedlr.raypool`).

:class:`RayStart` runs ``ray.init`` and creates the client actors in a background
thread as soon as the data cache and the preflight checks are done, so Ray's
daemons and the actors' imports run while the driver imports Flower and torch.
This module imports only Ray, so the thread starts Ray before Flower is loaded.

A private local Ray instance is *lean* (:func:`lean_head`): no autoscaler
monitor (a fixed one-machine cluster never scales), no dashboard API server
(fedlr never serves the dashboard; ``include_dashboard = False`` still started
it, for usage statistics), and no log monitor unless ``--verbose`` (workers'
output stays in Ray's session logs; client errors reach fedlr as exceptions,
not as logs): three Python processes fewer. It passes no job ``runtime_env``:
the driver's ``PYTHONPATH`` reaches the workers through the environment they
inherit, so the client actors take over the workers Ray prestarts instead of
waiting for the runtime-env agent to set up new ones. Joining a cluster
(``RAY_ADDRESS``) keeps Ray's defaults and Flower's ``runtime_env``, which the
other machines need.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray


def client_resources(cfg: dict[str, Any]) -> dict[str, float]:
    """Ray resources of one client actor, from ``[simulation]``."""
    return {"num_cpus": cfg["simulation.num_cpus"], "num_gpus": cfg["simulation.num_gpus"]}


class RayStart:
    """``ray.init`` and the warm actors, running in a background thread."""

    def __init__(self, cfg: dict[str, Any], verbose: bool) -> None:
        self.cfg = cfg
        self.verbose = verbose
        self.lean = not os.environ.get("RAY_ADDRESS")
        self.error: BaseException | None = None
        self._actors: list[Any] = []
        self._taken = False
        self._started = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._start, name="fedlr-ray-start", daemon=True)

    def begin(self) -> RayStart:
        self._thread.start()
        return self

    def _start(self) -> None:
        # This thread lives until close(): Ray starts its daemons with the
        # parent-death signal (prctl PR_SET_PDEATHSIG), which Linux sends when
        # the *thread* that forked them ends, not the process.
        try:
            init_ray(self.verbose, lean=self.lean)
            from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

            from fedlr.actor import FedlrClientActor

            resources = client_resources(self.cfg)
            count = pool_size_from_resources(resources)
            make = FedlrClientActor.options(**resources)
            self._actors = [make.remote(self.cfg) for _ in range(count)]
        except BaseException as err:  # reported by wait(), in the engine's thread
            self.error = err
        finally:
            self._started.set()
        self._release.wait()

    def close(self) -> None:
        """Let the start thread end (after Ray has been shut down)."""
        self._release.set()

    def wait(self) -> None:
        """Block until Ray is up (the actors may still be starting); re-raise a start failure."""
        self._started.wait()
        if self.error is not None:
            raise RuntimeError(f"Ray did not start: {self.error}") from self.error

    def take_actors(self) -> list[Any]:
        """The warm actors, once (the backend that takes them owns them)."""
        self.wait()
        if self._taken:
            return []
        self._taken = True
        return list(self._actors)


def init_ray(verbose: bool, *, lean: bool) -> None:
    """Start (or join, with ``RAY_ADDRESS``) Ray the way Flower's backend would, but lean."""
    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    args: dict[str, Any] = {"include_dashboard": False, "logging_level": "INFO" if verbose else "ERROR",
                            "log_to_driver": verbose}
    if not lean:
        # Other machines need the driver's import path: Flower's own runtime_env.
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **args)
        return
    os.environ["PYTHONPATH"] = pythonpath  # inherited by the raylet and its workers
    with lean_head(log_monitor=verbose):
        ray.init(_system_config={"max_direct_call_object_size": int(os.environ.get("FEDLR_INLINE", 8 * 2**20))}, **args)


@contextlib.contextmanager
def lean_head(*, log_monitor: bool) -> Iterator[bool]:
    """While ``ray.init`` starts a local head: no autoscaler monitor, no dashboard
    API server, and a log monitor only if asked. Yields whether Ray 2.55's
    internals matched (otherwise ``ray.init`` runs unchanged)."""
    try:
        from ray._private import node as node_mod
        from ray._private import parameter
    except ImportError:
        yield False
        return
    Node, RayParams = getattr(node_mod, "Node", None), getattr(parameter, "RayParams", None)
    if Node is None or RayParams is None or not hasattr(Node, "start_api_server"):
        yield False
        return
    original_params_init = RayParams.__init__
    original_api_server = Node.start_api_server

    def params_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_params_init(self, *args, **kwargs)
        self.no_monitor = True
        if not log_monitor:
            self.include_log_monitor = False

    def start_api_server(self: Any, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
        if include_dashboard:
            original_api_server(self, include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)
        else:
            self._webui_url = None

    RayParams.__init__ = params_init
    Node.start_api_server = start_api_server
    try:
        yield True
    finally:
        RayParams.__init__ = original_params_init
        Node.start_api_server = original_api_server
