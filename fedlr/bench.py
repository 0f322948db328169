"""Benchmarks that report ratios against a reference measured in the same run.

``fedlr bench overhead``
    The fedlr simulation (Flower + Ray) against a plain PyTorch loop doing the
    same local training in one process: same model, data, client sampling,
    batch order and aggregation, so both must reach the same accuracy; and, to
    tell Ray's share from Flower's, the same loop hand-written on Ray
    (:func:`ray_loop`). Each side runs in a fresh process; wall time includes
    start-up, peak memory is summed over the process tree (Ray's processes
    included).
``fedlr bench scale``
    Time per round and peak memory at several clients-per-round, with a large
    federation of idle clients.
``fedlr bench methods``
    Server- and client-side cost of each method's extra work per round, as
    ratios to FedAvg's local training step on the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fedlr import config as config_mod
from fedlr.config import Config


# --------------------------------------------------------------- measuring
def measure(argv: list[str], poll_s: float = 0.1) -> dict[str, float]:
    """Run ``argv`` and return its wall time and the peak memory of its process tree.

    Two peaks: summed RSS, which counts every shared page (torch's libraries,
    mapped by the driver and by each Ray actor) once per process, and summed
    PSS (proportional set size), which splits shared pages among the processes
    that map them and so adds up to the physical memory the tree occupies.
    Also the peak PSS of each part of the tree (:func:`_role`).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_pss = 0
    roles: dict[str, int] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            usage = [(_role(p, root), *_memory(p)) for p in tree]
            peak = max(peak, sum(rss for _, rss, _ in usage))
            peak_pss = max(peak_pss, sum(pss for _, _, pss in usage))
            for role in {r for r, _, _ in usage}:
                roles[role] = max(roles.get(role, 0), sum(pss for r, _, pss in usage if r == role))
        except psutil.Error:
            pass
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} … failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mb": peak / 2**20, "peak_pss_mb": peak_pss / 2**20,
            **{f"pss_{role}_mb": v / 2**20 for role, v in roles.items()}, **result}



def _role(p: psutil.Process, root: psutil.Process) -> str:
    """``driver`` (the measured process), ``actors`` (client actors and Ray's idle
    workers, which become actors) or ``ray`` (GCS, raylet, agents, monitors)."""
    if p.pid == root.pid:
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "ray"
    return "actors" if any(k in cmd for k in ("ClientActor", "ClientAppActor", "RayTrainer", "ray::IDLE", "default_worker")) else "ray"


