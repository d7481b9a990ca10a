"""PyTorch tensors in dicts: every dtype, any layout, nesting, writable results, and a
real torch.nn model through a real broker; what happens when the site has no torch."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import msgpack
import numpy as np
import pytest

from objdl import _tensors, wire
from objdl.cell import Cell
from objdl.downloader import download_object
from objdl.errors import WireError
from objdl.message import Message
from objdl.objects import DictConsumer, DictSource, DownloadError, download_dict, offer_dict
from objdl.objects._dict import INLINE_LIMIT, unpack_stream

torch = pytest.importorskip("torch", reason="torch is not installed: tensor tests need it")

DTYPES = [getattr(torch, n) for n in sorted(_tensors.DTYPE_NAMES) if hasattr(torch, n)]


def stream(d: dict) -> bytearray:
    src = DictSource(d)
    return bytearray(b"".join(bytes(p) for p in src.read(0, src.size)))


def raw_bytes(t: Any) -> bytes:
    """`t`'s elements in C order as bytes, computed apart from objdl."""
    c = t.detach().cpu().resolve_conj().resolve_neg()
    if not c.is_complex():  # some dtypes (float4_e2m1fn_x2) copy only as plain bytes
        c = c.view(torch.uint8) if c.element_size() == 1 else c
    return c.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def rand_tensor(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> Any:
    n = int(np.prod(shape)) * dtype.itemsize
    raw = bytearray(random.Random(seed).randbytes(n))
    if dtype is torch.bool:
        raw = bytearray(b % 2 for b in raw)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()


def same(got: Any, want: Any) -> None:
    """Tensors: same type, dtype, shape and bits; containers recursively (tuples as lists)."""
    if isinstance(want, torch.Tensor):
        assert type(got) is torch.Tensor, type(got)
        assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"
        assert raw_bytes(got) == raw_bytes(want)
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want)
        for k in want:
            same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert type(got) is list and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            same(g, w)
    else:
        assert got == want and type(got) is type(want)


def layouts(t: Any) -> dict[str, Any]:
    """`t` (2-d) contiguous, transposed, strided, a row, a 0-d element, and empty."""
    return {
        "contig": t,
        "t": t.t(),
        "strided": t[::2, 1::3],
        "row": t[3],
        "col": t[:, 2],
        "scalar": t[1, 1].clone(),
        "empty": t[:0],
    }


# --- the codec, without sockets -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")  # torch's own
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [4, 300])  # below and above INLINE_LIMIT
def test_every_dtype_and_layout_round_trips(dtype: Any, rows: int) -> None:
    d = layouts(rand_tensor(dtype, (rows, 12), seed=rows))
    same(unpack_stream(stream(d)), d)


def test_zero_d_and_empty_tensors_of_many_shapes() -> None:
    d = {
        "zero_d": torch.tensor(3.5),
        "zero_d_big_int": torch.tensor(2**62),
        "empty_1": torch.empty(0),
        "empty_2": torch.empty(0, 5, dtype=torch.bfloat16),
        "empty_3": torch.empty(3, 0, 2, dtype=torch.int8),
    }
    same(unpack_stream(stream(d)), d)


def test_conjugate_and_negative_views_travel_as_their_values() -> None:
    c = torch.randn(64, 40, dtype=torch.complex64)
    d = {"conj": c.conj(), "neg": -c.conj(), "small": c[:2].conj()}
    assert d["conj"].is_conj()
    out = unpack_stream(stream(d))
    assert torch.equal(out["conj"], c.conj().resolve_conj())
    assert torch.equal(out["neg"], (-c.conj()).resolve_conj().resolve_neg())
    assert torch.equal(out["small"], c[:2].conj().resolve_conj())


def test_nesting_and_plain_values_are_kept() -> None:
    w = rand_tensor(torch.float32, (100, 20), seed=1)
    d = {
        "model": {"layer.0": {"w": w, "b": torch.zeros(20)}, "blocks": [w[:5], (w.t(), 3)]},
        "arr": np.arange(2000, dtype=np.int64),
        "opt": {"lr": 0.1, "betas": (0.9, 0.99), "name": "adam", "step": None},
        "blob": b"x" * 10,
    }
    same(unpack_stream(stream(d)), d)


