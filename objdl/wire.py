"""Messages to ZeroMQ frames and back, plus the broker protocol's frame kinds.

How it works: a message becomes ``[headers, body, *buffers]``. Headers and body are
msgpack; every bulk buffer (bytes-like or numpy array at or above the threshold) is
replaced in the body by a reference to its own frame, so bulk bytes never pass
through msgpack and can be sent with ``copy=False``. See docs/PROTOCOL.md.

Rules of the codec:

- :func:`encode` walks the payload once. Containers are rebuilt only along the path
  to something that had to be replaced (an out-of-band buffer, an array, a numpy
  scalar); everything else is handed to msgpack untouched. Out-of-band buffers are
  memoryviews of the caller's objects, not copies: leave them unchanged until the
  frames are sent.
- :func:`decode` treats its input as untrusted: any fault raises
  :class:`~objdl.errors.WireError` and nothing else, and every buffer frame must be
  referenced by the body exactly once.
- What comes back is not always the type that went in: tuples decode as lists;
  bytes-likes below the threshold as ``bytes``, at or above it as read-only
  ``memoryview`` objects over the received frames; numpy arrays as read-only arrays
  over the received memory; numpy scalars as Python scalars; subclasses of dict,
  list, str, int, float and bytes as their base type.
- numpy is optional: it is only looked up when a payload holds a numpy object, and
  only imported when a body holds an array. torch likewise (:mod:`objdl._tensors`):
  tensors travel as ext 3 and decode as tensors, copies unless `writable` frames
  are decoded (torch has no read-only tensors).
"""

from __future__ import annotations

import functools
import math
import re
import struct
import sys
from collections.abc import Iterable
from typing import Any

import msgpack

from objdl import _tensors
from objdl.errors import WireError
from objdl.message import Message

__all__ = [
    "BULK_THRESHOLD",
    "EXT_ARRAY",
    "EXT_BUFFER",
    "EXT_TENSOR",
    "KIND_BYE",
    "KIND_HB",
    "KIND_LINK",
    "KIND_LINK_ERR",
    "KIND_LINK_OK",
    "KIND_LIST",
    "KIND_LIST_R",
    "KIND_MSG",
    "KIND_NACK",
    "KIND_PING",
    "KIND_REG",
    "KIND_REG_ERR",
    "KIND_REG_OK",
    "KIND_WHO",
    "NACK_BUSY",
    "NACK_TOO_BIG",
    "NACK_UNREACHABLE",
    "NACK_UNREGISTERED",
    "PROTOCOL_VERSION",
    "REG_STANDBY",
    "decode",
    "decode_headers",
    "encode",
    "encode_lazily",
]

PROTOCOL_VERSION = b"1"

# Frame 0 of every broker-protocol message (docs/PROTOCOL.md).
KIND_REG = b"REG"
KIND_REG_OK = b"REG_OK"
KIND_REG_ERR = b"REG_ERR"
KIND_MSG = b"MSG"
KIND_NACK = b"NACK"
KIND_HB = b"HB"
KIND_PING = b"PING"
KIND_WHO = b"WHO"
KIND_LIST = b"LIST"
KIND_LIST_R = b"LIST_R"
KIND_BYE = b"BYE"
KIND_LINK = b"LINK"  # the direct data links between cells (objdl/cell/_links.py)
KIND_LINK_OK = b"LINK_OK"
KIND_LINK_ERR = b"LINK_ERR"

NACK_UNREACHABLE = b"unreachable"
NACK_BUSY = b"busy"
NACK_TOO_BIG = b"too_big"
NACK_UNREGISTERED = b"unregistered"
REG_STANDBY = b"standby"  # REG_ERR reason: a standby broker, not active; try the next one

BULK_THRESHOLD = 64 * 1024
"""Bytes-likes and arrays of at least this many bytes travel as their own frames."""

EXT_BUFFER = 1
"""msgpack ext type of an out-of-band buffer: data is the index as big-endian uint32."""

EXT_ARRAY = 2
"""msgpack ext type of a numpy array: data is msgpack ``[dtype.str, shape, index_or_bytes]``."""

