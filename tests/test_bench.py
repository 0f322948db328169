"""fedlr.bench: the references the overhead benchmark compares fedlr against."""

from __future__ import annotations

import pytest

from fedlr import bench
from fedlr import config as config_mod

# Six clients a round: on two actors, calls of two clients (fedlr.engine.plan_calls).
TINY = {"dataset": "digits", "model": "cnn", "num_clients": 6, "clients_per_round": 6, "rounds": 2,
        "partition": "iid", "local_epochs": 1, "batch_size": 32, "lr": 0.05}


@pytest.mark.ray
def test_plain_ray_loop_trains_exactly_as_the_plain_pytorch_loop() -> None:
    import torch

    cfg = config_mod.resolve(TINY)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the actors' thread count: same float sums on both sides
        plain = bench.plain_loop(cfg)
        on_ray = bench.ray_loop(cfg)
    finally:
        torch.set_num_threads(threads)
    assert on_ray["final_accuracy"] == plain["final_accuracy"]
    assert on_ray["round_s"] > 0


def test_memory_roles_name_the_client_actors_of_both_ray_sides() -> None:
    class Proc:
        def __init__(self, pid: int, cmd: str) -> None:
            self.pid, self.cmd = pid, cmd

        def cmdline(self) -> list[str]:
            return self.cmd.split()

    root = Proc(1, "python -m fedlr.bench sim cfg.toml")
    assert bench._role(root, root) == "driver"  # type: ignore[arg-type]
    assert bench._role(Proc(2, "ray::ClientActor.run"), root) == "actors"  # type: ignore[arg-type]
    assert bench._role(Proc(3, "ray::RayTrainer.train"), root) == "actors"  # type: ignore[arg-type]
    assert bench._role(Proc(4, "ray::IDLE"), root) == "actors"  # type: ignore[arg-type]
    assert bench._role(Proc(5, "/x/ray/core/src/ray/raylet/raylet --node"), root) == "ray"  # type: ignore[arg-type]


def test_targets_line_says_met_only_at_or_below_the_target() -> None:
    assert bench.targets_line(1.3, 2.5) == ("targets against the plain PyTorch loop: wall time 1.30x (met, target 1.3x), "
                                            "peak memory (PSS) 2.50x (not met, target 2.0x)")
    assert "wall time 1.31x (not met" in bench.targets_line(1.31, 1.0)
    assert "(PSS) 1.00x (met" in bench.targets_line(1.31, 1.0)
