"""Seed-era users of the API, written the way the seed framework's own modules are.

The seed framework ships a file downloader, a tensor downloader and "via file"
serialisers on top of the Object Downloader. Their consumers check
``isinstance(data, bytes)`` or hand each chunk to a library that takes only bytes
(``safetensors.torch.load``), and they tie a transaction to the message that carried
its refs through the ``MSG_ROOT_ID``/``MSG_ROOT_TTL`` headers. The classes below do
the same, through a real broker on loopback and real cells, and never convert what
they receive: what they get is what the library hands them.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from objdl import wire
from objdl.cell import Cell
from objdl.downloader import Consumer, ObjDownloader, Producer, ProduceRC, download_object
from objdl.downloader._site import _as_seed_values
from objdl.message import Message, MessageHeaderKey, ReturnCode, make_reply, new_cell_message

KIB = 1024
MIB = 1024 * KIB
FILE_CHUNK = 5 * MIB  # the seed framework's file downloader's default chunk

# ---------------------------------------------------------------- a seed-style file downloader


class _Received:
    BYTES = "received_bytes"


class _File:
    """The object offered: a file's name and size, read chunk by chunk on request."""

    def __init__(self, path: str) -> None:
        self.name = path
        self.size = os.path.getsize(path)


class _FileChunkProducer(Producer):
    def __init__(self, chunk_size: int = FILE_CHUNK) -> None:
        super().__init__()
        self.chunk_size = chunk_size

    def produce(self, ref_id, obj, state, requester):
        received = state.get(_Received.BYTES, 0) if state else 0
        if not isinstance(received, int) or received < 0:
            return ProduceRC.ERROR, None, None
        if received >= obj.size:
            return ProduceRC.EOF, None, None
        with open(obj.name, "rb") as f:
            f.seek(received)
            chunk = f.read(min(self.chunk_size, obj.size - received))
        return ProduceRC.OK, chunk, {_Received.BYTES: received + len(chunk)}


class _FileChunkConsumer(Consumer):
    def __init__(self, location: str) -> None:
        super().__init__()
        self.file_path = os.path.join(location, str(uuid.uuid4()))
        self.file = open(self.file_path, "wb")  # noqa: SIM115 - closed when the download ends
        self.total = 0
        self.error: str | None = None

    def consume(self, ref_id, state, data):
        assert isinstance(data, bytes), f"got {type(data).__name__}, not bytes"
        self.file.write(data)
        self.total += len(data)
        return {_Received.BYTES: self.total}

    def download_completed(self, ref_id):
        self.file.close()

    def download_failed(self, ref_id, reason):
        self.error = reason
        self.file.close()


class FileDownloader(ObjDownloader):
    """Files on top of the seed API, as the seed framework's own file downloader does."""

    @classmethod
    def new_transaction(cls, cell, timeout, timeout_cb, **cb_kwargs):
        return ObjDownloader.new_transaction(
            cell=cell,
            producer=_FileChunkProducer(),
            timeout=timeout,
            timeout_cb=cls._tx_timeout,
            app_timeout_cb=timeout_cb,
            **cb_kwargs,
        )

    @classmethod
    def _tx_timeout(cls, tx_id, objs, app_timeout_cb, **cb_kwargs):
        if app_timeout_cb:
            app_timeout_cb(tx_id, [obj.name for obj in objs], **cb_kwargs)

    @classmethod
    def add_file(cls, transaction_id, file_name, ref_id=None, file_downloaded_cb=None, **cb_kwargs):
        return ObjDownloader.add_download_object(
            transaction_id=transaction_id,
            obj=_File(file_name),
            ref_id=ref_id,
            obj_downloaded_cb=cls._file_downloaded,
            app_downloaded_cb=file_downloaded_cb,
            **cb_kwargs,
        )

    @classmethod
    def _file_downloaded(cls, ref_id, to_site, status, obj, app_downloaded_cb, **cb_kwargs):
        if app_downloaded_cb:
            app_downloaded_cb(ref_id, to_site, status, obj.name, **cb_kwargs)

    @classmethod
    def download_file(cls, from_fqcn, ref_id, per_request_timeout, cell, location):
        consumer = _FileChunkConsumer(location)
        download_object(
            from_fqcn=from_fqcn,
            ref_id=ref_id,
            consumer=consumer,
            per_request_timeout=per_request_timeout,
            cell=cell,
        )
        return consumer.error, consumer.file_path


