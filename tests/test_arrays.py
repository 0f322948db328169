"""fedlr.arrays: Flower Array encoding and decoding, byte for byte NumPy's."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlr import arrays

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.arange(24, dtype=np.int64).reshape(2, 3, 4)[:, ::2, 1:],  # not contiguous: saved in C order
    np.array(3.5, dtype=np.float16),  # 0-d
    np.zeros((0, 5), dtype=np.int8),  # empty
    np.array([True, False]),
    np.arange(6, dtype=">i4"),  # big-endian
    np.zeros((2,) * 30, dtype=np.uint8)[(0,) * 20],  # a long shape
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_encode_is_np_save_and_decode_is_np_load(case: int) -> None:
    a = CASES[case]
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    assert arrays.encode(a) == buf.getvalue()
    assert arrays.encode(a) == buf.getvalue()  # from the header cache, too
    ref = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
    for _ in range(2):
        got = arrays.decode(buf.getvalue())
        assert got is not None and got.dtype == ref.dtype and got.shape == ref.shape
        assert np.array_equal(got, ref) and got.flags.writeable and got.flags.owndata
        assert got.flags.f_contiguous == ref.flags.f_contiguous


def test_unusual_arrays_take_numpys_own_path() -> None:
    structured = np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")])
    buf = io.BytesIO()
    np.save(buf, structured, allow_pickle=False)
    assert arrays.decode(buf.getvalue()) is None
    assert arrays.decode(b"not an npy file") is None


def test_installed_array_round_trips_a_model_exactly() -> None:
    assert arrays.install() and arrays.install()  # idempotent
    assert getattr(Array.numpy, "__fedlr_fast__", False)
    state = torch.nn.Conv2d(3, 4, 3).state_dict()
    record = ArrayRecord(state)
    for key, value in state.items():
        buf = io.BytesIO()
        np.save(buf, value.numpy(), allow_pickle=False)
        assert record[key].data == buf.getvalue()  # what travels is np.save's bytes
        assert torch.equal(record.to_torch_state_dict()[key], value)
    structured = np.zeros(2, dtype=[("a", "<i4")])
    assert Array(structured).numpy().dtype == structured.dtype  # NumPy's path, same result
