"""fedlr.engine: the delivery loop that replaces Flower's per-node scan, and node capture."""

from __future__ import annotations

import threading
from queue import Queue
from types import SimpleNamespace

import pytest

from fedlr import engine


class FakeState:
    """What ``deliver_messages`` touches of an ``InMemoryLinkState``: its lock,
    its message store and its validation hook (here: drop ids starting with "x")."""

    def __init__(self, messages: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.message_ins_store = {
            mid: SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at="")) for mid, node in messages.items()
        }
        self.checked: list[set[str]] = []

    def _check_stored_messages(self, ids: set[str]) -> None:
        self.checked.append(set(ids))
        for mid in [m for m in ids if m.startswith("x")]:
            del self.message_ins_store[mid]


def sweep(state: FakeState, nodes: dict[int, int]) -> list[str]:
    """One sweep of ``deliver_messages``: stop it as soon as it has waited once."""
    queue: Queue = Queue()
    stop = threading.Event()
    stop.wait = lambda timeout=None: stop.set()  # type: ignore[method-assign]
    engine.deliver_messages(state, queue, nodes, stop)
    by_id = {id(m): mid for mid, m in state.message_ins_store.items()}
    return [by_id[id(queue.get_nowait())] for _ in range(queue.qsize())]


def test_one_message_per_node_per_sweep_validated_once_and_stamped() -> None:
    state = FakeState({"a1": 1, "a2": 1, "b1": 2, "x1": 3, "z": 99})
    nodes = {1: 0, 2: 1, 3: 2}
    assert sweep(state, nodes) == ["a1", "b1"]  # node 1's second message waits; x1 expired; node 99 unknown
    assert state.checked == [{"a1", "a2", "b1", "x1"}]  # one validation pass, not one per node
    assert all(state.message_ins_store[m].metadata.delivered_at for m in ("a1", "b1"))
    assert sweep(state, nodes) == ["a2"]
    assert sweep(state, nodes) == []


def test_idle_nodes_cost_no_validation() -> None:
    state = FakeState({})
    assert sweep(state, {n: n for n in range(10_000)}) == []
    assert state.checked == []


def test_node_capture_is_active_only_inside_a_tuned_simulation() -> None:
    assert engine.registered_nodes(timeout=0.01) is None  # flwr run / deployments: query the nodes
    with engine.tuned_engine() as tuned:
        assert tuned
        from flwr.server.superlink.fleet.vce import vce_api

        assert vce_api._register_nodes.__name__ == "register_nodes"
        assert engine.registered_nodes(timeout=0.01) is None  # not registered yet
    assert vce_api._register_nodes.__name__ == "_register_nodes"
    assert vce_api.add_messages_to_queue.__name__ == "add_messages_to_queue"
    assert vce_api.add_messages_to_queue is not engine.deliver_messages


def test_grid_poll_is_shortened_only_where_it_exists() -> None:
    grid = SimpleNamespace(pull_interval=0.1)
    engine.tune_grid(grid)
    assert grid.pull_interval == pytest.approx(engine.SWEEP_S)
    other = SimpleNamespace()
    engine.tune_grid(other)
    assert not hasattr(other, "pull_interval")
