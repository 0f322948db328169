"""What every fedlr strategy adds to Flower's: seeded sampling, loud failures,
byte accounting, and a round loop that records metrics as rounds complete.

Flower 1.41's ``FedAvg`` samples with an unseeded ``random.sample`` over random
64-bit node ids, and turns a ClientApp exception into an error reply that it
logs and skips (``shared/specs/flower-notes.md``). :class:`FedlrStrategy` is a
mixin placed before a Flower strategy in the MRO; it fixes both without
re-implementing that strategy's aggregation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from torch import nn

from fedlr.comm import messages_nbytes
from fedlr.config import Config
from fedlr.models import build_model

# Distinguishes the sampling stream from other streams derived from the run seed.
SAMPLING_STREAM = 1


class ClientFailure(RuntimeError):
    """One or more clients failed a round; the message names them and their errors."""


class PrivacyBudgetExhausted(ClientFailure):
    """A client refused to train because the round would exceed its privacy budget
    (``fedlr.privacy.BudgetExceededError``); the run stops, no client exceeds it."""


class Diverged(RuntimeError):
    """The aggregated global model holds NaN or infinite values: every later round
    would only propagate them, and its metrics would be meaningless."""


def non_finite_arrays(arrays: ArrayRecord) -> list[str]:
    """Names of the entries of ``arrays`` that hold a NaN or an infinity."""
    return [name for name, array in arrays.items() if not np.isfinite(array.numpy()).all()]


class _SampledGrid:
    """A view of the grid that exposes only this round's sampled nodes, so the
    wrapped Flower strategy's own sampling picks exactly them."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a client traceback ending in fedlr.privacy.BudgetExceededError.
_BUDGET_ERROR = re.compile(r"BudgetExceededError: (.+)")


def client_error_text(reason: str, partition_id: int | str) -> str:
    """The client's own traceback out of Flower's error reason.

    Ray and Flower wrap a ClientApp exception in their own frames and repeat it;
    ``clients.client_app`` raises ``client N failed:`` followed by the original
    traceback, which is what a user needs to see.
    """
    text = _ANSI.sub("", reason)
    marker = f"client {partition_id} failed:"
    start = text.find(marker)
    if start < 0:
        return text.strip()
    text = text[start + len(marker):]
    end = text.find("\n\nThe above exception was the direct cause")
    return (text[:end] if end >= 0 else text).strip()


def sample_partitions(seed: int, server_round: int, num_clients: int, k: int) -> list[int]:
    """The partition ids trained in ``server_round``: a pure function of the seed
    and the round, so a resumed run samples exactly what the original would."""
    rng = np.random.default_rng([seed, SAMPLING_STREAM, server_round])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