EXT_TENSOR = 3
"""msgpack ext type of a torch tensor: data is msgpack ``[dtype name, shape, index_or_bytes]``
(name as ``"bfloat16"``; elements in C order, little-endian; see :mod:`objdl._tensors`)."""

# What encode_lazily's frames may hold: a tensor's bytes are read when sent.
_Frame = bytes | memoryview | _tensors.TensorFrame

# Deeper payloads are refused on encode; msgpack's own packer stops at 511 levels.
_MAX_DEPTH = 256

# Containers longer than this are first scanned for plain scalars in one C call.
_SCAN_MIN = 16

_U32 = struct.Struct(">I")
# How msgpack starts a timestamp (ext -1 as fixext 4, fixext 8 or ext 8 of 12 bytes).
_TIMESTAMP_TAG = re.compile(rb"\xd6\xff|\xd7\xff|\xc7\x0c\xff")
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

# Values msgpack packs as they are and that need no look inside.
_SCALARS = frozenset({str, int, float, bool, type(None)})
_HEADER_TYPES = frozenset({str, int, float, bool, type(None), bytes})
_KEY_TYPES = frozenset({str, int, float, bool, type(None), bytes})
# numpy kinds whose raw bytes are the whole value: bool, ints, floats, complex,
# datetimes, timedeltas, fixed-width bytes and str, unstructured void. Object ('O')
# and numpy 2's variable-width strings ('T') hold pointers and must not be sent.
_ARRAY_KINDS = frozenset("biufcmMSUV")
# dtype.str of those kinds, e.g. "<f4", "|b1", "<U10", "<M8[ns]", "<m8[25s]". Checked
# before numpy parses an untrusted string, so junk never reaches np.dtype's
# deprecated spellings (which would warn) and never names an object dtype.
_DTYPE_STR = re.compile(r"[<>|][biufcmMSUV][0-9]{1,12}(?:\[[0-9]{0,12}[A-Za-z]{1,2}\])?")


def encode(message: Message, threshold: int = BULK_THRESHOLD) -> list[bytes | memoryview]:
    """Turn `message` into frames ``[headers, body, *buffers]``.

    Bytes-likes and numpy arrays of at least `threshold` bytes, at any depth inside
    dicts, lists and tuples, become buffer frames: memoryviews of the caller's own
    memory (a non-contiguous one is copied once), so the caller must not change them
    until the frames are sent. Smaller ones travel inline.

    Args:
        message: headers (str keys; str, int, float, bool, None or bytes values) and
            a payload of dicts, lists, tuples, str, int, float, bool, None,
            bytes-likes, numpy arrays and numpy scalars.
        threshold: size in bytes from which a buffer travels as its own frame.

    Returns:
        The frames, ready for ``send_multipart(frames, copy=False)``.

    Raises:
        TypeError: a header or payload value of an unsupported type (object or
            structured numpy dtypes included), naming where it was found.
        ValueError: an int outside msgpack's 64-bit range, a payload nested deeper
            than 256 levels (a reference cycle?), or a negative threshold.
    """
    frames = encode_lazily(message, threshold)
    return [f.read(0, f.nbytes) if isinstance(f, _tensors.TensorFrame) else f for f in frames]


def encode_lazily(message: Message, threshold: int = BULK_THRESHOLD) -> list[_Frame]:
    """As :func:`encode`, but a tensor whose memory cannot be shared (on another
    device, not contiguous) stays a :class:`~objdl._tensors.TensorFrame`, to be read
    by range when it is sent, so it is never copied whole."""
    if not isinstance(message, Message):
        raise TypeError(f"encode() needs a Message, not {type(message).__name__}")
    if type(threshold) is not int or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0, not {threshold!r}")
    headers_frame = _encode_headers(message.headers)
    buffers: list[_Frame] = []
    try:
        body = _prepare(message.payload, threshold, buffers, 0)
    except _Refused as exc:
        raise exc.error_type(f"{exc.text} at payload{exc.where()}") from None
    try:
        body_frame = msgpack.packb(body, use_bin_type=True)
    except OverflowError as exc:
        raise ValueError(f"the payload holds an int outside [-2**63, 2**64): {exc}") from None
    return [headers_frame, body_frame, *buffers]


