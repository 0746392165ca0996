"""The one format in which a worker's answers reach the grader: plain data only.

The grader never unpickles what a worker sends. `decode` builds None, bool, int, float, complex,
str, bytes, list, tuple, dict, set, frozenset, numpy arrays and scalars, torch tensors and dtypes,
and `Handle`s (references to objects that stay in the worker) from tagged bytes, with limits on
size and depth, so a worker can send any value it could have returned, and nothing that runs
code or compares in a forged way: every object the grader gets is a fresh instance of a builtin
type (or a numpy/torch array built from raw bytes).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

import numpy as np

MAX_DEPTH = 64
MAX_ITEMS = 5_000_000
MAX_INT_BYTES = 1 << 16

_NUMPY_DTYPES = {
    np.dtype(name).str: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_TORCH_DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)


class CodecError(ValueError):
    """Bytes that are not a valid answer, or a value too big or too deep to send."""


@dataclass(frozen=True)
class Handle:
    """An object that stayed in the worker: its number there and its type's name."""

    ident: int
    type_name: str


def _torch():
    import torch

    return torch


def encode(value, to_handle) -> bytes:
    """Tagged bytes for `value`; objects that are not plain data go through `to_handle(obj)`,
    which must return a Handle (the worker keeps the object)."""
    out = bytearray()
    _Encoder(out, to_handle).write(value, 0)
    return bytes(out)


class _Encoder:
    def __init__(self, out: bytearray, to_handle):
        self.out = out
        self.to_handle = to_handle
        self.torch = None

    def _len(self, n: int) -> None:
        self.out += struct.pack("<Q", n)

    def _blob(self, data: bytes) -> None:
        self._len(len(data))
        self.out += data

    def write(self, v, depth: int) -> None:  # noqa: C901 - one branch per type is the clearest
        if depth > MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
        out = self.out
        if v is None:
            out += b"N"
        elif v is True or v is False:
            out += b"T" if v else b"F"
        elif isinstance(v, np.generic) and v.dtype.str in _NUMPY_DTYPES:
            out += b"G"
            self._array(np.asarray(v))
        elif isinstance(v, bool):
            out += b"T" if v else b"F"
        elif isinstance(v, int):
            n = int(v)
            out += b"I"
            self._blob(n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True))
        elif isinstance(v, float):
            out += b"D" + struct.pack("<d", float(v))
        elif isinstance(v, complex):
            c = complex(v)
            out += b"C" + struct.pack("<dd", c.real, c.imag)
        elif isinstance(v, str):
            out += b"S"
            self._blob(str(v).encode("utf-8", "surrogatepass"))
        elif isinstance(v, (bytes, bytearray)):
            out += b"B"
            self._blob(bytes(v))
        elif isinstance(v, np.ndarray) and v.dtype.str in _NUMPY_DTYPES:
            out += b"A"
            self._array(v)
        elif self._is_tensor(v):
            self._tensor(v)
        elif self._is_dtype(v):
            out += b"Y"
            self._blob(str(v).removeprefix("torch.").encode())
        elif isinstance(v, (list, tuple, set, frozenset)):
            out += {list: b"L", tuple: b"U", set: b"E", frozenset: b"Z"}[
                next(t for t in (list, tuple, set, frozenset) if isinstance(v, t))
            ]
            items = list(v)
            self._len(len(items))
            for item in items:
                self.write(item, depth + 1)
        elif isinstance(v, dict):
            items = list(v.items())
            out += b"M"
            self._len(len(items))
            for key, item in items:
                self.write(key, depth + 1)
                self.write(item, depth + 1)
        else:
            handle = self.to_handle(v)
            out += b"H"
            self._len(handle.ident)
            self._blob(handle.type_name.encode()[:200])

    def _array(self, a: np.ndarray) -> None:
        a = np.asarray(a, order="C")  # ascontiguousarray would make a 0-d array 1-d
        self._blob(a.dtype.str.encode())
        self._len(a.ndim)
        for n in a.shape:
            self._len(n)
        self._blob(a.tobytes())

    def _is_tensor(self, v) -> bool:
        # Where torch was never imported nothing is a tensor, and importing it takes seconds.
        self.torch = self.torch or sys.modules.get("torch")
        return self.torch is not None and isinstance(v, self.torch.Tensor)

    def _is_dtype(self, v) -> bool:
        return self.torch is not None and isinstance(v, self.torch.dtype)

    def _tensor(self, t) -> None:
        torch = self.torch
        t = t.detach().cpu().contiguous()
        if (
            t.is_sparse
            or t.is_quantized
            or str(t.dtype).removeprefix("torch.") not in _TORCH_DTYPES
        ):
            raise CodecError(f"cannot send a tensor of dtype {t.dtype}")
        self.out += b"X"
        self._blob(str(t.dtype).removeprefix("torch.").encode())
        self._len(t.dim())
        for n in t.shape:
            self._len(n)
        flat = t.reshape(-1)
        raw = (
            flat.view(torch.uint8)
            if flat.numel() and t.dtype != torch.bool
            else flat.to(torch.uint8)
        )
        self._blob(raw.numpy().tobytes())


