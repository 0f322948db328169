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

* **Calls.** Each sweep's messages are planned into actor calls
  (:func:`plan_calls`): two calls per actor, balanced by the clients' expected
  work (their partition sizes), each call carrying several clients that the
  actor runs back to back (:func:`call_worker`, drop-in for Flower's
  ``vce_api.worker``). Flower sends one message per call; on the digits
  benchmark a Ray task per client cost a fifth of every round. Replies stream
  back one by one as each client finishes, and a client that fails costs only
  itself: the rest of its call is sent again. ``simulation.clients_per_call``
  caps the clients per call (1 is Flower's one message per call).
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
import heapq
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

# Poll interval of the delivery sweep and of the ServerApp's reply pull: short
# enough that a 0.1 s sleep no longer dominates small rounds, long enough that
# an idle poll (one pass over a near-empty dict) costs nothing measurable.
SWEEP_S = 0.005

# Node id → partition id of the simulation running in this process, filled by
# the patched ``_register_nodes``; empty outside ``fedlr run``.
NODE_PARTITIONS: dict[int, int] = {}
_REGISTERED = threading.Event()
_ACTIVE = threading.Event()  # a tuned simulation runs in this process

# Actor calls per actor and sweep (:func:`plan_calls`): one would send the
# fewest calls, but two let an actor that finishes early take over work from a
# slower one (measured: 0.223 s against 0.232 s per round on the quickstart's
# uneven partitions, 0.074 s against 0.071 s on digits' even ones).
CALLS_PER_ACTOR = 2


def plan_calls(messages: list[Any], actors: int, cost: Callable[[Any], float], cap: int = 0) -> list[list[Any]]:
    """Group one sweep's messages into actor calls, heaviest call first.

    ``min(len(messages), CALLS_PER_ACTOR * actors)`` calls (more if ``cap`` > 0
    allows at most ``cap`` messages per call), filled by longest-processing-time
    first: each message, heaviest first, joins the call with the least work so
    far. ``cost`` is a message's expected work; ties keep the given order, so a
    plan is a pure function of its input. ``cap = 1`` or a single message gives
    one call per message, as Flower sends them.
    """
    if not messages:
        return []
    if cap == 1 or len(messages) == 1 or actors <= 0:
        return [[m] for m in messages]
    calls = min(len(messages), CALLS_PER_ACTOR * actors)
    if cap > 0:
        calls = max(calls, math.ceil(len(messages) / cap))
    costs = [cost(m) for m in messages]
    plan: list[list[Any]] = [[] for _ in range(calls)]
    loads = [0.0] * calls
    open_calls = [(0.0, i) for i in range(calls)]  # (work so far, call index): a min-heap
    for i in sorted(range(len(messages)), key=lambda i: (-costs[i], i)):
        load, c = heapq.heappop(open_calls)
        plan[c].append(messages[i])
        loads[c] = load + costs[i]
        if cap <= 0 or len(plan[c]) < cap:
            heapq.heappush(open_calls, (loads[c], c))
    order = sorted(range(calls), key=lambda c: (-loads[c], c))
    return [plan[c] for c in order if plan[c]]


def deliver_messages(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event,
                     plan: Callable[[list[Any]], list[list[Any]]] | None = None) -> None:
    """Move undelivered instruction messages from the link state to the workers' queue.

    Drop-in for ``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``
    (same arguments, same thread) for an ``InMemoryLinkState``: one pass per
    sweep over the stored messages instead of one pass per registered node.
    With ``plan`` (a :func:`plan_calls`), each sweep's messages go to the queue
    as the lists of messages of its actor calls, for :func:`call_worker`.
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
        if plan is None:
            for msg in batch:
                queue.put(msg)
        else:
            for call in plan(batch):
                queue.put(call)
        f_stop.wait(SWEEP_S)


def call_worker(messageins_queue: Queue[Any], messageres_queue: Queue[Any], node_info_store: dict[int, Any],
                backend: Any, f_stop: threading.Event, metrics: Any) -> None:
    """Run actor calls from the queue and enqueue each reply as it comes.

    Drop-in for ``flwr.server.superlink.fleet.vce.vce_api.worker`` (same
    arguments, same thread) that takes a list of messages per queue item (a
    single message is a call of one). Each message gets its node's Context and,
    on success, updates it, exactly as Flower's worker does; a failure becomes
    the same error reply Flower sends (:func:`error_reply`). A backend without
    ``process_call`` runs the messages one by one with ``process_message``.
    """
    from flwr.supercore import log

    while not f_stop.is_set():
        try:
            item = messageins_queue.get(timeout=1.0)
        except Empty:
            continue
        call = item if isinstance(item, list) else [item]
        contexts, ready = [], []
        for message in call:
            try:
                contexts.append(node_info_store[message.metadata.dst_node_id].retrieve_context(
                    run_id=message.metadata.run_id))
                ready.append(message)
            except Exception as ex:  # noqa: BLE001 - reported as the message's error reply, as Flower does
                log(logging.ERROR, ex)
                messageres_queue.put(error_reply(message, ex))
        started = time.perf_counter()
        for message, outcome, context in _outcomes(backend, ready, contexts):
            metrics.add_clientapp_runtime(time.perf_counter() - started)
            started = time.perf_counter()
            if isinstance(outcome, BaseException):
                log(logging.ERROR, outcome)
                log(logging.ERROR, "".join(traceback.format_exception(outcome)))
                reply = error_reply(message, outcome)
            else:
                node_info_store[message.metadata.dst_node_id].update_context(message.metadata.run_id, context=context)
                reply = outcome
                reply.metadata.__dict__["_message_id"] = str(uuid4())
            messageres_queue.put(reply)


def _outcomes(backend: Any, messages: list[Any], contexts: list[Any]) -> Iterator[tuple[Any, Any, Any]]:
    """(message, reply or exception, updated Context) for each message, in order."""
    if not messages:
        return
    if hasattr(backend, "process_call"):
        for message, (outcome, context) in zip(messages, backend.process_call(messages, contexts)):
            yield message, outcome, context
        return
    for message, context in zip(messages, contexts):
        try:
            reply, updated = backend.process_message(message, context)
            yield message, reply, updated
        except Exception as ex:  # noqa: BLE001
            yield message, ex, None


def error_reply(message: Any, ex: BaseException) -> Any:
    """The error reply Flower's simulation worker sends for ``ex`` (same code, same reason)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.common.constant import ErrorCode

    if isinstance(ex, ClientAppException):
        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    elif isinstance(ex, LoadClientAppError):
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    else:
        code = ErrorCode.UNKNOWN
    reply = Message(Error(code=code, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)
    reply.metadata.__dict__["_message_id"] = str(uuid4())
    return reply


def _patchable() -> tuple[Any, Any] | None:
    """Flower's vce_api module and InMemoryLinkState class, if they are the ones this module knows."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    except ImportError:
        return None
    needed = ("add_messages_to_queue", "_register_nodes", "worker", "run_api")
    if not all(callable(getattr(vce_api, name, None)) for name in needed):
        return None
    if not all(hasattr(InMemoryLinkState, a) for a in ("_check_stored_messages", "get_message_ins")):
        return None
    return vce_api, InMemoryLinkState


@contextlib.contextmanager
def tuned_engine(ray_start: Any = None, *, client_cost: Callable[[int], float] | None = None,
                 clients_per_call: int = 0) -> Iterator[bool]:
    """Install :func:`deliver_messages` with :func:`plan_calls`, :func:`call_worker`,
    node-mapping capture and fedlr's Ray backend (taking Ray and its actors from
    ``ray_start``, a :class:`fedlr.raystart.RayStart`) for one in-process simulation.

    ``client_cost`` maps a partition id to its client's expected work (the
    runner: its number of examples), which balances the calls; ``clients_per_call``
    caps the clients per call (0: no cap; 1: one message per call, as Flower).
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
    original_worker: Callable[..., None] = vce_api.worker
    original_run_api: Callable[..., None] = vce_api.run_api
    built: list[Any] = []  # the backend of the run in progress (its actors: workers)

    def run_api(app_fn: Any, backend_fn: Callable[[], Any], *args: Any, **kwargs: Any) -> None:
        def make_backend() -> Any:
            backend = backend_fn()
            built[:] = [backend]
            return backend

        original_run_api(app_fn, make_backend, *args, **kwargs)

    def cost(message: Any) -> float:
        pid = NODE_PARTITIONS.get(message.metadata.dst_node_id)
        return float(client_cost(pid)) if client_cost is not None and pid is not None else 1.0

    def plan(messages: list[Any]) -> list[list[Any]]:
        workers = getattr(built[0], "num_workers", 0) if built else 0  # run_api builds it before delivering
        return plan_calls(messages, workers, cost, clients_per_call)

    def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: dict[int, int], f_stop: threading.Event) -> None:
        short_waits(queue)  # the workers' queue
        if isinstance(state, in_memory):
            deliver_messages(state, queue, nodes_mapping, f_stop, plan=plan)
        else:  # a SQLite link state: Flower's own loop (one message per item, which call_worker takes too)
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
    vce_api.worker = call_worker
    vce_api.run_api = run_api
    # start_vce imports RayBackend from this module when it builds the backend.
    raybackend.RayBackend = raypool.FedlrRayBackend
    raypool.install(ray_start)
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original_deliver
        vce_api._register_nodes = original_register
        vce_api.worker = original_worker
        vce_api.run_api = original_run_api
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
