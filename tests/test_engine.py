"""fedlr.engine: the delivery loop that replaces Flower's per-node scan, and node capture."""

from __future__ import annotations

import importlib
import threading
from queue import Queue
from pathlib import Path
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


def test_tuned_engine_swaps_in_fedlr_backend_and_restores_flowers() -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedlr import raypool

    original = raybackend.RayBackend
    start = SimpleNamespace()
    with engine.tuned_engine(start):
        assert raybackend.RayBackend is raypool.FedlrRayBackend
        assert issubclass(raypool.FedlrRayBackend, original)
        assert raypool._START is start
    assert raybackend.RayBackend is original
    assert raypool._START is None


def test_lean_head_drops_monitor_dashboard_and_log_monitor_only_while_active() -> None:
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    from fedlr.raystart import lean_head

    api_server = Node.start_api_server
    with lean_head(log_monitor=False) as lean:
        assert lean
        params = RayParams(include_dashboard=False)
        assert params.no_monitor is True and params.include_log_monitor is False
        node = SimpleNamespace(_webui_url="http://x")
        Node.start_api_server(node, include_dashboard=False, raise_on_failure=False)
        assert node._webui_url is None  # nothing started
    with lean_head(log_monitor=True):
        assert RayParams().include_log_monitor is None  # --verbose: Ray's default (a log monitor)
    assert Node.start_api_server is api_server
    params = RayParams()
    assert params.no_monitor is False and params.include_log_monitor is None


