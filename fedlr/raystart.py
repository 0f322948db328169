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
not as logs), and no dashboard or runtime-env agent on the raylet
(:func:`without_agents`): five Python processes fewer. It passes no job ``runtime_env``:
the driver's ``PYTHONPATH`` reaches the workers through the environment they
inherit, so the client actors take over the workers Ray prestarts instead of
waiting for the runtime-env agent to set up new ones. Joining a cluster
(``RAY_ADDRESS``) keeps Ray's defaults and Flower's ``runtime_env``, which the
other machines need.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ray


# Largest message that travels inline in Ray's task calls instead of through the
# object store (Ray's default: 100 KiB).
INLINE_BYTES = 8 * 2**20


def private_instance() -> bool:
    """Whether ``fedlr run`` starts its own Ray (lean) rather than joining ``RAY_ADDRESS``."""
    return not os.environ.get("RAY_ADDRESS")


def client_resources(cfg: dict[str, Any]) -> dict[str, float]:
    """Ray resources of one client actor, from ``[simulation]``."""
    return {"num_cpus": cfg["simulation.num_cpus"], "num_gpus": cfg["simulation.num_gpus"]}


# Modules ray.init imports on first use (Ray 2.55: usage statistics, the
# dashboard's package, the uv runtime-env hook, NVML), loaded before the start
# thread runs so that it imports nothing the main thread may be importing.
RAY_INIT_IMPORTS = (
    "ray._common.usage.usage_lib", "ray.core.generated.usage_pb2", "aiohttp.web", "email.policy", "netrc",
    "ray._common.pydantic_compat", "ray.dashboard", "ray._private.runtime_env.uv_runtime_env_hook",
    "ray._private.thirdparty.pynvml", "ray._private.services", "ray._private.node", "ray._private.parameter",
)


def actors_that_fit(resources: dict[str, float]) -> int:
    """How many client actors the cluster holds, node by node (as Flower's
    ``pool_size_from_resources``, which lives in the heavy ``flwr.simulation``)."""
    total = 0
    for node in ray.nodes():
        have = node.get("Resources") or {}
        if not have:  # a node that left
            continue
        count = int(have.get("CPU", 0) / resources["num_cpus"])
        if resources.get("num_gpus", 0) > 0:
            count = min(count, int(have.get("GPU", 0) / resources["num_gpus"]))
        total += count
    if total == 0:
        raise ValueError(
            f"no node of the Ray cluster fits one client with simulation.num_cpus = {resources['num_cpus']} "
            f"and simulation.num_gpus = {resources['num_gpus']}"
        )
    return total


class RayStart:
    """``ray.init`` and the warm actors, running in a background thread."""

    def __init__(self, cfg: dict[str, Any], verbose: bool) -> None:
        self.cfg = cfg
        self.verbose = verbose
        self.lean = private_instance()
        self.error: BaseException | None = None
        self._actors: list[Any] = []
        self._taken = False
        self._started = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=self._start, name="fedlr-ray-start", daemon=True)

    def begin(self) -> RayStart:
        # Import here, in the calling thread, what the start thread will need:
        # the actor class (Flower's message types) and what ray.init loads
        # lazily. Two threads importing overlapping packages at once can see each
        # other's half-initialized modules (seen: "cannot import name 'Context'
        # from partially initialized module 'flwr.app'").
        import fedlr.actor  # noqa: F401

        for module in RAY_INIT_IMPORTS:
            with contextlib.suppress(ImportError):
                importlib.import_module(module)
        self._thread.start()
        return self

    def _start(self) -> None:
        # This thread lives until close(): Ray starts its daemons with the
        # parent-death signal (prctl PR_SET_PDEATHSIG), which Linux sends when
        # the *thread* that forked them ends, not the process.
        try:
            init_ray(self.verbose, lean=self.lean)
            from fedlr.actor import FedlrClientActor

            resources = client_resources(self.cfg)
            count = actors_that_fit(resources)
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
    from fedlr.actor import lean_serialization

    lean_serialization()  # before ray.init creates the driver's serialization context
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
        ray.init(_system_config={"max_direct_call_object_size": INLINE_BYTES}, **args)


# What a private head's raylet runs in place of its two Python agents: a shell
# that lives exactly as long as the raylet (the raylet fate-shares with its
# agents, and must not leave this behind when it is killed). Arguments the
# raylet appends land in "$@" and are ignored.
AGENT_STUB = '/bin/sh -c "while kill -0 \\"${RAY_RAYLET_PID:-$PPID}\\" 2>/dev/null; do sleep 1; done" fedlr-agent-stub'
_AGENT_FLAGS = ("--dashboard_agent_command=", "--runtime_env_agent_command=")