def decode(frames: Iterable[Any], *, writable: bool = False) -> Message:
    """Rebuild a message from frames ``[headers, body, *buffers]``.

    Args:
        frames: bytes, bytearray, memoryview or ``zmq.Frame`` objects (anything with
            a ``.buffer``), as received.
        writable: keep writable frames writable, so buffers, arrays and tensors come
            back as writable views of them (for a receiver that owns the frames'
            memory, as a dict's site does its receive buffer). Tensors over read-only
            frames are copies.

    Returns:
        The message. Out-of-band buffers are read-only memoryviews over the frames
        (they keep the frames alive) and arrays are read-only views of their bytes:
        copy what must be changed.

    Raises:
        WireError: for any frames that are not a valid encoding, whatever the fault.
    """
    try:
        views = [_as_view(frame, writable) for frame in frames]
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"frames are not a sequence of buffers: {_describe(exc)}") from exc
    if len(views) < 2:
        raise WireError(f"a message needs at least 2 frames (headers, body), got {len(views)}")
    headers = _decode_headers(views[0])
    refs = _Refs(views[2:])
    try:
        payload = msgpack.unpackb(
            views[1], raw=False, strict_map_key=False, use_list=True, ext_hook=refs.hook
        )
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"body frame does not decode: {_describe(exc)}") from exc
    refs.check_all_used()
    if _TIMESTAMP_TAG.search(views[1]):  # a cheap scan first: rarely there
        _refuse_timestamps(payload, 0)
    return Message(headers, payload)


def decode_headers(frame: Any) -> dict[str, Any]:
    """Decode a headers frame alone (e.g. the one a ``NACK`` echoes back).

    Raises:
        WireError: when `frame` is not a msgpack map of str keys to scalar values.
    """
    try:
        view = _as_view(frame)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"headers frame is not a buffer: {_describe(exc)}") from exc
    return _decode_headers(view)


# --- encoding -------------------------------------------------------------------------


class _Refused(Exception):
    """A payload value encode cannot carry; collects the path on its way up."""

    def __init__(self, error_type: type[Exception], text: str) -> None:
        super().__init__(text)
        self.error_type = error_type
        self.text = text
        self.path: list[object] = []  # innermost key first

    def where(self) -> str:
        keys = [f"[{_short(key)}]" for key in reversed(self.path)]
        if len(keys) > 10:  # a cycle gives hundreds of levels
            keys[5:-4] = ["..."]
        return "".join(keys)


def _encode_headers(headers: Any) -> bytes:
    if not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict, not {type(headers).__name__}")
    for key, value in headers.items():
        if not isinstance(key, str):
            raise TypeError(f"header key {key!r} is a {type(key).__name__}, not a str")
        if type(value) not in _HEADER_TYPES and not isinstance(value, (str, int, float, bytes)):
            raise TypeError(
                f"header {key!r} is a {type(value).__name__}; header values must be "
                "str, int, float, bool, None or bytes"
            )
        if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            raise ValueError(f"header {key!r} is an int outside [-2**63, 2**64)")
    return msgpack.packb(headers, use_bin_type=True)


def _prepare(obj: Any, threshold: int, buffers: list[_Frame], depth: int) -> Any:
    """`obj` ready for msgpack: itself when nothing inside needs replacing."""
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if kind is dict:
        return _prepare_dict(obj, threshold, buffers, depth)
    if kind is list or kind is tuple:
        return _prepare_seq(obj, threshold, buffers, depth)
    if kind is bytes or kind is bytearray:
        if len(obj) >= threshold:
            return _out_of_band(memoryview(obj), buffers)
        return obj  # msgpack writes a bytearray as bin, as it does bytes
    if kind is memoryview:
        return _prepare_view(obj, threshold, buffers)
    return _prepare_other(obj, threshold, buffers, depth)