FILE_SIZES = [0, 1, 64 * KIB - 1, 64 * KIB, 5 * MIB + 1, 12 * MIB]


@pytest.mark.parametrize("size", FILE_SIZES, ids=[f"{n}B" for n in FILE_SIZES])
def test_seed_file_downloader_gets_bytes_at_every_size(
    cells: tuple[Cell, Cell], tmp_path: Path, size: int
) -> None:
    owner, site = cells
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(size))
    (tmp_path / "in").mkdir()
    done: list[tuple[str, str, str]] = []
    finished = threading.Event()

    def downloaded(ref_id: str, to_site: str, status: str, file_name: str) -> None:
        done.append((to_site, status, file_name))
        finished.set()

    tx = FileDownloader.new_transaction(owner, 30.0, None)
    ref = FileDownloader.add_file(tx, str(src), file_downloaded_cb=downloaded)
    error, path = FileDownloader.download_file("server", ref, 10.0, site, str(tmp_path / "in"))

    assert error is None
    assert Path(path).read_bytes() == src.read_bytes()  # byte for byte
    assert finished.wait(5.0)
    assert done == [("site-1", "success", str(src))]


# ---------------------------------------------------------------- a seed-style tensor downloader


class _TensorProducer(Producer):
    """Per chunk, a list of safetensors blobs, one per tensor, up to `max_chunk` bytes."""

    def __init__(self, max_chunk: int) -> None:
        super().__init__()
        self.max_chunk = max_chunk

    def produce(self, ref_id, obj, state, requester):
        from safetensors.torch import save

        keys = list(obj)
        index = state.get("next", 0) if state else 0
        if index >= len(keys):
            return ProduceRC.EOF, None, None
        items: list[bytes] = []
        size = 0
        while index < len(keys) and (not items or size < self.max_chunk):
            blob = save({keys[index]: obj[keys[index]]})
            items.append(blob)
            size += len(blob)
            index += 1
        return ProduceRC.OK, items, {"next": index}


class _TensorConsumer(Consumer):
    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, Any] = {}
        self.error: str | None = None
        self.completed = False

    def consume(self, ref_id, state, data):
        from safetensors.torch import load

        assert isinstance(data, list)
        for item in data:
            self.tensors.update(load(item))  # takes bytes only
        return state

    def download_completed(self, ref_id):
        self.completed = True

    def download_failed(self, ref_id, reason):
        self.error = reason


def test_seed_tensor_downloader_loads_every_chunk_with_safetensors(
    cells: tuple[Cell, Cell],
) -> None:
    torch = pytest.importorskip("torch", reason="the tensor downloader test needs torch")
    pytest.importorskip("safetensors.torch", reason="the tensor downloader test needs safetensors")
    owner, site = cells
    gen = torch.Generator().manual_seed(7)
    model = {
        "conv.weight": torch.randn(64, 32, 3, 3, generator=gen),  # 288 KiB
        "conv.bias": torch.randn(64, generator=gen),  # a small one: inline on the wire
        "fc.weight": torch.randn(512, 512, generator=gen).to(torch.bfloat16),  # 512 KiB
        "fc.bias": torch.zeros(512, dtype=torch.float16),
        "steps": torch.tensor(1234, dtype=torch.int64),  # 0-d
        "big": torch.randn(1536, 1024, generator=gen),  # 6 MiB: a chunk of its own
    }
    tx = ObjDownloader.new_transaction(owner, _TensorProducer(2 * MIB), 30.0)
    ref = ObjDownloader.add_download_object(tx, model)
    consumer = _TensorConsumer()
    download_object("server", ref, 10.0, site, consumer)

    assert consumer.error is None and consumer.completed
    assert sorted(consumer.tensors) == sorted(model)
    for key, tensor in model.items():
        got = consumer.tensors[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), key


