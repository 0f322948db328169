"""The frozen pretrained model W₀ under LoRA fine-tuning, and the LoRA model built on it.

FedSVD and its baselines fine-tune adapters on a *pretrained* model whose
weights, head included, stay frozen (Lee et al., *FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA*, NeurIPS 2025,
arXiv 2505.12805; ``shared/specs/fedsvd.md`` §1, §6). fedlr has no pretrained
network to download, so it makes one offline, by a **task shift** [fedlr]:

* the *source task* is the classes ``fedsvd.source_classes`` of the dataset
  (default ``0-4``); fedlr trains ``fedlr.models.build_model`` on all of their
  training examples centrally, with Adam (lr 1e-3, ``fedsvd.pretrain_epochs``
  epochs, spec §6);
* the *federated task* is ``data.classes`` (e.g. ``5-9``), relabelled 0, 1, ...
  so the frozen head's outputs are reused for new classes. Its examples are
  disjoint from the source's (``fedlr.config`` enforces disjoint classes), so
  pretraining never sees a client's private data.

In ``experiments/fedsvd`` (MNIST-1D, 24,000 samples) W₀ scores 0.90 on digits
0-4 and 0.53 on 5-9, a related but different task: there is room for
fine-tuning, and only the adapters can provide it.

The state dict is cached on disk (``fedlr.data.cache_dir()``) under a hash of
every key it depends on, and built before Ray starts (``strategies.preflight``),
so the server and every client load the identical W₀. ``fedsvd.pretrained``
names a state dict to use instead.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlr.config import Config, parse_classes
from fedlr.data import cache_dir, load_task
from fedlr.lowrank.lora import add_lora
from fedlr.models import build_model
from fedlr.results import write_atomic
from fedlr.training import derive_seed

# Central pretraining (spec §6): Adam with lr 1e-3; the batch size is fedlr's.
PRETRAIN_LR = 1e-3
PRETRAIN_BATCH = 64
PRETRAIN_STREAM = 3  # seed stream of the batch order (cf. clients.trainer.TRAIN_STREAM)
# Everything the pretrained weights depend on; bump the version when the procedure changes.
PRETRAIN_KEYS = (
    "dataset", "seed", "data.num_samples", "data.test_fraction",
    "model", "width", "norm", "fedsvd.source_classes", "fedsvd.pretrain_epochs",
)
PRETRAIN_VERSION = 1

_MEMO: dict[tuple[str, tuple[int, ...], int], dict[str, Tensor]] = {}


def pretrain_key(cfg: Config) -> str:
    """Hash of the keys that determine the pretrained weights (the cache file name)."""
    payload = json.dumps({"version": PRETRAIN_VERSION, **{k: cfg[k] for k in PRETRAIN_KEYS}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def pretrain(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Train ``build_model(cfg)`` centrally on the source task (spec §6, [fedlr] task shift).

    Parameters
    ----------
    cfg
        Resolved config; ``fedsvd.source_classes`` and ``fedsvd.pretrain_epochs`` apply.
    input_shape, num_classes
        Of the federated task, which the model must fit; ``num_classes`` must
        equal the number of source classes (``fedlr.config`` checks it).

    Returns
    -------
    nn.Module
        The trained model.
    """
    source = parse_classes(cfg["fedsvd.source_classes"])
    if len(source) != num_classes:
        raise ValueError(f"fedsvd.source_classes has {len(source)} classes but the model needs {num_classes}")
    x, y = (torch.from_numpy(a) for a in load_task(cfg, source)[:2])
    model = build_model(cfg, input_shape, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
    gen = torch.Generator().manual_seed(derive_seed(cfg["seed"], PRETRAIN_STREAM))
    model.train()
    # One thread: the weights then do not depend on the machine's core count,
    # and batches of 64 through a small network gain nothing from more (on a
    # busy 2-core machine two threads made pretraining 12x slower, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(cfg["fedsvd.pretrain_epochs"]):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), PRETRAIN_BATCH):
                idx = order[start : start + PRETRAIN_BATCH]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model


def _load_given(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"fedsvd.pretrained = {path!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"fedsvd.pretrained = {path!r}: not a torch state dict ({type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"fedsvd.pretrained = {path!r}: must hold a state dict (torch.save(model.state_dict()))")
    return state


def pretrained_state(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Tensor]:
    """W₀: the state dict of ``fedsvd.pretrained``, or of :func:`pretrain` (disk-cached, memoised).

    The cache file is written atomically, so concurrent readers see all of it or none.
    """
    given = cfg["fedsvd.pretrained"]
    memo_key = (given or pretrain_key(cfg), tuple(input_shape), num_classes)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    if given:
        state = _load_given(given)
    else:
        path = cache_dir() / f"pretrained-{pretrain_key(cfg)}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = {k: v.detach().clone() for k, v in pretrain(cfg, input_shape, num_classes).state_dict().items()}
            buf = io.BytesIO()
            torch.save(state, buf)
            write_atomic(path, buf.getvalue())
    _MEMO[memo_key] = state
    return state


def pretrained_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``build_model(cfg)`` holding W₀.

    Raises
    ------
    ValueError
        If ``fedsvd.pretrained`` is missing, unreadable or does not fit the model.
    """
    model = build_model(cfg, input_shape, num_classes)
    try:
        model.load_state_dict(pretrained_state(cfg, input_shape, num_classes))
    except RuntimeError as err:
        # torch lists one problem per line after a header; the first one is enough.
        lines = str(err).strip().splitlines()
        raise ValueError(
            f"fedsvd.pretrained = {cfg['fedsvd.pretrained']!r}: does not fit model = {cfg['model']!r} "
            f"(width {cfg['width']}, {num_classes} classes): {lines[min(1, len(lines) - 1)].strip()}"
        ) from None
    return model


def build_lora_model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """W₀ with LoRA adapters on every hidden Linear layer, for ``cfg['method']`` (spec §1, §4).

    A₀ comes from the run seed (``fedlr.lowrank.lora.initial_a``) and B₀ = 0,
    so every process builds the same model and the adapted model first
    computes exactly what W₀ does. Only the method's trained factors have
    ``requires_grad`` (B; A and B for ``fedavg-lora``).

    Raises
    ------
    ValueError
        From :func:`pretrained_model`, or a rank a layer cannot hold (``fedsvd.rank``).
    """
    model = pretrained_model(cfg, input_shape, num_classes)
    try:
        return add_lora(model, cfg["fedsvd.rank"], cfg["fedsvd.alpha"], cfg["method"], seed=cfg["seed"])
    except ValueError as err:
        raise ValueError(f"fedsvd.rank = {cfg['fedsvd.rank']}: {err}") from None
