"""Local training loops and the strategy helpers that need no Flower runtime."""

from __future__ import annotations

import torch

from fedlr.training import derive_seed, evaluate, local_sgd
from strategies.base import client_error_text, sample_partitions


def _problem(n: int = 256, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 2), x, y


def _distance(model: torch.nn.Module, anchor: list[torch.Tensor]) -> float:
    return float(sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor)) ** 0.5)


def test_local_sgd_learns_and_is_seeded() -> None:
    model, x, y = _problem()
    before = evaluate(model, x, y)["test_loss"]
    loss = local_sgd(model, x, y, epochs=3, batch_size=32, lr=0.5, seed=1)
    after = evaluate(model, x, y)
    assert after["test_loss"] < before and after["test_accuracy"] > 0.9 and loss > 0
    twin, _, _ = _problem()
    local_sgd(twin, x, y, epochs=3, batch_size=32, lr=0.5, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


def test_fedprox_term_keeps_weights_near_the_global_model() -> None:
    moved = {}
    for mu in (0.0, 10.0):
        model, x, y = _problem()
        anchor = [p.detach().clone() for p in model.parameters()]
        local_sgd(model, x, y, epochs=3, batch_size=32, lr=0.1, seed=1, proximal_mu=mu)
        moved[mu] = _distance(model, anchor)
    assert moved[10.0] < 0.5 * moved[0.0]


def test_sampling_is_a_pure_function_of_seed_and_round() -> None:
    a = sample_partitions(seed=3, server_round=5, num_clients=100, k=10)
    assert a == sample_partitions(seed=3, server_round=5, num_clients=100, k=10)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= p < 100 for p in a)
    assert a != sample_partitions(seed=3, server_round=6, num_clients=100, k=10)
    assert a != sample_partitions(seed=4, server_round=5, num_clients=100, k=10)


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, 2, 1, 3) == derive_seed(0, 2, 1, 3)
    assert len({derive_seed(0, 2, r, p) for r in range(20) for p in range(20)}) == 400
    assert 0 <= derive_seed(1, 2) < 2**63


def test_client_error_text_extracts_the_clients_own_traceback() -> None:
    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
        "Exception ClientAppException occurred. Message: client 4 failed:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\nValueError: bad\n\nThe above exception was the direct cause of the following'
    )
    assert client_error_text(reason, 4) == 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad'
    assert client_error_text("plain reason", 4) == "plain reason"


def test_sgd_matches_torch_optim_sgd_bit_for_bit_without_loading_dynamo() -> None:
    import subprocess
    import sys

    import torch

    from fedlr.training import SGD

    for momentum, weight_decay in ((0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-3)):
        torch.manual_seed(0)
        ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
        ref.load_state_dict(ours.state_dict())
        opt_ours = SGD(list(ours.parameters()), lr=0.1, momentum=momentum, weight_decay=weight_decay)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
        for step in range(4):
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
            for model, opt in ((ours, opt_ours), (ref, opt_ref)):
                opt.zero_grad(set_to_none=True)
                (model(x) ** 2).mean().backward()
                opt.step()
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b), (momentum, weight_decay)
    # A client's local training must not import torch's compiler (0.9 s, 72 MB per actor).
    probe = ("import sys, torch\nfrom fedlr.training import local_sgd\n"
             "m = torch.nn.Linear(4, 2)\n"
             "local_sgd(m, torch.randn(6, 4), torch.randint(0, 2, (6,)), epochs=2, batch_size=4, lr=0.1, seed=0, "
             "momentum=0.9, weight_decay=1e-4, max_grad_norm=1.0)\n"
             "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