def _prepare_dict(obj: dict, threshold: int, buffers: list[_Frame], depth: int) -> Any:
    if depth >= _MAX_DEPTH:
        raise _Refused(ValueError, f"payload nested deeper than {_MAX_DEPTH} levels")
    # A C-speed scan lets big flat containers skip the per-item loop below.
    if (
        len(obj) > _SCAN_MIN
        and _KEY_TYPES.issuperset(map(type, obj))
        and _SCALARS.issuperset(map(type, obj.values()))
    ):
        return obj
    out = None
    for key, value in obj.items():
        if type(key) not in _KEY_TYPES and not isinstance(key, (str, int, float, bytes)):
            refused = _Refused(
                TypeError,
                f"dict key {key!r} is a {type(key).__name__}; keys must be "
                "str, int, float, bool, None or bytes",
            )
            refused.path.append(key)
            raise refused
        if type(value) in _SCALARS:
            continue
        try:
            new = _prepare(value, threshold, buffers, depth + 1)
        except _Refused as exc:
            exc.path.append(key)
            raise
        if new is not value:
            if out is None:
                out = dict(obj)
            out[key] = new
    return obj if out is None else out


def _prepare_seq(obj: Any, threshold: int, buffers: list[_Frame], depth: int) -> Any:
    if depth >= _MAX_DEPTH:
        raise _Refused(ValueError, f"payload nested deeper than {_MAX_DEPTH} levels")
    if len(obj) > _SCAN_MIN and _SCALARS.issuperset(map(type, obj)):
        return obj
    out = None
    for index, value in enumerate(obj):
        if type(value) in _SCALARS:
            continue
        try:
            new = _prepare(value, threshold, buffers, depth + 1)
        except _Refused as exc:
            exc.path.append(index)
            raise
        if new is not value:
            if out is None:
                out = list(obj)
            out[index] = new
    return obj if out is None else out


def _prepare_view(view: memoryview, threshold: int, buffers: list[_Frame]) -> Any:
    if view.nbytes >= threshold:
        return _out_of_band(_flat_bytes(view), buffers)
    # msgpack reads a memoryview as one C-contiguous block; anything else is copied.
    return view if view.c_contiguous else view.tobytes()


def _flat_bytes(view: memoryview) -> memoryview:
    """`view` as a 1-d memoryview of unsigned bytes, copying only if not C-contiguous."""
    if view.ndim == 1 and view.format == "B" and view.c_contiguous:
        return view
    if view.c_contiguous:
        try:
            return view.cast("B")
        except (TypeError, ValueError):  # e.g. a 0-d view: fall back to a copy
            pass
    return memoryview(view.tobytes())


def _out_of_band(view: memoryview, buffers: list[_Frame]) -> msgpack.ExtType:
    buffers.append(view)
    return msgpack.ExtType(EXT_BUFFER, _U32.pack(len(buffers) - 1))


def _prepare_other(obj: Any, threshold: int, buffers: list[_Frame], depth: int) -> Any:
    """Types off the fast path: numpy objects and subclasses of the plain types."""
    np = sys.modules.get("numpy")  # a numpy object implies numpy is already imported
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _prepare_array(np, obj, threshold, buffers)
        if isinstance(obj, np.generic):
            value = obj.item()
            if isinstance(value, np.generic):  # e.g. longdouble: no exact Python twin
                raise _Refused(TypeError, f"numpy scalar of dtype {obj.dtype} is not supported")
            return _prepare(value, threshold, buffers, depth)
    torch = _tensors.torch_if_loaded()  # likewise: a tensor implies torch is imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return _prepare_tensor(torch, obj, threshold, buffers)
    if isinstance(obj, dict):
        return _prepare_dict(obj, threshold, buffers, depth)
    if isinstance(obj, (list, tuple)) and not isinstance(obj, msgpack.ExtType):
        # ExtType is a tuple too; passed through, it could forge buffer references.
        return _prepare_seq(obj, threshold, buffers, depth)
    if isinstance(obj, (str, int, float)):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        if len(obj) >= threshold:
            return _out_of_band(memoryview(obj), buffers)
        return obj
    hint = "; wrap a buffer in memoryview()" if _has_buffer(obj) else ""
    raise _Refused(TypeError, f"unsupported type {type(obj).__qualname__}{hint}")