class FedlrStrategy:
    """Mixin for ``flwr.serverapp.strategy`` classes (put it first in the bases).

    Parameters
    ----------
    cfg : Config
        The resolved fedlr configuration.
    node_to_partition : dict[int, int]
        Flower node id to partition id, collected by querying every node.
    **kwargs
        Passed to the Flower strategy (e.g. ``proximal_mu`` or ``eta``).
    """

    def __init__(self, *, cfg: Config, node_to_partition: dict[int, int], **kwargs: Any) -> None:
        # All sampling happens here; the Flower strategy then takes every node it sees.
        super().__init__(fraction_train=1.0, min_train_nodes=0, min_available_nodes=0, **kwargs)
        self.cfg = cfg
        self.partition_of = dict(node_to_partition)
        self.node_of = {pid: nid for nid, pid in node_to_partition.items()}
        self.round_extra: dict[str, Any] = {}
        # Largest cumulative ε any client has reported (shared/specs/fedsvd.md §3.2).
        self.max_epsilon = 0.0

    # ------------------------------------------------------------- sampling
    def sampled_partitions(self, server_round: int) -> list[int]:
        return sample_partitions(self.cfg["seed"], server_round, self.cfg["num_clients"], self.cfg["clients_per_round"])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        nodes = [self.node_of[pid] for pid in self.sampled_partitions(server_round)]
        messages = list(super().configure_train(server_round, arrays, config, _SampledGrid(grid, nodes)))
        # Flower shuffles the sampled nodes; a fixed order keeps runs identical.
        return sorted(messages, key=lambda m: self.partition_of[m.metadata.dst_node_id])

    # ------------------------------------------------------------- failures
    def check_replies(self, server_round: int, sent: list[Message], replies: list[Message]) -> list[Message]:
        """Drop failed clients if there are at most ``max_failures`` of them, else
        raise :class:`ClientFailure` naming each one with its error.

        A client fails by an error reply (its exception) or by no reply within
        ``simulation.round_timeout``. Failed partition ids are recorded in the
        round's ``failed_clients``. A round in which every client failed always
        fails the run: keeping the old model silently is what fedlr refuses to do.
        Returns the good replies sorted by partition id (fixed float sums).

        A client that refused a round because it would exceed its privacy
        budget raises :class:`PrivacyBudgetExhausted` whatever ``max_failures``
        says: going on without it would hide that the run outlived its budget.
        """
        for msg in sorted(replies, key=lambda m: self.partition_of[m.metadata.src_node_id]):
            budget = _BUDGET_ERROR.search(_ANSI.sub("", msg.error.reason or "")) if msg.has_error() else None
            if budget:
                pid = self.partition_of[msg.metadata.src_node_id]
                raise PrivacyBudgetExhausted(
                    f"round {server_round}: stopped, client {pid} would exceed its privacy budget: "
                    f"{budget.group(1).strip()}"
                )
        errors: dict[int, str] = {}
        for msg in replies:
            if msg.has_error():
                pid = self.partition_of[msg.metadata.src_node_id]
                errors[pid] = f"client {pid} failed:\n{client_error_text(msg.error.reason, pid)}"
        answered = {m.metadata.src_node_id for m in replies}
        timeout = self.cfg["simulation.round_timeout"]
        for msg in sent:
            if msg.metadata.dst_node_id not in answered:
                pid = self.partition_of[msg.metadata.dst_node_id]
                errors[pid] = f"client {pid} sent no reply within simulation.round_timeout = {timeout} s"
        good = [m for m in replies if not m.has_error()]
        if len(errors) > self.cfg["max_failures"] or not good:
            limit = f"{len(errors)} failed, max_failures = {self.cfg['max_failures']}"
            raise ClientFailure(f"round {server_round} ({limit}): " + "\n".join(errors[p] for p in sorted(errors)))
        if errors:
            self.round_extra["failed_clients"] = sorted(errors)
        return sorted(good, key=lambda m: self.partition_of[m.metadata.src_node_id])

    # ------------------------------------------------------------ privacy
    def track_epsilon(self, server_round: int, replies: list[Message]) -> float | None:
        """The largest cumulative ε of any client so far, from the replies' ``epsilon`` metric.

        Each client's ε is cumulative and never decreases, so the running
        maximum over every reply received is the maximum over clients. None
        when the run is not private. Under DP-SGD or LDP a reply without
        ``epsilon`` is a protocol error: the run's privacy claim would be unsupported.
        """
        mechanism = self.cfg["privacy.mechanism"]
        private = mechanism != "none"  # dpsgd, and ldp (fedlr.privacy.ldp: cumulative ε of the releases)
        for msg in replies:
            metrics = next(iter(msg.content.metric_records.values()))
            if "epsilon" in metrics:
                self.max_epsilon = max(self.max_epsilon, float(metrics["epsilon"]))
            elif private:
                pid = self.partition_of[msg.metadata.src_node_id]
                raise ClientFailure(
                    f"round {server_round}: client {pid} trained with privacy.mechanism = {mechanism!r} "
                    "but reported no epsilon"
                )
        return self.max_epsilon if private else None

    def reply_arrays(self, server_round: int, replies: list[Message], expected: set[str]) -> list[ArrayRecord]:
        """Each reply's single ArrayRecord; anything but exactly the ``expected``
        keys is a protocol error, never something to average."""
        validate_message_reply_consistency(
            [m.content for m in replies], weighted_by_key=self.weighted_by_key, check_arrayrecord=True
        )
        records = []
        for msg in replies:
            record = next(iter(msg.content.array_records.values()))
            if set(record) != expected:
                pid = self.partition_of[msg.metadata.src_node_id]
                raise ValueError(
                    f"round {server_round}: client {pid} sent arrays {sorted(record)}; "
                    f"{self.cfg['method']} expects {sorted(expected)}"
                )
            records.append(record)
        return records

    def summary_extra(self) -> dict[str, Any]:
        """Method-specific entries for ``summary.json`` (e.g. FedMUD's realized ratio)."""
        return {}

    def restore_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Take up what the strategy derives from the rounds already recorded (on resume)."""
        self.max_epsilon = max((float(r.get("epsilon", 0.0)) for r in rows), default=0.0)

    # ------------------------------------------------------------ the global model
    def build_global_model(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, ArrayRecord]:
        """The network server-side evaluation runs, and the initial global arrays.

        The arrays are what flows through :meth:`run_rounds` and into the
        checkpoints. Dense methods: ``fedlr.models.build_model`` and its whole
        state dict. A method whose global state is something else (LoRA: only
        the adapters of a frozen pretrained model) overrides this and
        :meth:`load_global_arrays`.
        """
        model = build_model(self.cfg, input_shape, num_classes)
        return model, ArrayRecord(model.state_dict())

    def load_global_arrays(self, model: nn.Module, arrays: ArrayRecord) -> None:
        """Put the global ``arrays`` into the model of :meth:`build_global_model`."""
        model.load_state_dict(arrays.to_torch_state_dict())

    # ------------------------------------------------------------ state (resume)
    def state_dict(self) -> dict[str, Any]:
        """Strategy state beyond the global model (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ------------------------------------------------------------- the loop
    def train_config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({"server-round": server_round})

    def run_rounds(
        self,
        grid: Grid,
        arrays: ArrayRecord,
        evaluate_fn: Callable[[int, ArrayRecord], dict[str, float]],
        on_round: Callable[[int, ArrayRecord, dict[str, Any]], None],
        first_round: int = 1,
    ) -> ArrayRecord:
        """Run rounds ``first_round..cfg['rounds']``; ``on_round`` records each one.

        Mirrors ``Strategy.start`` (configure_train, send_and_receive,
        aggregate_train, centralized evaluation) but measures bytes, checks every
        reply and hands each round's row to ``on_round`` as soon as it exists.
        Federated evaluation is not used: the server holds the test set.
        """
        for server_round in range(first_round, self.cfg["rounds"] + 1):
            self.round_extra = {}
            sent = list(self.configure_train(server_round, arrays, self.train_config(server_round), grid))
            bytes_down = messages_nbytes(sent)
            replies = list(grid.send_and_receive(sent, timeout=self.cfg["simulation.round_timeout"]))
            replies = self.check_replies(server_round, sent, replies)
            bytes_up = messages_nbytes(replies)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is None:  # cannot happen after check_replies; never keep a stale model silently
                raise ClientFailure(f"round {server_round}: aggregation produced no model")
            if bad := non_finite_arrays(new_arrays):
                # Stop here, loudly: a NaN run that "completes" passes for a result in a sweep.
                raise Diverged(
                    f"round {server_round}: the global model diverged (non-finite values in {', '.join(bad[:3])}"
                    f"{' …' if len(bad) > 3 else ''}); lower lr, or raise privacy.clip / privacy.epsilon"
                )
            arrays = new_arrays
            row: dict[str, Any] = {"round": server_round, **evaluate_fn(server_round, arrays)}
            row.update(bytes_up=bytes_up, bytes_down=bytes_down, clients=len(replies))
            epsilon = self.track_epsilon(server_round, replies)
            if epsilon is not None:
                row["epsilon"] = epsilon
            if train_metrics is not None and "train_loss" in train_metrics:
                row["train_loss"] = float(train_metrics["train_loss"])
            row.update(self.round_extra)
            on_round(server_round, arrays, row)
        return arrays
