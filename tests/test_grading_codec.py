"""The codec through which a grader worker's answers come back: every plain value round-trips
exactly as a fresh builtin, objects that are not plain data become handles, and malformed or
oversized bytes are refused with CodecError, never executed or half-built."""

import math
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from minillm.grading import codec


def _kept(obj):
    return codec.Handle(7, type(obj).__qualname__)


def roundtrip(value):
    return codec.decode(codec.encode(value, _kept))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**200,
        -(2**70),
        1.5,
        -0.0,
        math.inf,
        1e-300,
        2 + 3j,
        "",
        "héllo 世界 🙂",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        (1, "a", None),
        {"a": 1, 2: [3]},
        {(1, 2): 3, None: 4.0},
        {1, 2, 3},
        frozenset({"x"}),
        {"nested": {"deep": (1, {2})}},
    ],
)
def test_plain_values_round_trip(value):
    assert roundtrip(value) == value
    assert type(roundtrip(value)) is type(value)


def test_nan_survives():
    assert math.isnan(roundtrip(float("nan")))


@pytest.mark.parametrize(
    "dtype", ["bool", "int8", "uint16", "int64", "float16", "float32", "float64", "complex128"]
)
def test_numpy_arrays_and_scalars_round_trip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    back = roundtrip(a)
    assert type(back) is np.ndarray and back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert back.flags.writeable
    scalar = roundtrip(a.reshape(-1)[1])
    assert isinstance(scalar, np.generic) and scalar.dtype == a.dtype and scalar == a.reshape(-1)[1]
    assert roundtrip(np.zeros((0, 3), dtype)).shape == (0, 3)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bool,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.complex64,
    ],
)
def test_tensors_round_trip_exactly(dtype):
    t = (torch.arange(12, dtype=torch.float64).reshape(3, 4) / 7).to(dtype)
    back = roundtrip(t)
    assert type(back) is torch.Tensor and back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    view = t.t()  # not contiguous
    assert torch.equal(roundtrip(view), view)
    assert roundtrip(torch.zeros(0, 2, dtype=dtype)).shape == (0, 2)
    assert roundtrip(torch.tensor(5, dtype=dtype)).shape == ()


def test_a_tensor_that_needs_grad_comes_back_as_data():
    t = torch.ones(2, requires_grad=True) * 3
    back = roundtrip(t)
    assert not back.requires_grad and back.grad_fn is None and back.tolist() == [3.0, 3.0]
    assert roundtrip(torch.float64) is torch.float64


def test_forged_subclasses_arrive_as_plain_builtins():
    class Yes(float):
        def __eq__(self, other):
            return True

    class YesStr(str):
        def __eq__(self, other):
            return True

    class YesList(list):
        def __eq__(self, other):
            return True

    class YesArray(np.ndarray):
        def __eq__(self, other):
            return True

    for forged, kind in [(Yes(1.0), float), (YesStr("a"), str), (YesList([1]), list)]:
        back = roundtrip(forged)
        assert type(back) is kind and back != 2
    back = roundtrip(np.zeros(2).view(YesArray))
    assert type(back) is np.ndarray and not (back == 1).any()


def test_objects_that_are_not_data_become_handles():
    class Model:
        pass

    back = roundtrip({"model": Model(), "items": [lambda: 1]})
    assert back["model"] == codec.Handle(
        7, "test_objects_that_are_not_data_become_handles.<locals>.Model"
    )
    assert isinstance(back["items"][0], codec.Handle)


def _frame(*parts):
    return b"".join(parts)


def _n(value):
    return struct.pack("<Q", value)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"Q",  # an unknown tag
        b"N trailing",  # trailing bytes
        _frame(b"S", _n(10), b"short"),  # truncated
        _frame(b"S", _n(2), b"\xff\xfe"),  # not UTF-8
        _frame(b"L", _n(2**60)),  # a list claiming 2^60 items
        _frame(b"E", _n(1), b"L", _n(0)),  # a set holding a list
        _frame(b"M", _n(1), b"L", _n(0), b"N"),  # a dict keyed by a list
        _frame(b"A", _n(3), b"<f8", _n(1), _n(4), _n(8), b"\x00" * 8),  # shape vs bytes
        _frame(b"A", _n(3), b"|O8", _n(1), _n(1), _n(8), b"\x00" * 8),  # object dtype
        _frame(b"X", _n(7), b"float64", _n(1), _n(2), _n(8), b"\x00" * 8),  # shape vs bytes
        _frame(b"X", _n(6), b"object", _n(0), _n(0)),  # no such tensor dtype
        _frame(b"Y", _n(4), b"Size"),  # not a dtype
        _frame(b"I", _n(2**20), b"\x01" * 16),  # an int too large
        _frame(b"A", _n(3), b"<f8", _n(40), *([_n(1)] * 40), _n(8), b"\x00" * 8),  # 40 dims
        b"L" + _n(1) + b"L" + _n(1) * 0 + (b"L" + _n(1)) * 100 + b"N",  # too deep
    ],
)
def test_malformed_bytes_are_refused(data):
    with pytest.raises(codec.CodecError):
        codec.decode(data)


def test_values_too_deep_to_send_are_refused():
    deep = []
    for _ in range(codec.MAX_DEPTH + 2):
        deep = [deep]
    with pytest.raises(codec.CodecError):
        codec.encode(deep, _kept)


def test_a_worker_without_torch_answers_without_importing_it():
    """Chapter 01's worker has only numpy ready (WORKER_IMPORTS): sending its answers back and
    copying its arguments must not import torch, which would add 3 s to every test."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from minillm.grading import codec, worker\n"
        "value = [1, (2.5, 'x'), {'a': np.arange(3)}, {3}, np.float32(1), None]\n"
        "assert codec.decode(codec.encode(value, None))[2]['a'].tolist() == [0, 1, 2]\n"
        "assert worker._state(value)[2]['a'] is value[2]['a']\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
    # Where torch is loaded its tensors still travel as tensors.
    assert torch.equal(roundtrip([torch.arange(3)])[0], torch.arange(3))
