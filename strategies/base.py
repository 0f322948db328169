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

from fedlr.comm import messages_nbytes
from fedlr.config import Config

# Distinguishes the sampling stream from other streams derived from the run seed.
SAMPLING_STREAM = 1


class ClientFailure(RuntimeError):
    """One or more clients failed a round; the message names them and their errors."""


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
        """
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
            arrays = new_arrays
            row: dict[str, Any] = {"round": server_round, **evaluate_fn(server_round, arrays)}
            row.update(bytes_up=bytes_up, bytes_down=bytes_down, clients=len(replies))
            if train_metrics is not None and "train_loss" in train_metrics:
                row["train_loss"] = float(train_metrics["train_loss"])
            row.update(self.round_extra)
            on_round(server_round, arrays, row)
        return arrays