def test_parameters_and_grad_tensors_come_back_as_plain_tensors() -> None:
    p = torch.nn.Parameter(torch.randn(50, 30))
    g = torch.randn(40, 40, requires_grad=True) * 2  # not a leaf
    out = unpack_stream(stream({"p": p, "g": g}))
    assert type(out["p"]) is torch.Tensor and torch.equal(out["p"], p.detach())
    assert not out["g"].requires_grad and torch.equal(out["g"], g.detach())


def test_a_contiguous_cpu_tensor_is_served_from_its_own_memory() -> None:
    t = rand_tensor(torch.bfloat16, (500, 40), seed=2)
    src = DictSource({"t": t})
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    pieces = src.read(0, src.size)
    addrs = [np.frombuffer(p, np.uint8).ctypes.data for p in pieces if p.nbytes]
    assert any(lo <= a < hi for a in addrs)
    t[0, 0] = 42.0  # documented: do not change what is offered; the change shows
    assert raw_bytes(t[0, 0]) in b"".join(bytes(p) for p in src.read(0, src.size))


@pytest.mark.parametrize("seed", range(4))
def test_a_non_contiguous_tensor_is_read_range_by_range(seed: int) -> None:
    rng = random.Random(seed)
    base = rand_tensor(torch.float64, (64, 48, 20), seed=seed)
    t = base.permute(2, 0, 1)[:, ::3]  # non-contiguous, 3 dims
    frame = _tensors.TensorFrame(t)
    want = raw_bytes(t)
    assert frame.nbytes == len(want)
    for _ in range(200):
        a = rng.randrange(0, len(want))
        b = min(len(want), a + rng.choice([1, 3, 7, 8, 100, 4096, 50_000]))
        assert bytes(frame.read(a, b)) == want[a:b], (a, b)
        # what a read gathers shares the tensor's memory or copies its range, never the whole
        e0, e1 = a // 8, -(-b // 8)
        part = _tensors._gather(t, e0, e1)
        storage = part.untyped_storage()
        assert part.numel() == e1 - e0
        assert storage.data_ptr() == base.data_ptr() or storage.nbytes() == (e1 - e0) * 8


def test_dict_source_holds_no_copy_of_a_non_contiguous_tensor() -> None:
    big = torch.randn(2048, 1024)  # 8 MiB
    src = DictSource({"t": big.t()})
    frames = [s for s in src._segments if isinstance(s, _tensors.TensorFrame)]
    assert len(frames) == 1 and frames[0].nbytes == big.numel() * 4


def test_writable_tensors_and_arrays_are_views_of_the_receive_buffer() -> None:
    t = torch.arange(100_000, dtype=torch.int32)
    a = np.arange(50_000, dtype=np.float64)
    buffer = stream({"t": t, "a": a, "bf": t.to(torch.bfloat16)})
    out = unpack_stream(buffer)
    start = np.frombuffer(buffer, np.uint8).ctypes.data
    end = start + len(buffer)
    for value in (out["t"], out["bf"]):
        assert start <= value.data_ptr() < end  # no copy: inside the buffer
    assert start <= out["a"].ctypes.data < end
    out["t"].add_(1)
    out["a"] += 1
    assert torch.equal(out["t"], t + 1) and np.array_equal(out["a"], a + 1)
    assert start <= out["t"].data_ptr() < end  # in place
    again = unpack_stream(buffer)  # the changes are in the buffer itself
    assert torch.equal(again["t"], t + 1)


def test_a_tensor_keeps_the_receive_buffer_alive() -> None:
    t = torch.arange(10_000, dtype=torch.int64)
    out = unpack_stream(stream({"t": t}))
    del t
    import gc

    gc.collect()
    assert torch.equal(out["t"], torch.arange(10_000, dtype=torch.int64))


def test_tensors_in_a_message_are_copies_over_read_only_frames() -> None:
    t = torch.arange(100_000, dtype=torch.float32)
    frames = [bytes(f) for f in wire.encode(Message(payload={"t": t}))]
    got = wire.decode(frames).payload["t"]
    assert torch.equal(got, t)
    got.add_(1)  # writable: a copy, the frames are unchanged
    assert torch.equal(wire.decode(frames).payload["t"], t)


