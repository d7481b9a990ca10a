"""PyTorch tensors for the wire codec, without making torch a dependency.

How it works: torch is never imported here at module import. On the sending side a
tensor can only exist if its sender imported torch, so :func:`torch_if_loaded`
looks it up in ``sys.modules``; the receiving side imports it (:func:`import_torch`)
only when a message holds a tensor.

On the wire a tensor is its dtype's name (``"float32"``, ``"bfloat16"``: torch's
own name without ``torch.``), its shape, and its elements in C order, each in
little-endian byte order (torch's memory layout on every platform it ships for).
bfloat16 and the float8 types travel as their raw bits, so nothing depends on numpy
knowing them.

Two ways to the bytes:

- :func:`tensor_view`: a contiguous CPU tensor's own memory, no copy.
- :class:`TensorFrame`: any other tensor (another device, not contiguous, a
  conjugate or negative view): read by byte range, and each read copies only the
  elements it covers to the CPU, so serving a model from a GPU never holds more
  than the ranges being sent.
"""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

__all__ = [
    "DTYPE_NAMES",
    "TensorFrame",
    "describe",
    "dtype_of",
    "from_bytes",
    "import_torch",
    "tensor_view",
    "torch_if_loaded",
]

# Every torch dtype whose elements are plain fixed-width bits. Quantized dtypes (a
# scale beside the bits), sub-byte ones (int1..int7, uint1..uint7) and the bits*
# placeholders have no such meaning and are refused.
DTYPE_NAMES = frozenset(
    {
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex32",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    }
)


def torch_if_loaded() -> Any:
    """The torch module if this process imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def import_torch() -> Any:
    """Import torch for a tensor that arrived; ImportError says torch is needed."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "the data holds a PyTorch tensor; install torch (pip install torch) to receive it"
        ) from exc
    if sys.byteorder != "little":  # pragma: no cover - torch ships for little-endian hosts
        raise ImportError("PyTorch tensors are only carried between little-endian hosts")
    return torch


def describe(torch: Any, t: Any) -> tuple[str, list[int], int]:
    """``(dtype name, shape, nbytes)`` of a tensor that can travel; TypeError if not."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        raise TypeError(
            f"tensor subclass {type(t).__qualname__} is not supported: pass a plain "
            "torch.Tensor (t.as_subclass(torch.Tensor))"
        )
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES or t.is_quantized:
        raise TypeError(f"torch tensor of dtype {name} is not supported (no plain bit layout)")
    if t.layout is not torch.strided:
        raise TypeError(f"torch tensor of layout {t.layout} is not supported: pass t.to_dense()")
    if t.device.type == "meta":
        raise TypeError("a torch tensor on the meta device has no data to send")
    if sys.byteorder != "little":  # pragma: no cover - torch ships for little-endian hosts
        raise TypeError("PyTorch tensors are only carried between little-endian hosts")
    return name, list(t.shape), t.numel() * t.element_size()


def tensor_view(t: Any) -> memoryview | None:
    """A contiguous CPU tensor's bytes as a view of its own memory, or None.

    None when the bytes cannot be shared: another device, not contiguous, a lazy
    conjugate or negative view, or numpy missing (torch exposes memory to Python
    only through numpy).
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    try:
        return memoryview(_flat_uint8(t.detach()).numpy())
    except (RuntimeError, TypeError):  # "Numpy is not available"
        return None


def _flat_uint8(t: Any) -> Any:
    """A contiguous tensor's bytes as a 1-d uint8 tensor over the same memory."""
    flat = t.reshape(-1)
    if flat.numel() == 1:  # one element counts as contiguous whatever its stride
        flat = flat.as_strided((1,), (1,))
    return flat.view(sys.modules["torch"].uint8)


def _bits(t: Any) -> Any:
    """`t` seen as plain integers of its element size, when it can be, for copying.

    Some dtypes have no copy kernel (float4_e2m1fn_x2); a same-size view works for any
    strides. Complex, conjugate and negative views keep their dtype: those bits are
    resolved after the copy.
    """
    torch = sys.modules["torch"]
    if t.is_complex() or t.is_conj() or t.is_neg():
        return t
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()])


class TensorFrame:
    """A tensor's wire bytes, read by range; each read copies only its range to the CPU.

    Used for tensors :func:`tensor_view` cannot share. The tensor is held, not copied:
    do not change it while it is offered.
    """

    __slots__ = ("_item", "_t", "nbytes")

    def __init__(self, t: Any) -> None:
        self._t = _bits(t.detach())
        self._item = t.element_size()
        self.nbytes = t.numel() * self._item

    def read(self, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of the tensor's wire form (clipped to its size)."""
        stop = min(stop, self.nbytes)
        if start >= stop:
            return memoryview(b"")
        e0, e1 = start // self._item, -(-stop // self._item)
        part = _gather(self._t, e0, e1).resolve_conj().resolve_neg().contiguous()
        skip = start - e0 * self._item
        return _cpu_bytes(part)[skip : skip + stop - start]


def _gather(t: Any, e0: int, e1: int) -> Any:
    """Elements ``[e0, e1)`` of `t` in C order, as a 1-d CPU tensor; copies only those."""
    if t.dim() <= 1:
        return t.reshape(-1)[e0:e1].contiguous().cpu()
    row = math.prod(t.shape[1:])
    first, last = e0 // row, (e1 - 1) // row
    if first == last:
        return _gather(t[first], e0 - first * row, e1 - first * row)
    parts = []
    lo, hi = first, last + 1
    if e0 % row:
        parts.append(_gather(t[first], e0 % row, row))
        lo += 1
    tail = e1 - last * row
    if tail < row:
        hi -= 1
    if hi > lo:
        parts.append(t[lo:hi].contiguous().cpu().reshape(-1))
    if tail < row:
        parts.append(_gather(t[last], 0, tail))
    return parts[0] if len(parts) == 1 else sys.modules["torch"].cat(parts)


def _cpu_bytes(t: Any) -> memoryview:
    """A contiguous CPU tensor's bytes as a memoryview (its own memory when numpy is there)."""
    flat = _flat_uint8(t)
    try:
        return memoryview(flat.numpy())
    except (RuntimeError, TypeError):  # no numpy: one more copy through ctypes
        return memoryview(ctypes.string_at(flat.data_ptr(), flat.numel()))


def dtype_of(torch: Any, name: str) -> Any:
    """The torch dtype a wire name (one of :data:`DTYPE_NAMES`) stands for."""
    dtype = getattr(torch, name, None) if name in DTYPE_NAMES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"this torch ({torch.__version__}) has no dtype {name}; upgrade torch")
    return dtype


def from_bytes(torch: Any, dtype: Any, shape: list[int], buffer: memoryview) -> Any:
    """A tensor of `dtype` and `shape` over `buffer` (copied if it is read-only).

    torch has no read-only tensors, so a read-only buffer is copied rather than handed
    out writable. The caller has checked that ``len(buffer)`` matches the shape.
    """
    if buffer.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    source: Any = bytearray(buffer) if buffer.readonly else buffer
    raw = torch.frombuffer(source, dtype=torch.uint8)
    if dtype is torch.bool and bool(raw.max() > 1):  # other bytes are undefined behaviour in torch
        raise ValueError("a bool tensor holds bytes other than 0 and 1")
    return raw.view(dtype).reshape(shape)