def _has_buffer(obj: object) -> bool:
    try:
        memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def _prepare_array(np: Any, arr: Any, threshold: int, buffers: list[_Frame]) -> Any:
    dtype = arr.dtype
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.hasobject:
        raise _Refused(
            TypeError,
            f"numpy array of dtype {dtype} is not supported (object, structured and "
            "variable-width dtypes have no portable bytes)",
        )
    if dtype.itemsize == 0:
        raise _Refused(TypeError, f"numpy array of zero-size dtype {dtype} is not supported")
    if type(arr) is not np.ndarray and not isinstance(arr, np.memmap):
        raise _Refused(
            TypeError, f"numpy array subclass {type(arr).__qualname__}: pass np.asarray(x)"
        )
    shape = list(arr.shape)
    if arr.nbytes >= threshold:
        # reshape(-1) is a view of a C-contiguous array and a C-order copy of any
        # other; the uint8 view lets 0-d arrays and datetime dtypes (which memoryview
        # refuses) share the array's memory too.
        buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
        data: int | bytes = len(buffers) - 1
    else:
        data = arr.tobytes()
    return msgpack.ExtType(EXT_ARRAY, msgpack.packb([dtype.str, shape, data], use_bin_type=True))


def _prepare_tensor(torch: Any, t: Any, threshold: int, buffers: list[_Frame]) -> Any:
    try:
        name, shape, nbytes = _tensors.describe(torch, t)
    except TypeError as exc:
        raise _Refused(TypeError, str(exc)) from None
    # A view of the tensor's own memory where it allows; else read by range when sent.
    view = _tensors.tensor_view(t)
    frame = _tensors.TensorFrame(t) if view is None else view
    data: int | bytes
    if nbytes >= threshold:
        buffers.append(frame)
        data = len(buffers) - 1
    else:
        data = bytes(frame) if isinstance(frame, memoryview) else bytes(frame.read(0, nbytes))
    return msgpack.ExtType(EXT_TENSOR, msgpack.packb([name, shape, data], use_bin_type=True))


# --- decoding -------------------------------------------------------------------------


def _as_view(frame: Any, writable: bool = False) -> memoryview:
    """`frame` as a 1-d memoryview of unsigned bytes, read-only unless `writable`."""
    if isinstance(frame, memoryview):
        view = frame
    elif isinstance(frame, (bytes, bytearray)):
        view = memoryview(frame)
    else:
        buffer = getattr(frame, "buffer", None)
        if buffer is None:
            raise WireError(
                f"a frame must be a bytes-like or zmq.Frame, not {type(frame).__name__}"
            )
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.ndim != 1 or view.format != "B" or not view.c_contiguous:
        view = _flat_bytes(view)
    return view if writable else view.toreadonly()


def _decode_headers(view: memoryview) -> dict[str, Any]:
    try:
        headers = msgpack.unpackb(view, raw=False, strict_map_key=True)
    except Exception as exc:
        raise WireError(f"headers frame does not decode: {_describe(exc)}") from exc
    if type(headers) is not dict:
        raise WireError(f"headers frame holds a {type(headers).__name__}, not a map")
    for key, value in headers.items():
        if type(key) is not str:
            raise WireError(f"header key {_short(key)} is not a str")
        if type(value) not in _HEADER_TYPES:
            raise WireError(f"header {_short(key)} holds a {type(value).__name__}, not a scalar")
    return headers