def test_offer_refuses_tensors_without_a_plain_bit_layout() -> None:
    class Sub(torch.Tensor):
        pass

    with warnings.catch_warnings():  # quantized tensors are deprecated in torch itself
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    bad = {
        "quantized": quantized,
        "sparse": torch.randn(4, 4).to_sparse(),
        "meta": torch.empty(3, device="meta"),
        "subclass": torch.randn(3).as_subclass(Sub),
    }
    for key, value in bad.items():
        with pytest.raises(TypeError, match=rf"\[{key!r}\]"):
            DictSource({key: value})


def _tensor_stream(name: Any, shape: Any, data: Any, extra: bytes = b"") -> bytearray:
    """A stream whose body is {"t": ext 3 [name, shape, data]}, built by hand."""
    ext = msgpack.ExtType(3, msgpack.packb([name, shape, data], use_bin_type=True))
    frames = [b"\x80", msgpack.packb({"t": ext}, use_bin_type=True)]
    if extra:
        frames.append(extra)
    table = len(frames).to_bytes(4, "big") + b"".join(len(f).to_bytes(8, "big") for f in frames)
    return bytearray(table + b"".join(frames))


HOSTILE = {
    # Buffer frames are 4 KiB or more, as the encoder makes them (a stream holding a
    # smaller one is refused before any tensor is looked at).
    "bool-byte-2": ("bool", [4096], 0, b"\x00" * 4094 + b"\x01\x02"),
    "bool-inline-byte-255": ("bool", [2], b"\x01\xff", b""),
    "short": ("float32", [1025], 0, b"\x00" * 4099),
    "long": ("float32", [4], b"\x00" * 17, b""),
    "quantized": ("qint8", [1], b"\x00", b""),
    "not-a-dtype": ("Tensor", [1], b"\x00", b""),
    "object": ("object", [1], b"\x00", b""),
    "dtype-not-str": (7, [1], b"\x00", b""),
    "negative-shape": ("int8", [-1], b"", b""),
    "shape-not-list": ("int8", 3, b"\x00\x00\x00", b""),
    "negative-index": ("int8", [1], -1, b""),
    "missing-buffer": ("int8", [1], 5, b""),
    "float-data": ("int8", [1], 1.5, b""),
}


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_tensor_ext_is_a_wire_error(case: tuple[Any, Any, Any, bytes]) -> None:
    with pytest.raises(WireError):
        unpack_stream(_tensor_stream(*case))


def test_a_well_formed_hand_built_tensor_decodes() -> None:  # the hostile cases' control
    out = unpack_stream(_tensor_stream("bool", [4096], 0, b"\x00\x01\x01" + b"\x00" * 4093))
    assert out["t"].tolist()[:4] == [False, True, True, False] and out["t"].shape == (4096,)


# --- no torch on the site -----------------------------------------------------------------

_NO_TORCH = textwrap.dedent(
    """\
    import json, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is hidden by the test")

    sys.meta_path.insert(0, Block())
    from objdl.objects._dict import DictConsumer, unpack_stream
    data = bytearray(sys.stdin.buffer.read())
    out = {"plain": unpack_stream(bytearray.fromhex(sys.argv[1]))}
    c = DictConsumer()
    c.begin("R1", len(data), None)
    c.write(0, [memoryview(data)])
    c.download_completed("R1")
    out["ok"] = c.outcome.ok
    out["reason"] = c.outcome.reason
    out["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(out))
    """
)