def test_without_agents_stubs_the_raylets_agents_and_publishes_their_ports_as_unused(tmp_path: Path) -> None:
    from fedlr.raystart import AGENT_STUB, without_agents

    node = "ab" * 28
    command = ["raylet", f"--node_id={node}", f"--session_dir={tmp_path}",
               "--dashboard_agent_command=python dashboard/agent.py --x=1",
               "--runtime_env_agent_command=python runtime_env/agent/main.py", "--head"]
    stubbed = without_agents(command)
    assert stubbed == ["raylet", f"--node_id={node}", f"--session_dir={tmp_path}",
                       f"--dashboard_agent_command={AGENT_STUB}", f"--runtime_env_agent_command={AGENT_STUB}", "--head"]
    # The raylet reads these instead of waiting for the agents; -1 is Ray's "service off".
    ports = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert ports == {f"{name}_{node}": "-1" for name in
                     ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port")}
    # A command line without the flags this knows (another Ray) is left alone.
    assert without_agents(command[:3]) == command[:3]


def test_agent_stub_lives_as_long_as_the_raylet_and_ignores_appended_arguments() -> None:
    import shlex
    import subprocess
    import time

    from fedlr.raystart import AGENT_STUB

    parent = subprocess.Popen(["sleep", "30"])
    stub = subprocess.Popen([*shlex.split(AGENT_STUB), "--agent-id=1"], env={"RAY_RAYLET_PID": str(parent.pid)})
    try:
        time.sleep(0.3)
        assert stub.poll() is None  # the raylet fate-shares with its agents: the stub must not exit early
        parent.kill()
        parent.wait()
        assert stub.wait(timeout=5) == 0  # and must not outlive it
    finally:
        for proc in (parent, stub):
            proc.kill()


def test_shutdown_stands_in_for_the_compiled_dag_module_only_while_none_can_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fedlr.raystart import _no_compiled_dags

    name = "ray.dag.compiled_dag_node"
    monkeypatch.delitem(sys.modules, name, raising=False)
    with _no_compiled_dags():
        from ray.dag.compiled_dag_node import _shutdown_all_compiled_dags  # what ray.shutdown runs

        assert _shutdown_all_compiled_dags() is None
        assert not hasattr(sys.modules[name], "CompiledDAG")  # the stand-in, not Ray's module
    assert name not in sys.modules  # a later import gets the real module
    real = importlib.import_module(name)
    assert hasattr(real, "CompiledDAG")
    with _no_compiled_dags():  # once the real one is loaded (DAGs may exist), it is left alone
        assert sys.modules[name] is real


def test_client_actor_runs_the_app_it_was_given_and_wraps_failures_as_flower_does() -> None:
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

    from fedlr.actor import ClientActor

    actor = ClientActor()
    with pytest.raises(LoadClientAppError, match="before set_app"):
        actor.run("msg", "3", "ctx")  # type: ignore[arg-type]
    actor.set_app(lambda: lambda message, context: f"reply to {message}")
    assert actor.run("msg", "3", "ctx") == ("3", "reply to msg", "ctx")  # type: ignore[arg-type]

    def broken(message: str, context: str) -> str:
        raise ValueError("client 3 failed: boom")

    actor.set_app(lambda: broken)
    with pytest.raises(ClientAppException, match="client 3 failed: boom"):
        actor.run("msg", "3", "ctx")  # type: ignore[arg-type]


def test_warm_actor_holds_threads_data_and_model_before_the_first_message() -> None:
    import torch

    from clients import trainer
    from fedlr import config as config_mod
    from fedlr.data import load_federated_data

    cfg = config_mod.resolve({"dataset": "digits", "model": "cnn", "num_clients": 4, "clients_per_round": 2,
                              "simulation.num_cpus": 1})
    threads = torch.get_num_threads()
    trainer._MODELS.clear()
    trainer._THREADS_SET = False
    try:
        trainer.warm(cfg)
        assert torch.get_num_threads() == 1
        data = load_federated_data(cfg)
        key = (cfg["model"], cfg["norm"], cfg["width"], cfg["seed"], data.input_shape, data.num_classes, "cpu")
        assert list(trainer._MODELS) == [key]
    finally:
        torch.set_num_threads(threads)
        trainer._MODELS.clear()
        trainer._THREADS_SET = False


@pytest.mark.ray
def test_lean_ray_runs_actors_and_leaves_no_process_behind() -> None:
    import psutil
    import ray

    from fedlr.actor import FedlrClientActor
    from fedlr.raystart import actors_that_fit, init_ray, shutdown_ray

    init_ray(False, lean=True)
    actors, spawned = [], []
    try:
        node = ray._private.worker._global_node
        children = [p.cmdline() for p in psutil.Process().children(recursive=True)]
        names = " ".join(" ".join(cmd) for cmd in children)
        # The private head runs neither the autoscaler monitor nor the dashboard nor the log
        # monitor, and its raylet neither of its Python agents (stubs instead).
        assert "monitor.py" not in names and "dashboard.py" not in names and "log_monitor" not in names
        assert "dashboard/agent.py" not in names and "runtime_env/agent/main.py" not in names
        assert sum(cmd[:2] == ["/bin/sh", "-c"] and "fedlr-agent-stub" in cmd for cmd in children) == 2
        assert actors_that_fit({"num_cpus": 1, "num_gpus": 0}) == int(ray.cluster_resources()["CPU"])
        with pytest.raises(ValueError, match="simulation.num_gpus = 1"):
            actors_that_fit({"num_cpus": 1, "num_gpus": 1})  # no GPU here
        actors.append(FedlrClientActor.options(num_cpus=1).remote(None))
        pid = ray.get(actors[0].ready.remote())
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        spawned = [raylet, *raylet.children(recursive=True)]
        assert pid in {p.pid for p in spawned}
    finally:
        shutdown_ray(lean=True, actors=actors)
    assert not ray.is_initialized()
    shutdown_ray(lean=True)  # a second stop (the reaper after the engine) is a no-op
    gone, alive = psutil.wait_procs(spawned, timeout=5)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


# ------------------------------------------------------------ actor calls
def _costed(costs: list[float]) -> tuple[list[SimpleNamespace], object]:
    messages = [SimpleNamespace(name=f"m{i}", cost=c) for i, c in enumerate(costs)]
    return messages, lambda m: m.cost


def test_plan_calls_balances_work_two_calls_per_actor_heaviest_first() -> None:
    messages, cost = _costed([5, 1, 1, 1, 4, 2, 2, 3, 1, 1])
    plan = engine.plan_calls(messages, actors=2, cost=cost)
    assert len(plan) == 2 * engine.CALLS_PER_ACTOR
    assert sorted(m.name for call in plan for m in call) == sorted(m.name for m in messages)  # each exactly once
    loads = [sum(m.cost for m in call) for call in plan]
    assert loads == sorted(loads, reverse=True)  # the heaviest call starts first
    assert max(loads) - min(loads) <= max(m.cost for m in messages)  # LPT's bound
    assert [[m.name for m in call] for call in plan] == [["m0", "m9"], ["m4", "m2"], ["m7", "m1", "m3"], ["m5", "m6", "m8"]]
    assert [[m.name for m in c] for c in engine.plan_calls(messages, 2, cost)] == [[m.name for m in c] for c in plan]


def test_plan_calls_cap_and_small_sweeps_keep_one_message_per_call() -> None:
    messages, cost = _costed([1.0] * 9)
    assert [len(c) for c in engine.plan_calls(messages, actors=2, cost=cost, cap=1)] == [1] * 9  # Flower's way
    capped = engine.plan_calls(messages, actors=1, cost=cost, cap=2)
    assert len(capped) == 5 and max(len(c) for c in capped) == 2
    # The equal-cost messages keep their order inside each call.
    assert [[m.name for m in c] for c in engine.plan_calls(messages, actors=1, cost=cost)] == [
        ["m0", "m2", "m4", "m6", "m8"], ["m1", "m3", "m5", "m7"]]
    few, _ = _costed([1.0] * 3)
    assert [len(c) for c in engine.plan_calls(few, actors=2, cost=cost)] == [1, 1, 1]  # fewer messages than calls
    assert engine.plan_calls([], actors=2, cost=cost) == []


def test_delivery_with_a_plan_queues_each_sweep_as_its_calls() -> None:
    state = FakeState({"a": 1, "b": 2, "c": 3})
    queue: Queue = Queue()
    stop = threading.Event()
    stop.wait = lambda timeout=None: stop.set()  # type: ignore[method-assign]
    engine.deliver_messages(state, queue, {1: 0, 2: 1, 3: 2}, stop, plan=lambda batch: [batch[:2], batch[2:]])
    store = state.message_ins_store
    assert queue.get_nowait() == [store["a"], store["b"]] and queue.get_nowait() == [store["c"]]


class _Store:
    """A node's context store, as Flower's ``DeprecatedRunInfoStore`` is used by its worker."""

    def __init__(self, context: str) -> None:
        self.context, self.updates = context, []

    def retrieve_context(self, run_id: int) -> str:
        return self.context

    def update_context(self, run_id: int, context: str) -> None:
        self.updates.append(context)


def test_call_worker_replies_per_message_and_fails_only_the_failed_client(isolated_flower) -> None:
    from flwr.app import Message, RecordDict
    from flwr.clientapp.client_app import ClientAppException
    from flwr.common.constant import ErrorCode

    sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (11, 12, 13)]
    stores = {11: _Store("c11"), 12: _Store("c12"), 13: _Store("c13")}

    class Backend:
        def process_call(self, messages, contexts):
            assert contexts == ["c11", "c12", "c13"]
            yield Message(RecordDict(), reply_to=messages[0]), "c11 after"
            yield ClientAppException("client 12 failed: boom"), None
            yield Message(RecordDict(), reply_to=messages[2]), "c13 after"

    inbox, outbox = Queue(), Queue()
    inbox.put(sent)
    stop = threading.Event()
    metrics = SimpleNamespace(add_clientapp_runtime=lambda s: runtimes.append(s))
    runtimes: list[float] = []
    worker = threading.Thread(target=engine.call_worker, args=(inbox, outbox, stores, Backend(), stop, metrics))
    worker.start()
    replies = [outbox.get(timeout=10) for _ in range(3)]
    stop.set()
    worker.join()
    assert [r.metadata.src_node_id for r in replies] == [11, 12, 13]  # in order, one per message
    assert [r.has_error() for r in replies] == [False, True, False]
    error = replies[1].error
    assert error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert error.reason == ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\n"
                            "Exception ClientAppException occurred. Message: client 12 failed: boom'>")
    assert stores[11].updates == ["c11 after"] and stores[12].updates == [] and stores[13].updates == ["c13 after"]
    assert len({r.metadata.message_id for r in replies}) == 3 and len(runtimes) == 3