def without_agents(raylet_command: list[str]) -> list[str]:
    """The raylet's command line with :data:`AGENT_STUB` for its dashboard and
    runtime-env agents, after recording their ports as unused.

    The dashboard agent exports metrics and serves the dashboard's node views;
    the runtime-env agent builds runtime environments. A private fedlr instance
    uses neither (no dashboard, no job ``runtime_env``), yet the two are Python
    processes of 57 and 75 MB that import aiohttp, grpc and OpenTelemetry while
    the driver and the actors start on the same cores. The raylet waits for the
    agents to publish their ports; publishing -1 is Ray's own way to say a
    service is off (as its minimal installation does), so the raylet and the
    workers run with metrics disabled.
    """
    from ray._raylet import (
        DASHBOARD_AGENT_LISTEN_PORT_NAME,
        METRICS_AGENT_PORT_NAME,
        METRICS_EXPORT_PORT_NAME,
        RUNTIME_ENV_AGENT_PORT_NAME,
        persist_port,
    )

    flags = dict(arg.split("=", 1) for arg in raylet_command if arg.startswith(("--node_id=", "--session_dir=")))
    if len(flags) != 2 or not all(any(a.startswith(f) for a in raylet_command) for f in _AGENT_FLAGS):
        return raylet_command  # not the raylet command line this knows: Ray's agents, unchanged
    for name in (METRICS_AGENT_PORT_NAME, METRICS_EXPORT_PORT_NAME, DASHBOARD_AGENT_LISTEN_PORT_NAME,
                 RUNTIME_ENV_AGENT_PORT_NAME):
        persist_port(flags["--session_dir"], flags["--node_id"], name, -1)
    return [next((f + AGENT_STUB for f in _AGENT_FLAGS if arg.startswith(f)), arg) for arg in raylet_command]


@contextlib.contextmanager
def lean_head(*, log_monitor: bool) -> Iterator[bool]:
    """While ``ray.init`` starts a local head: no autoscaler monitor, no dashboard
    API server, and a log monitor only if asked. Yields whether Ray 2.55's
    internals matched (otherwise ``ray.init`` runs unchanged)."""
    try:
        from ray._private import node as node_mod
        from ray._private import parameter, services
    except ImportError:
        yield False
        return
    Node, RayParams = getattr(node_mod, "Node", None), getattr(parameter, "RayParams", None)
    if Node is None or RayParams is None or not hasattr(Node, "start_api_server"):
        yield False
        return
    original_params_init = RayParams.__init__
    original_api_server = Node.start_api_server
    original_start_process = getattr(services, "start_ray_process", None)

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

    def start_ray_process(command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        assert original_start_process is not None
        if process_type == "raylet":
            command = without_agents(command)
        return original_start_process(command, process_type, *args, **kwargs)

    RayParams.__init__ = params_init
    Node.start_api_server = start_api_server
    if original_start_process is not None:
        services.start_ray_process = start_ray_process
    try:
        yield True
    finally:
        RayParams.__init__ = original_params_init
        Node.start_api_server = original_api_server
        if original_start_process is not None:
            services.start_ray_process = original_start_process


# Ray is stopped from two threads: the engine's, when the simulation ends, and
# the runner's reaper, when a hung client keeps the engine from ending. Touching
# Ray's core worker after a shutdown is a fatal error in C++ (the process exits
# with 1), so both take this lock and look before they touch.
_SHUTDOWN = threading.Lock()


def shutdown_ray(*, lean: bool, actors: list[Any] = ()) -> None:
    """Kill ``actors`` and shut Ray down, once, whichever thread comes first.

    For fedlr's own lean head without the graceful stop.

    Ray stops its daemons one by one with SIGTERM and a grace period (1.1 s of
    every run here), for spilled objects and a cluster's log files; a private
    single-run instance has neither to save, so it is killed outright, and with
    it the raylet's agents and workers, which a killed raylet leaves behind.
    """
    with _SHUTDOWN:
        if not ray.is_initialized():
            return
        for actor in actors:
            ray.kill(actor)  # the run is over: nothing in an actor is left to finish
        _shutdown(lean)


@contextlib.contextmanager
def _no_compiled_dags() -> Iterator[None]:
    """While Ray shuts down, when no compiled DAG can exist: ``ray.shutdown`` imports
    ``ray.dag.compiled_dag_node`` (0.1-0.2 s of imports at the end of every run)
    only to shut down the compiled DAGs, and none exists if the module was never
    imported. A stand-in with the one function it calls takes its place."""
    name = "ray.dag.compiled_dag_node"
    if name in sys.modules:
        yield
        return
    import types

    stand_in = types.ModuleType(name)
    stand_in._shutdown_all_compiled_dags = lambda: None  # type: ignore[attr-defined]
    sys.modules[name] = stand_in
    try:
        yield
    finally:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]  # a later real import gets the real module


def _shutdown(lean: bool) -> None:
    node = getattr(ray._private.worker, "_global_node", None) if lean else None
    try:
        from ray._private.node import Node

        raylets = node.all_processes.get("raylet", []) if node is not None else []
        pids = [info.process.pid for info in raylets]
    except (ImportError, AttributeError):
        pids = []
    if not pids:
        ray.shutdown()
        return
    import psutil

    orphans: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            orphans += psutil.Process(pid).children(recursive=True)
    original = Node.kill_all_processes

    def kill_all_processes(self: Any, check_alive: bool = True, allow_graceful: bool = False, wait: bool = False) -> None:
        original(self, check_alive=check_alive, allow_graceful=False, wait=wait)

    Node.kill_all_processes = kill_all_processes
    try:
        with _no_compiled_dags():
            ray.shutdown()
    finally:
        Node.kill_all_processes = original
        for proc in orphans:  # SIGKILL; not waited for: their parent, the raylet, is gone
            with contextlib.suppress(psutil.Error):
                proc.kill()
