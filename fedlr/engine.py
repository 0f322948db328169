"""Tuning of Flower 1.41's in-process simulation engine for many nodes and short rounds.

``fedlr run`` drives Flower's Simulation Runtime (``run_simulation``, Ray
backend) unchanged, except for the hot spots that this module replaces while a
run is in progress (:func:`tuned_engine`), all measured with ``fedlr bench``:

* **Delivery.** Flower's ``vce_api.add_messages_to_queue`` calls
  ``InMemoryLinkState.get_message_ins(node, limit=1)`` for *every* registered
  node every 0.1 s, and each call scans (and re-validates) every stored message
  under the state lock: O(nodes × messages) per sweep, so 10,000 idle nodes cost
  seconds per sweep, and each round waits up to 0.1 s for the next sweep.
  :func:`deliver_messages` makes one pass over the stored messages per sweep
  (idle nodes cost nothing), keeps Flower's at-most-one-message-per-node-per-
  sweep rule (a node's Context is never used by two workers at once), validates
  the pending messages once with the state's own ``_check_stored_messages``
  (expiry, federation) and polls every :data:`SWEEP_S`.
* **Node discovery.** In simulation the ServerApp runs in the same process as
  the engine, so the node → partition mapping Flower draws in
  ``vce_api._register_nodes`` is captured (:data:`NODE_PARTITIONS`) instead of
  being asked of every node with a start-up query (one Ray call per node).
  Under ``flwr run`` and deployments nothing is patched and the query is used.

* **Stopping.** The workers' and the reply injector's queue waits are capped
  at 50 ms (:func:`short_waits`), so a run ends when its ServerApp does, not a
  second later.
* **Backend.** Flower's ``RayBackend`` is replaced by
  :class:`fedlr.raypool.FedlrRayBackend` (warm actors started early, the
  ClientApp sent once per actor).

The patches check that they match the Flower they patch (``InMemoryLinkState``
and the functions' presence) and otherwise leave Flower's own code in place, so
a different Flower version is slower, never wrong.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

# Poll interval of the delivery sweep and of the ServerApp's reply pull: short
# enough that a 0.1 s sleep no longer dominates small rounds, long enough that
# an idle poll (one pass over a near-empty dict) costs nothing measurable.
SWEEP_S = 0.005

# Node id → partition id of the simulation running in this process, filled by
# the patched ``_register_nodes``; empty outside ``fedlr run``.
NODE_PARTITIONS: dict[int, int] = {}
_REGISTERED = threading.Event()
_ACTIVE = threading.Event()  # a tuned simulation runs in this process


def deliver_messages(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
    """Move undelivered instruction messages from the link state to the workers' queue.

    Drop-in for ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``
    (same arguments, same thread) for an ``InMemoryLinkState``: one pass per
    sweep over the stored messages instead of one pass per registered node.
    """
    from flwr.common import now

    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        batch = []
        with state.lock:
            pending = [
                mid for mid, m in state.message_ins_store.items()
                if m.metadata.delivered_at == "" and m.metadata.dst_node_id in nodes
            ]
            if pending:
                # Flower's own validation: drops expired messages and those
                # whose nodes left the federation, as get_message_ins would.
                state._check_stored_messages(set(pending))
                busy: set[int] = set()
                stamp = now().isoformat()
                for mid in pending:
                    msg = state.message_ins_store.get(mid)
                    if msg is None or msg.metadata.dst_node_id in busy:
                        continue
                    busy.add(msg.metadata.dst_node_id)  # at most one per node and sweep, as Flower
                    msg.metadata.delivered_at = stamp
                    batch.append(msg)
        for msg in batch:
            queue.put(msg)
        f_stop.wait(SWEEP_S)


def _patchable() -> tuple[Any, Any] | None:
    """Flower's vce_api module and InMemoryLinkState class, if they are the ones this module knows."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return None
    needed = ("add_messages_to_queue", "_register_nodes")
    if not all(callable(getattr(vce_api, name, None)) for name in needed):
        return None
    if not all(hasattr(InMemoryLinkState, a) for a in ("_check_stored_messages", "get_message_ins")):
        return None
    return vce_api, InMemoryLinkState


@contextlib.contextmanager
def tuned_engine(ray_start: Any = None) -> Iterator[bool]:
    """Install :func:`deliver_messages`, node-mapping capture and fedlr's Ray backend
    (taking Ray and its actors from ``ray_start``, a :class:`fedlr.raystart.RayStart`)
    for one in-process simulation.

    Yields whether the patches are in place; restores Flower's functions on exit.
    """
    found = _patchable()
    if found is None:
        yield False
        return
    vce_api, in_memory = found
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedlr import raypool

    original_backend = raybackend.RayBackend
    original_deliver: Callable[..., None] = vce_api.add_messages_to_queue
    original_register: Callable[..., dict[int, int]] = vce_api._register_nodes
    original_inject: Callable[..., None] | None = getattr(vce_api, "put_message_into_state", None)

    def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        short_waits(queue)  # the workers' queue
        if isinstance(state, in_memory):
            deliver_messages(state, queue, nodes_mapping, f_stop)
        else:  # a SQLite link state: Flower's own loop
            original_deliver(state, queue, nodes_mapping, f_stop)

    def register_nodes(num_nodes: int, state_factory: Any) -> dict[int, int]:
        mapping = original_register(num_nodes, state_factory)
        NODE_PARTITIONS.clear()
        NODE_PARTITIONS.update(mapping)
        _REGISTERED.set()
        return mapping

    def put_message_into_state(state: Any, queue: Queue[Any], f_stop: threading.Event) -> None:
        short_waits(queue)  # the replies' queue
        assert original_inject is not None
        original_inject(state, queue, f_stop)

    NODE_PARTITIONS.clear()
    _REGISTERED.clear()
    _ACTIVE.set()
    if original_inject is not None:
        vce_api.put_message_into_state = put_message_into_state
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api._register_nodes = register_nodes
    # start_vce imports RayBackend from this module when it builds the backend.
    raybackend.RayBackend = raypool.FedlrRayBackend
    raypool.install(ray_start)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original_deliver
        vce_api._register_nodes = original_register
        if original_inject is not None:
            vce_api.put_message_into_state = original_inject
        raybackend.RayBackend = original_backend
        raypool.install(None)
        NODE_PARTITIONS.clear()
        _REGISTERED.clear()
        _ACTIVE.clear()


def short_waits(queue: Queue[Any], poll_s: float = 0.05) -> None:
    """Cap the timeout of ``queue.get`` at ``poll_s``.

    Flower's simulation workers and reply injector wait on their queues with
    ``get(timeout=1.0)`` and look at the stop event only between waits, so every
    run ended with up to a second of idle threads before Ray was shut down. A
    shorter wait changes nothing else: an item still wakes a waiter at once.
    """
    get = queue.get

    def capped(block: bool = True, timeout: float | None = None) -> Any:
        return get(block, poll_s if timeout is None else min(timeout, poll_s)) if block else get(False)

    queue.get = capped  # type: ignore[method-assign]


def registered_nodes(timeout: float) -> dict[int, int] | None:
    """The captured node → partition mapping, waiting up to ``timeout`` s for the engine
    to register its nodes; None when this process runs no tuned simulation."""
    if not _ACTIVE.is_set() or not _REGISTERED.wait(timeout):
        return None
    return dict(NODE_PARTITIONS)


def tune_grid(grid: Any) -> None:
    """Shorten the reply poll of Flower's ``InMemoryGrid`` (0.1 s by default)."""
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = SWEEP_S