@pytest.mark.ray
def test_a_call_streams_replies_and_a_failure_costs_only_its_client() -> None:
    import ray
    from flwr.clientapp.client_app import ClientAppException

    from fedlr.actor import FedlrClientActor
    from fedlr.raypool import FedlrRayBackend
    from fedlr.raystart import init_ray, shutdown_ray

    init_ray(False, lean=True)
    actor = FedlrClientActor.options(num_cpus=1).remote(None)
    try:
        def app(message: str, context: SimpleNamespace) -> str:
            if message == "m2":
                raise ValueError("client 2 failed: boom")
            return f"reply to {message}"

        actor.set_app.remote(lambda: app)
        backend = object.__new__(FedlrRayBackend)
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool

        # As FedlrRayBackend.build sets it up: Flower's pool holding the one actor.
        backend.pool = BasicActorPool(actor_type=FedlrClientActor, client_resources={"num_cpus": 1, "num_gpus": 0},
                                      actor_kwargs={})
        backend.pool.pool, backend.pool.num_actors = [actor], 1
        backend.app_fn = lambda: app
        contexts = [SimpleNamespace(node_config={"partition-id": i}) for i in range(4)]
        outcomes = list(backend.process_call(["m0", "m1", "m2", "m3"], contexts))  # type: ignore[arg-type]
        assert [o for o, _ in outcomes[:2]] == ["reply to m0", "reply to m1"] and outcomes[3][0] == "reply to m3"
        failure, context = outcomes[2]
        # The exception process_message raises for a failed client (Ray's wrapper of it).
        assert isinstance(failure, ClientAppException) and "client 2 failed: boom" in str(failure)
        assert context is None and [c.node_config for _, c in (outcomes[0], outcomes[3])] == [{"partition-id": 0},
                                                                                                {"partition-id": 3}]
        assert backend.pool.pool == [actor]  # the actor is back for the next call
        single = list(backend.process_call(["m2"], contexts[2:3]))  # type: ignore[arg-type]
        assert isinstance(single[0][0], ClientAppException)
    finally:
        shutdown_ray(lean=True, actors=[actor])
