"""Byte accounting of what travels in Flower messages.

``bytes_up``/``bytes_down`` in ``metrics.jsonl`` are measured here from the
records actually sent: the sum of ``nbytes`` over every array of every
ArrayRecord in a message (``shared/CONTRACT.md``). Config and metric records
are a few scalars and are not counted; serialization headers are not payload.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, Message, RecordDict


def array_nbytes(array: Array) -> int:
    """Payload bytes of one array: elements times item size (``ndarray.nbytes``)."""
    return math.prod(array.shape) * np.dtype(array.dtype).itemsize


def record_nbytes(content: RecordDict) -> int:
    """Payload bytes of all arrays in a message's content."""
    return sum(array_nbytes(a) for rec in content.array_records.values() for a in rec.values())


def messages_nbytes(messages: Iterable[Message]) -> int:
    """Payload bytes of a batch of messages; error replies carry none."""
    return sum(record_nbytes(m.content) for m in messages if not m.has_error())