# ---------------------------------------------------------------- what a consumer gets, exactly


class _Recorder(Consumer):
    """Records what it was handed (a view stays valid while it is referenced)."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[Any, Any]] = []
        self.error: str | None = None

    def consume(self, ref_id, state, data):
        self.got.append((state, data))
        return {"i": len(self.got)}

    def download_completed(self, ref_id):
        pass

    def download_failed(self, ref_id, reason):
        self.error = reason


class _ViewRecorder(_Recorder):
    accepts_views = True


class _PiecesProducer(Producer):
    """Sends the items of a list one per reply, each with a state holding a big blob."""

    def produce(self, ref_id, obj, state, requester):
        i = state["i"] if state else 0
        if i >= len(obj):
            return ProduceRC.EOF, None, None
        return ProduceRC.OK, obj[i], {"i": i, "blob": b"s" * (100 * KIB), "tags": ("a", 1)}


BIG = b"\x01" * (64 * KIB)
SMALL = b"\x02" * (64 * KIB - 1)


def _pieces() -> list[Any]:
    return [
        BIG,
        SMALL,
        [BIG, (SMALL, BIG)],
        {"k": {"deep": [BIG]}, "n": 3, "s": SMALL},
    ]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_plain_consumer_gets_bytes_in_plain_containers(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    tx = ObjDownloader.new_transaction(owner, _PiecesProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, _pieces())
    c = _Recorder()
    download_object("server", ref, 10.0, site, c)
    assert c.error is None

    datas = [data for _, data in c.got]
    # What went in, tuples as lists (as in the seed, whose codec does the same).
    assert datas == [BIG, SMALL, [BIG, [SMALL, BIG]], {"k": {"deep": [BIG]}, "n": 3, "s": SMALL}]
    for data in datas:
        for leaf in _leaves(data):
            assert type(leaf) in (bytes, int), type(leaf)
    for state, _ in c.got:
        assert type(state) is dict and type(state["blob"]) is bytes
        assert type(state["tags"]) is list


def test_consumer_that_accepts_views_gets_them(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    tx = ObjDownloader.new_transaction(owner, _PiecesProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, _pieces())
    c = _ViewRecorder()
    download_object("server", ref, 10.0, site, c)
    assert c.error is None

    first, second, nested, mapping = (data for _, data in c.got)
    for view in (first, nested[0], nested[1][1], mapping["k"]["deep"][0]):
        assert type(view) is memoryview and view.readonly and view == BIG
    # Below the wire's threshold, a buffer travels inline and is bytes either way.
    assert type(second) is bytes and type(mapping["s"]) is bytes
    assert type(c.got[0][0]["blob"]) is memoryview


def test_plain_consumer_gets_writable_numpy_arrays(cells: tuple[Cell, Cell]) -> None:
    np = pytest.importorskip("numpy")
    owner, site = cells
    arrays = [np.arange(32 * KIB, dtype=np.float32), {"a": np.ones(4, dtype=np.int16)}]
    tx = ObjDownloader.new_transaction(owner, _PiecesProducer(), 30.0)
    ref = ObjDownloader.add_download_object(tx, arrays)
    plain, views = _Recorder(), _ViewRecorder()
    download_object("server", ref, 10.0, site, plain)
    download_object("server", ref, 10.0, site, views)
    assert plain.error is None and views.error is None

    big, small = plain.got[0][1], plain.got[1][1]["a"]
    assert big.flags.writeable and small.flags.writeable
    np.testing.assert_array_equal(big, arrays[0])
    big[0] = 1.0  # the seed's arrays were the consumer's own
    assert not views.got[0][1].flags.writeable


def test_seed_conversion_survives_the_deepest_payload_the_codec_decodes() -> None:
    # An owner is untrusted: it can send a body nested as deep as msgpack decodes
    # (about 1000 levels), past Python's recursion limit. The conversion must not
    # raise on it (RecursionError would end the download as a consumer exception).
    depth = 1000
    body = b"\x91" * depth + b"\xc7\x04\x01" + (0).to_bytes(4, "big")  # ext: buffer 0
    message = wire.decode([wire.encode(Message({}, None))[0], body, b"x" * (64 * KIB)])
    value = _as_seed_values(message.payload)
    for _ in range(depth):
        assert type(value) is list and len(value) == 1
        value = value[0]
    assert type(value) is bytes and value == b"x" * (64 * KIB)


# ---------------------------------------------------------------- message-root headers


def test_msg_root_headers_travel_end_to_end(cells: tuple[Cell, Cell]) -> None:
    owner, site = cells
    assert MessageHeaderKey.MSG_ROOT_ID == "msg_root_id"
    assert MessageHeaderKey.MSG_ROOT_TTL == "msg_root_ttl"
    seen: list[dict[str, Any]] = []

    def handler(request: Message) -> Message:
        seen.append(dict(request.headers))
        reply = make_reply(ReturnCode.OK, body="ack")
        reply.set_header(MessageHeaderKey.MSG_ROOT_ID, "root-reply")
        reply.set_header(MessageHeaderKey.MSG_ROOT_TTL, 12.5)
        return reply

    site.register_request_cb("app", "task", handler)
    request = new_cell_message(
        {MessageHeaderKey.MSG_ROOT_ID: "root-1", MessageHeaderKey.MSG_ROOT_TTL: 90.0}, "refs"
    )
    reply = owner.send_request("app", "site-1", "task", request, 5.0)

    assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK
    assert seen[0][MessageHeaderKey.MSG_ROOT_ID] == "root-1"
    assert seen[0][MessageHeaderKey.MSG_ROOT_TTL] == 90.0
    assert reply.get_header(MessageHeaderKey.MSG_ROOT_ID) == "root-reply"
    assert reply.get_header(MessageHeaderKey.MSG_ROOT_TTL) == 12.5


def test_via_file_style_transaction_lives_as_long_as_its_message_root(
    cells: tuple[Cell, Cell], tmp_path: Path
) -> None:
    """The "via file" way: the site learns the ref, and the transaction's lifetime,
    from the message that carried it; the owner's transaction ends on that TTL."""
    torch = pytest.importorskip("torch", reason="the via-file test needs torch")
    st = pytest.importorskip("safetensors.torch", reason="the via-file test needs safetensors")
    owner, site = cells
    tensors = {"w": torch.arange(40_000, dtype=torch.float32).reshape(200, 200)}
    path = tmp_path / "payload.safetensors"
    st.save_file(tensors, str(path))
    (tmp_path / "in").mkdir()
    got: dict[str, Any] = {}
    ended = threading.Event()

    def on_task(request: Message) -> Message:
        ttl = request.get_header(MessageHeaderKey.MSG_ROOT_TTL)
        got["root"] = request.get_header(MessageHeaderKey.MSG_ROOT_ID)
        got["error"], got["path"] = FileDownloader.download_file(
            "server", request.payload["ref"], ttl, site, str(tmp_path / "in")
        )
        return make_reply(ReturnCode.OK)

    def tx_ended(tx_id: str, file_names: list[str]) -> None:
        got["ended"] = file_names
        ended.set()

    site.register_request_cb("app", "task", on_task)
    ttl = 1.5  # the transaction times out this long after its last request
    tx = FileDownloader.new_transaction(owner, ttl, tx_ended)
    ref = FileDownloader.add_file(tx, str(path))
    request = new_cell_message(
        {MessageHeaderKey.MSG_ROOT_ID: "task-7", MessageHeaderKey.MSG_ROOT_TTL: ttl},
        {"ref": ref},
    )
    reply = owner.send_request("app", "site-1", "task", request, 10.0)

    assert reply.get_header(MessageHeaderKey.RETURN_CODE) == ReturnCode.OK
    assert got["root"] == "task-7" and got["error"] is None
    assert torch.equal(st.load_file(got["path"])["w"], tensors["w"])
    assert ended.wait(10.0) and got["ended"] == [str(path)]