class _Refs:
    """The buffer frames of one body, handed out by the ext hook, each at most once."""

    __slots__ = ("buffers", "used")

    def __init__(self, buffers: list[memoryview]) -> None:
        self.buffers = buffers
        self.used = bytearray(len(buffers))

    def hook(self, code: int, data: bytes) -> Any:
        if code == EXT_BUFFER:
            if len(data) != _U32.size:
                raise WireError(f"buffer reference of {len(data)} bytes, expected 4")
            return self.take(_U32.unpack(data)[0])
        if code == EXT_ARRAY:
            return self.array(data)
        if code == EXT_TENSOR:
            return self.tensor(data)
        raise WireError(f"unknown msgpack ext type {code}")

    def take(self, index: int) -> memoryview:
        if index >= len(self.buffers):
            raise WireError(f"reference to buffer {index}; the message has {len(self.buffers)}")
        if self.used[index]:
            raise WireError(f"buffer {index} is referenced twice")
        self.used[index] = 1
        return self.buffers[index]

    def check_all_used(self) -> None:
        if self.used.count(0):
            raise WireError(f"buffer {self.used.index(0)} is never referenced by the body")

    def array(self, data: bytes) -> Any:
        np = _numpy()
        spec = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        if type(spec) is not list or len(spec) != 3:
            raise WireError("array ext must hold [dtype, shape, index_or_bytes]")
        dtype_str, shape, source = spec
        dtype = _dtype(dtype_str)
        if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
            raise WireError(f"array shape {_short(shape)} is not a list of ints >= 0")
        if type(source) is int and source >= 0:
            buffer: bytes | memoryview = self.take(source)
        elif type(source) is bytes:
            buffer = source
        else:
            raise WireError("array data must be a buffer index or bytes")
        if math.prod(shape) * dtype.itemsize != len(buffer):
            raise WireError(
                f"array of shape {shape} and dtype {dtype_str} needs "
                f"{math.prod(shape) * dtype.itemsize} bytes, got {len(buffer)}"
            )
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def tensor(self, data: bytes) -> Any:
        spec = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        if type(spec) is not list or len(spec) != 3:
            raise WireError("tensor ext must hold [dtype, shape, index_or_bytes]")
        name, shape, source = spec
        if type(name) is not str or name not in _tensors.DTYPE_NAMES:
            raise WireError(f"tensor dtype {_short(name)} is not a supported dtype name")
        if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
            raise WireError(f"tensor shape {_short(shape)} is not a list of ints >= 0")
        if type(source) is int and source >= 0:
            buffer = self.take(source)
        elif type(source) is bytes:
            buffer = memoryview(source).toreadonly()
        else:
            raise WireError("tensor data must be a buffer index or bytes")
        try:
            torch = _tensors.import_torch()
            dtype = _tensors.dtype_of(torch, name)
        except (ImportError, ValueError) as exc:
            raise WireError(str(exc)) from None
        itemsize = dtype.itemsize
        if math.prod(shape) * itemsize != buffer.nbytes:
            raise WireError(
                f"tensor of shape {shape} and dtype {name} needs "
                f"{math.prod(shape) * itemsize} bytes, got {buffer.nbytes}"
            )
        try:
            return _tensors.from_bytes(torch, dtype, shape, buffer)
        except ValueError as exc:
            raise WireError(f"tensor of dtype {name}: {exc}") from None


def _refuse_timestamps(obj: Any, depth: int) -> None:
    """msgpack decodes ext -1 itself, without the ext hook: refuse it as any other ext."""
    if isinstance(obj, msgpack.Timestamp):
        raise WireError("unknown msgpack ext type -1 (timestamp)")
    if depth < _MAX_DEPTH * 2:  # msgpack itself refuses deeper nesting
        if type(obj) is dict:
            for key, value in obj.items():
                _refuse_timestamps(key, depth + 1)
                _refuse_timestamps(value, depth + 1)
        elif type(obj) is list:
            for value in obj:
                _refuse_timestamps(value, depth + 1)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise WireError("the body holds a numpy array; install numpy to decode it") from exc
    return numpy


def _dtype(text: object) -> Any:
    """The dtype an array ext names: only the canonical ``dtype.str`` of a safe kind."""
    if type(text) is not str or not _DTYPE_STR.fullmatch(text):
        raise WireError(f"array dtype {_short(text)} is not a supported dtype string")
    return _parse_dtype(text)


@functools.lru_cache(maxsize=64)
def _parse_dtype(text: str) -> Any:
    try:
        dtype = _numpy().dtype(text)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"array dtype {text!r}: {_describe(exc)}") from exc
    if dtype.str != text or dtype.itemsize == 0 or dtype.hasobject or dtype.fields is not None:
        raise WireError(f"array dtype {text!r} is not a supported dtype string")
    return dtype


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