def decode(data: bytes):
    """The value `encode` wrote; raises CodecError on anything else."""
    reader = _Decoder(memoryview(data))
    value = reader.read(0)
    if reader.pos != len(data):
        raise CodecError("trailing bytes after the value")
    return value


class _Decoder:
    def __init__(self, data: memoryview):
        self.data = data
        self.pos = 0
        self.items = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CodecError("truncated value")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _len(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def _blob(self, limit: int | None = None) -> bytes:
        n = self._len()
        if limit is not None and n > limit:
            raise CodecError("value too large")
        return bytes(self._take(n))

    def _count(self, n: int) -> int:
        self.items += n
        if self.items > MAX_ITEMS:
            raise CodecError(f"more than {MAX_ITEMS} items")
        return n

    def _shape(self) -> tuple[int, ...]:
        ndim = self._len()
        if ndim > 32:
            raise CodecError("more than 32 dimensions")
        return tuple(self._len() for _ in range(ndim))

    def read(self, depth: int):  # noqa: C901
        if depth > MAX_DEPTH:
            raise CodecError(f"nested deeper than {MAX_DEPTH} levels")
        tag = bytes(self._take(1))
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"I":
            return int.from_bytes(self._blob(MAX_INT_BYTES), "little", signed=True)
        if tag == b"D":
            return struct.unpack("<d", self._take(8))[0]
        if tag == b"C":
            real, imag = struct.unpack("<dd", self._take(16))
            return complex(real, imag)
        if tag == b"S":
            try:
                return self._blob().decode("utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise CodecError("a string that is not UTF-8") from exc
        if tag == b"B":
            return self._blob()
        if tag in (b"A", b"G"):
            array = self._array()
            return array[()] if tag == b"G" else array
        if tag == b"X":
            return self._tensor()
        if tag == b"Y":
            name = self._blob(32).decode("ascii", "replace")
            if name not in _TORCH_DTYPES:
                raise CodecError(f"unknown dtype {name!r}")
            return getattr(_torch(), name)
        if tag in (b"L", b"U", b"E", b"Z"):
            items = [self.read(depth + 1) for _ in range(self._count(self._len()))]
            kind = {b"L": list, b"U": tuple, b"E": set, b"Z": frozenset}[tag]
            try:
                return kind(items)
            except TypeError as exc:
                raise CodecError("a set of unhashable values") from exc
        if tag == b"M":
            result = {}
            for _ in range(self._count(self._len())):
                key = self.read(depth + 1)
                try:
                    result[key] = self.read(depth + 1)
                except TypeError as exc:
                    raise CodecError("a dict with an unhashable key") from exc
            return result
        if tag == b"H":
            ident = self._len()
            return Handle(ident, self._blob(200).decode("utf-8", "replace"))
        raise CodecError(f"unknown tag {tag!r}")

    def _array(self) -> np.ndarray:
        dtype = _NUMPY_DTYPES.get(self._blob(8).decode("ascii", "replace"))
        if dtype is None:
            raise CodecError("unknown numpy dtype")
        shape = self._shape()
        raw = self._blob()
        count = self._count(int(np.prod(shape, dtype=np.int64)) if shape else 1)
        if count * dtype.itemsize != len(raw):
            raise CodecError("array bytes do not match its shape")
        return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()

    def _tensor(self):
        torch = _torch()
        name = self._blob(32).decode("ascii", "replace")
        if name not in _TORCH_DTYPES:
            raise CodecError(f"unknown dtype {name!r}")
        dtype = getattr(torch, name)
        shape = self._shape()
        raw = self._blob()
        count = self._count(int(np.prod(shape, dtype=np.int64)) if shape else 1)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count * itemsize != len(raw):
            raise CodecError("tensor bytes do not match its shape")
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if raw
            else torch.empty(0, dtype=torch.uint8)
        )
        if dtype == torch.bool:
            return flat.to(torch.bool).reshape(shape)
        return flat.view(dtype).reshape(shape).clone()
