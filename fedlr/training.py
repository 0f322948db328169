"""Local training and evaluation loops in plain PyTorch (no Flower).

Batches are drawn from in-memory tensors with a seeded permutation instead of a
DataLoader: client datasets are small, and worker processes per client would
cost more than the training itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, round, partition, stream): stable
    across processes, unlike Python's salted ``hash``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SGD:
    """Mini-batch SGD with momentum and weight decay, the update of ``torch.optim.SGD``
    (dampening 0, no Nesterov) operation for operation, so results are bit-identical.

    Why not ``torch.optim.SGD``: its first ``step`` imports ``torch._dynamo``,
    0.9 s and 72 MB in every process that trains (each Ray client actor), for
    a compiler fedlr never uses. DP-SGD keeps Opacus's optimizer, which wraps
    torch's.
    """

    def __init__(self, params: list[torch.Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = params
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    max_grad_norm: float = 0.0,
) -> float:
    """Run ``epochs`` of mini-batch SGD on (x, y) in place; return the mean loss.

    A fresh optimizer each call: clients keep no optimizer state across rounds.
    With ``proximal_mu > 0`` the FedProx term (mu/2)·||w − w_t||² is added, w_t
    being the weights at entry (Li et al., MLSys 2020, Eq. 2). With
    ``max_grad_norm > 0`` the gradient of all trained parameters together is
    clipped to that norm before each step (FedSVD's non-private setting,
    ``shared/specs/fedsvd.md`` §4).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    n = len(y)
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss_total = loss + 0.5 * proximal_mu * prox
            else:
                loss_total = loss
            opt.zero_grad(set_to_none=True)
            loss_total.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on (x, y)."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(1) == target).sum())
    return {"test_accuracy": correct / len(y), "test_loss": loss / len(y)}