def _memory(p: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) of one process from a single read; PSS is 0 where the OS lacks it."""
    try:
        info = p.memory_full_info()
        return info.rss, getattr(info, "pss", 0)
    except psutil.AccessDenied:
        try:
            return p.memory_info().rss, 0
        except psutil.Error:
            return 0, 0
    except psutil.Error:
        return 0, 0


# ------------------------------------------------------ the three workloads
def train_client(cfg: Config, model: Any, data: Any, pid: int, server_round: int) -> int:
    """Client ``pid``'s local training in round ``server_round``, with fedlr's batch
    seeds (``clients.trainer.TRAIN_STREAM``); returns its number of examples."""
    import torch

    from clients.trainer import TRAIN_STREAM
    from fedlr.training import derive_seed, local_sgd

    x, y = (torch.from_numpy(a) for a in data.client(pid))
    local_sgd(model, x, y, epochs=cfg["local_epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
              momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
              seed=derive_seed(cfg["seed"], TRAIN_STREAM, server_round, pid))
    return len(y)


def accumulate(acc: dict[str, Any], weights: dict[str, Any], w: float) -> None:
    """``acc += w · weights``, key by key (a FedAvg sum, taken in partition order
    by both loops, as fedlr's FedAvg sums replies)."""
    for k, v in weights.items():
        acc[k] = acc[k] + v * w if k in acc else v * w


def plain_loop(cfg: Config) -> dict[str, Any]:
    """FedAvg as a plain PyTorch loop in one process, mirroring fedlr exactly:
    the same sampling (``sample_partitions``), batch seeds, aggregation order
    (partition id) and weighting (``num-examples``)."""
    import torch

    from fedlr.data import load_federated_data
    from fedlr.models import build_model
    from fedlr.training import evaluate
    from strategies.base import sample_partitions

    data = load_federated_data(cfg)
    global_model = build_model(cfg, data.input_shape, data.num_classes)
    local = build_model(cfg, data.input_shape, data.num_classes)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    t_first = time.perf_counter()
    for server_round in range(1, cfg["rounds"] + 1):
        if server_round == 2:
            t_first = time.perf_counter()
        pids = sample_partitions(cfg["seed"], server_round, cfg["num_clients"], cfg["clients_per_round"])
        total = sum(len(data.partitions[p]) for p in pids)
        acc: dict[str, torch.Tensor] = {}
        for pid in pids:
            local.load_state_dict(global_model.state_dict())
            accumulate(acc, local.state_dict(), train_client(cfg, local, data, pid, server_round) / total)
        global_model.load_state_dict(acc)
        metrics = evaluate(global_model, x_test, y_test)
    return {"final_accuracy": metrics["test_accuracy"],
            "round_s": (time.perf_counter() - t_first) / max(cfg["rounds"] - 1, 1)}


class RayTrainer:
    """A client actor of :func:`ray_loop`: warmed as fedlr's actors are
    (:func:`clients.trainer.warm`), then plain local SGD on NumPy state dicts."""

    def __init__(self, cfg: Config) -> None:
        from clients.trainer import warm

        warm(cfg)
        self.cfg = cfg

    def train_call(self, state: dict[str, Any], pids: list[int], server_round: int) -> list[tuple[int, dict[str, Any], int]]:
        """:meth:`train` for several clients in one call, as fedlr's actor calls carry them."""
        return [self.train(state, pid, server_round) for pid in pids]

    def train(self, state: dict[str, Any], pid: int, server_round: int) -> tuple[int, dict[str, Any], int]:
        import torch

        from clients.trainer import _model, device
        from fedlr.data import load_federated_data

        data = load_federated_data(self.cfg)
        model = _model(self.cfg, data.input_shape, data.num_classes, device())
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        n = train_client(self.cfg, model, data, pid, server_round)
        # A copy: the next client of the same call trains this very model in place.
        return pid, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, n


def ray_loop(cfg: Config) -> dict[str, Any]:
    """The same FedAvg hand-written on Ray, without Flower: fedlr's lean Ray and
    warm actors, the global model put in the object store once per round, the
    round's clients grouped into the same actor calls as fedlr's
    (:func:`fedlr.engine.plan_calls`), each actor given the next call as soon as
    it is free, aggregation in partition order in the driver as
    :func:`plain_loop` does. What Ray alone costs."""
    import ray
    import torch

    from fedlr.data import load_federated_data
    from fedlr.engine import plan_calls
    from fedlr.models import build_model
    from fedlr.raystart import actors_that_fit, client_resources, init_ray, shutdown_ray
    from fedlr.training import evaluate
    from strategies.base import sample_partitions

    data = load_federated_data(cfg)
    init_ray(False, lean=True)
    resources = client_resources(cfg)
    trainer = ray.remote(RayTrainer).options(**resources)
    actors = [trainer.remote(cfg) for _ in range(actors_that_fit(resources))]
    global_model = build_model(cfg, data.input_shape, data.num_classes)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    t_first = time.perf_counter()
    for server_round in range(1, cfg["rounds"] + 1):
        if server_round == 2:
            t_first = time.perf_counter()
        pids = sample_partitions(cfg["seed"], server_round, cfg["num_clients"], cfg["clients_per_round"])
        state = ray.put({k: v.numpy() for k, v in global_model.state_dict().items()})
        todo = plan_calls(pids, len(actors), lambda pid: len(data.partitions[pid]), cfg["simulation.clients_per_call"])
        idle, running, results = list(actors), {}, {}
        while todo or running:
            while todo and idle:
                actor = idle.pop()
                running[actor.train_call.remote(state, todo.pop(0), server_round)] = actor
            done, _ = ray.wait(list(running), num_returns=1)
            idle.append(running.pop(done[0]))
            for pid, weights, n in ray.get(done[0]):
                results[pid] = (weights, n)
        total = sum(n for _, n in results.values())
        acc: dict[str, torch.Tensor] = {}
        for pid in pids:
            weights, n = results[pid]
            accumulate(acc, {k: torch.from_numpy(v) for k, v in weights.items()}, n / total)
        global_model.load_state_dict(acc)
        metrics = evaluate(global_model, x_test, y_test)
    shutdown_ray(lean=True, actors=actors)
    return {"final_accuracy": metrics["test_accuracy"],
            "round_s": (time.perf_counter() - t_first) / max(cfg["rounds"] - 1, 1)}


def fedlr_sim(cfg: Config) -> dict[str, Any]:
    from fedlr.runner import run_experiment

    with tempfile.TemporaryDirectory() as out:
        summary = run_experiment(cfg, Path(out), quiet=True)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    # Steady-state rounds: from the end of round 1 (which also waits for the
    # actors to start) to the end of the last round.
    steady = (rows[-1]["wall_s"] - rows[1]["wall_s"]) / max(len(rows) - 2, 1)
    return {"final_accuracy": summary["final_accuracy"], "round_s": steady}


def _worker(kind: str, cfg_path: str) -> None:
    cfg = config_mod.load(cfg_path)
    result = {"plain": plain_loop, "ray": ray_loop, "sim": fedlr_sim}[kind](cfg)
    print(json.dumps(result))


def _run(kind: str, cfg: Config) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.toml"
        path.write_text(config_mod.dumps(cfg))
        return measure([sys.executable, "-m", "fedlr.bench", kind, str(path)])


# ------------------------------------------------------------------ benches
OVERHEAD_DEFAULTS = {
    "dataset": "digits", "model": "cnn", "num_clients": 100, "clients_per_round": 10, "rounds": 30,
    "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": 0.05,
}


def bench_overhead(overrides: dict[str, Any]) -> str:
    cfg = config_mod.resolve({**OVERHEAD_DEFAULTS, **overrides})
    from fedlr.data import load_federated_data

    load_federated_data(cfg)  # every side then reads the same warm cache
    plain, bare, sim = _run("plain", cfg), _run("ray", cfg), _run("sim", cfg)

    def same(other: dict[str, float]) -> str:
        # Same sampling, seeds and batch order; only torch's thread count differs (the
        # actors use their CPU share), which reorders float sums in convolutions.
        gap = abs(plain["final_accuracy"] - other["final_accuracy"])
        return "identical" if gap < 1e-9 else f"differs by {gap:.4f}"

    def row(label: str, key: str, fmt: str, unit: str) -> str:
        p, b, s = plain.get(key, 0.0), bare.get(key, 0.0), sim.get(key, 0.0)
        ratio = f"{s / p:.2f}x" if p else ""
        return f"| {label} | {p:{fmt}}{unit} | {b:{fmt}}{unit} | {s:{fmt}}{unit} | {ratio} |"

    lines = [
        f"overhead: {cfg['dataset']}, model {cfg['model']}, {cfg['num_clients']} clients, "
        f"{cfg['clients_per_round']} per round, {cfg['rounds']} rounds (start-up included)",
        "| | plain PyTorch loop | plain Ray loop (no Flower) | fedlr (Flower + Ray) | fedlr / PyTorch loop |",
        "|---|---:|---:|---:|---:|",
        row("wall time", "wall_s", ".1f", " s"),
        row("peak memory (process tree RSS)", "peak_rss_mb", ".0f", " MB"),
        row("peak memory (process tree PSS)", "peak_pss_mb", ".0f", " MB"),
        *(row(f"peak PSS of the {label}", f"pss_{role}_mb", ".0f", " MB").rsplit("|", 2)[0] + "| |"
          for role, label in (("driver", "driver process"), ("actors", "client actors"), ("ray", "Ray daemons"))),
        f"| final accuracy | {plain['final_accuracy']:.4f} | {bare['final_accuracy']:.4f} ({same(bare)}) | "
        f"{sim['final_accuracy']:.4f} ({same(sim)}) | |",
        row(f"time per round (rounds 2..{cfg['rounds']})", "round_s", ".3f", " s"),
        f"| fixed start-up (wall − rounds × time per round) | {_fixed(plain, cfg):.1f} s | {_fixed(bare, cfg):.1f} s | "
        f"{_fixed(sim, cfg):.1f} s | +{_fixed(sim, cfg) - _fixed(plain, cfg):.1f} s |",
        "",
        targets_line(sim["wall_s"] / plain["wall_s"], sim["peak_pss_mb"] / plain["peak_pss_mb"]),
    ]
    return "\n".join(lines)


# Issue 8's targets for fedlr against the plain PyTorch loop, start-up included.
WALL_TARGET, MEMORY_TARGET = 1.3, 2.0


def targets_line(wall_ratio: float, memory_ratio: float) -> str:
    """The verdict against :data:`WALL_TARGET` and :data:`MEMORY_TARGET`."""
    def verdict(ratio: float, target: float) -> str:
        return f"{ratio:.2f}x ({'met' if ratio <= target else 'not met'}, target {target}x)"

    return (f"targets against the plain PyTorch loop: wall time {verdict(wall_ratio, WALL_TARGET)}, "
            f"peak memory (PSS) {verdict(memory_ratio, MEMORY_TARGET)}")


def _fixed(result: dict[str, float], cfg: Config) -> float:
    """Wall time not explained by the steady-state rounds: imports, data, Ray and actor start-up."""
    return result["wall_s"] - cfg["rounds"] * result["round_s"]


def bench_scale(overrides: dict[str, Any], per_round: list[int]) -> str:
    """Time per round and peak memory at each clients-per-round, out of 10,000 clients;
    then the same 10 per round out of 100 clients on the same data, which prices
    the idle clients: their nodes, Contexts and partitions."""
    rows = ["| clients per round | clients in total | time per round | time per client | peak RSS | peak PSS |",
            "|---:|---:|---:|---:|---:|---:|"]
    # 10,000 clients need more samples than digits has: MNIST-1D with 20 per client.
    base = {**OVERHEAD_DEFAULTS, "dataset": "mnist1d", "data.num_samples": 250_000, "num_clients": 10_000,
            "rounds": 4, "model": "mlp", **overrides}
    points = [(k, base["num_clients"]) for k in per_round] + [(min(per_round), 100)]
    for k, total in points:
        cfg = config_mod.resolve({**base, "clients_per_round": k, "num_clients": total})
        res = _run("sim", cfg)
        per = res["round_s"]
        rows.append(f"| {k} | {total} | {per:.2f} s | {1000 * per / k:.1f} ms | {res['peak_rss_mb']:.0f} MB | "
                    f"{res['peak_pss_mb']:.0f} MB |")
    return (f"scale: {base['num_clients']} clients in total, {base['rounds']} rounds each (steady rounds 2..); "
            f"last row: the same data over 100 clients (each trains on 100x more examples)\n" + "\n".join(rows))


def _timeit(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench_methods() -> str:
    """Per-round extra cost of each method, relative to FedAvg's local training."""
    import numpy as np
    import torch

    from fedlr.lowrank import lora, mud
    from fedlr.models import build_model
    from fedlr.training import local_sgd

    cfg = config_mod.resolve({})  # the MLP 40-256-256-10 of the FedMUD spec
    x = torch.randn(320, 1, 40)
    y = torch.randint(0, 10, (320,))
    model = build_model(cfg, (1, 40), 10)
    fedavg = _timeit(lambda: local_sgd(model, x, y, epochs=1, batch_size=32, lr=0.01, seed=0))
    rows = [("FedAvg local training (reference)", fedavg)]

    dmodel = mud.decompose_model(build_model(cfg, (1, 40), 10), "bkd", "aad", 1 / 32, 5.0)
    mud.reset_round(dmodel, 0, 1)
    specs = mud.layer_specs(dmodel)
    factors = mud.model_factors(dmodel)
    rows.append(("FedMUD client: BKD+AAD local training", _timeit(
        lambda: local_sgd(dmodel, x, y, epochs=1, batch_size=32, lr=0.01, seed=0))))
    rows.append(("FedMUD server: rebuild ΔW from factors (per client)", _timeit(
        lambda: mud.model_deltas(specs, factors, 0, 1))))

    b, a = torch.randn(256, 8), torch.randn(8, 256)
    rows.append(("FedSVD server: QR re-factorization, 256x256 rank 8 (per layer)", _timeit(
        lambda: lora.refactorize(b, a))))

    from fedlr.privacy.dpsgd import ClientAccountant, dp_local_sgd

    dp_model = build_model(cfg, (1, 40), 10)
    rows.append(("DP-SGD client: local training with per-sample clipping", _timeit(
        lambda: dp_local_sgd(dp_model, x, y, epochs=1, batch_size=32, lr=0.01, noise_multiplier=1.0,
                             max_grad_norm=1.0, accountant=ClientAccountant(), seed=0), repeat=3)))

    from fedlr.pricing import design

    rng = np.random.default_rng(0)
    costs, values = np.array([0.8, 0.3]), np.array([1.0, 1.0])  # (c_lo, c_hi): high τ costs less
    rows.append(("DaringFed server: OII equilibrium (per arrival)", _timeit(
        lambda: design.oii_design(float(rng.uniform(0.1, 0.9)), costs, values, 2.0), repeat=200)))

    lines = ["| work | time | ratio to FedAvg local training |", "|---|---:|---:|"]
    lines += [f"| {name} | {1000 * t:.2f} ms | {t / fedavg:.3f} |" for name, t in rows]
    return "methods: MLP 40-256-256-10, one client with 320 examples, 1 local epoch\n" + "\n".join(lines)


if __name__ == "__main__":
    from fedlr.cli import exit_now

    _worker(sys.argv[1], sys.argv[2])
    exit_now(0)  # as the fedlr command ends, for both sides alike