def test_without_torch_a_tensor_dict_fails_saying_torch_is_needed() -> None:
    with_tensor = stream({"w": torch.randn(100, 100), "b": torch.zeros(3)})
    plain = stream({"a": 1, "x": [1.5, "s"]})
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, plain.hex()],
        input=bytes(with_tensor),
        capture_output=True,
        timeout=50,
        env=os.environ.copy(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["plain"] == {"a": 1, "x": [1.5, "s"]}  # dicts without tensors need no torch
    assert out["ok"] is False and "install torch" in out["reason"], out
    assert out["torch_loaded"] is False


def test_objdl_never_imports_torch_on_its_own() -> None:
    code = (
        "import collections, sys, numpy as np\n"
        "import objdl, objdl.wire, objdl.objects\n"
        "from objdl.objects._dict import DictSource, unpack_stream\n"
        "odd = collections.OrderedDict(c=[1, 2])\n"  # off the fast path: looks for tensors
        "s = DictSource({'a': np.arange(5000), 'b': odd})\n"
        "out = unpack_stream(bytearray(b''.join(bytes(p) for p in s.read(0, s.size))))\n"
        "assert out['b'] == {'c': [1, 2]}\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=50, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.strip() == b"False"


# --- through a real broker ----------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
        )
        self.norm = torch.nn.BatchNorm1d(10)  # buffers too: running stats, an int64 counter

    def forward(self, x: Any) -> Any:
        return self.norm(self.net(x))


def test_a_torch_nn_model_round_trips_through_a_broker(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    torch.manual_seed(0)
    model = MLP()
    model.train()
    model(torch.randn(32, 64))  # move the running stats off their defaults
    state = model.state_dict()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    ref = offer_dict(owner, {"fp32": state, "bf16": bf16, "round": 3}, chunk_size=64 * 1024)
    got = download_dict(site, "server", ref, window=4)
    assert got["round"] == 3
    same(got["fp32"], dict(state))
    same(got["bf16"], bf16)
    fresh = MLP()
    fresh.load_state_dict(got["fp32"])
    model.eval()
    fresh.eval()
    x = torch.randn(8, 64)
    assert torch.equal(fresh(x), model(x))
    half = MLP().to(torch.bfloat16)
    half.load_state_dict(got["bf16"])
    assert half.net[0].weight.dtype is torch.bfloat16


def test_download_dict_results_are_writable_in_place(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    t = torch.arange(300_000, dtype=torch.float32)
    a = np.arange(300_000, dtype=np.int32)
    ref = offer_dict(owner, {"t": t, "a": a}, chunk_size=256 * 1024)
    consumer = DictConsumer()
    download_object("server", ref, 10.0, site, consumer)
    assert consumer.outcome.ok is True and consumer.dict is not None
    buffer = consumer.result
    assert buffer is not None
    start = np.frombuffer(buffer, np.uint8).ctypes.data
    got_t, got_a = consumer.dict["t"], consumer.dict["a"]
    got_t.add_(1)
    got_a += 1
    assert torch.equal(got_t, t + 1) and np.array_equal(got_a, a + 1)
    for ptr in (got_t.data_ptr(), got_a.ctypes.data):
        assert start <= ptr < start + len(buffer)


def test_map_location(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    d = {"w": torch.randn(200, 50), "nested": [{"b": torch.ones(3)}], "n": 1}
    ref = offer_dict(owner, d)
    for where in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}):
        got = download_dict(site, "server", ref, map_location=where)
        same(got, d)
    seen: list[str] = []

    def to_double(t: Any, location: str) -> Any:
        seen.append(location)
        return t.double()

    got = download_dict(site, "server", ref, map_location=to_double)
    assert got["w"].dtype is torch.float64 and got["nested"][0]["b"].dtype is torch.float64
    assert torch.equal(got["w"], d["w"].double()) and seen == ["cpu", "cpu"]
    got = download_dict(site, "server", ref, map_location=lambda t, loc: None)
    same(got, d)
    with pytest.raises(TypeError, match="map_location"):
        download_dict(site, "server", ref, map_location=3)


def test_no_torch_on_the_site_is_a_download_error(
    cells: tuple[Cell, Cell], monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, site = cells
    ref = offer_dict(owner, {"w": torch.randn(300, 300), "meta": {"round": 1}})

    def no_torch() -> Any:
        raise ImportError("the data holds a PyTorch tensor; install torch to receive it")

    monkeypatch.setattr(_tensors, "import_torch", no_torch)
    with pytest.raises(DownloadError) as info:
        download_dict(site, "server", ref)
    assert "torch" in info.value.reason
    monkeypatch.undo()
    assert download_dict(site, "server", ref)["w"].shape == (300, 300)  # with torch: fine


def test_inline_limit_boundary() -> None:
    n = INLINE_LIMIT // 4
    d = {"below": torch.ones(n - 1), "at": torch.ones(n), "above": torch.ones(n + 1)}
    same(unpack_stream(stream(d)), d)
