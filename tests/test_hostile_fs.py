"""A site's destination folder in the hands of a hostile local user (and of bad luck).

Each test plants something at a name objdl uses, or breaks the folder mid-download,
through the public ``download_file`` with a real broker, owner and site, and checks
that nothing outside the download is written, replaced or left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from objdl.cell import Cell
from objdl.downloader import DEFAULT_DIGEST, ObjDownloader, SizedProducer, SizedSource
from objdl.objects import DownloadError, FileConsumer, _file, download_file, offer_file
from tests import _procs
from tests.conftest import reference_digest

MiB = 1024 * 1024
STRANGER = 4242  # a uid that is not ours (the tests run as root, so chown works)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod)")


def kept(folder: Path) -> list[str]:
    """Every file objdl may leave in `folder`: parts, state records, temporaries."""
    return sorted(p.name for p in folder.iterdir() if ".objdl-" in p.name)


def fds_under(folder: Path) -> list[str]:
    """What this process's open descriptors in `folder` point at (deleted ones too)."""
    found = []
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            target = os.readlink(f"/proc/self/fd/{n}")
            if target.startswith(str(folder)):
                found.append(target)
    return found


@pytest.fixture
def src(tmp_path: Path) -> Path:
    p = tmp_path / "src" / "model.bin"
    p.parent.mkdir()
    p.write_bytes(os.urandom(3 * MiB + 5))
    return p


@pytest.fixture
def out(tmp_path: Path) -> Path:
    p = tmp_path / "out"
    p.mkdir()
    return p


def victim(folder: Path, name: str = "victim.txt") -> Path:
    """A file of ours that a planted link would make the download overwrite."""
    p = folder / name
    p.write_bytes(b"precious, must stay as it is")
    return p


def offer_slow(owner: Cell, path: Path, delay: float = 0.02) -> str:
    producer = _procs.throttled_producer(delay, chunk_size=256 * 1024)
    tx = ObjDownloader.new_transaction(owner, producer, 60.0)
    return ObjDownloader.add_download_object(tx, path)


def download_withdrawn_at_1mib(site: Cell, ref: str, dest: Path, reason: str) -> None:
    """A resumable download of `ref` that its owner withdraws, with `reason`, after 1 MiB."""

    def withdraw(ref_id: str, done: int, total: Any, rate: float) -> None:
        if done >= MiB:
            ObjDownloader.withdraw(ref_id, reason)

    download_file(
        site, "server", ref, dest, resume=True, window=1, progress_cb=withdraw,
        progress_interval=0.0,
    )  # fmt: skip


# ----------------------------------------------------------------- planted at our names


@pytest.mark.parametrize("at", ["part", "state", "state temporary"])
def test_planted_symlink_is_not_written_through(
    cells: tuple[Cell, Cell], src: Path, out: Path, tmp_path: Path, at: str
) -> None:
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "copy.bin"
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)
    target = victim(tmp_path)
    planted = {"part": part, "state": state, "state temporary": Path(f"{state}.tmp")}[at]
    planted.symlink_to(target)
    download_file(site, "server", ref, dest, resume=True)
    assert target.read_bytes() == b"precious, must stay as it is"
    assert dest.read_bytes() == src.read_bytes()
    assert not part.exists() and not state.exists()


def test_planted_hard_link_at_the_part_name_is_not_written_into(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    # An earlier, interrupted download left a genuine record; the attacker swapped the
    # part for a hard link to another file of ours, of the right size.
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "copy.bin"
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)
    size = src.stat().st_size
    target = out / "victim.bin"
    target.write_bytes(b"v" * size)
    os.link(target, part)
    record = {"ref_id": ref, "verified": MiB, "size": size, "algo": DEFAULT_DIGEST}
    record["digest"] = reference_digest(DEFAULT_DIGEST, src.read_bytes())
    state.write_text(json.dumps(record))
    download_file(site, "server", ref, dest, resume=True)
    assert target.read_bytes() == b"v" * size
    assert dest.read_bytes() == src.read_bytes()
    assert kept(out) == []


@needs_root
def test_kept_files_of_another_user_are_not_trusted(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    # A part and a record that claims all of it verified, both planted by another uid:
    # resuming from them would fail the digest (or worse); they must be ignored, and
    # the stranger's file must not be written into.
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "copy.bin"
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)
    size = src.stat().st_size
    part.write_bytes(b"x" * size)
    record = {"ref_id": ref, "verified": size, "size": size, "algo": DEFAULT_DIGEST}
    record["digest"] = reference_digest(DEFAULT_DIGEST, src.read_bytes())
    state.write_text(json.dumps(record))
    for p in (part, state):
        os.chown(p, STRANGER, STRANGER)
    theirs = os.open(part, os.O_RDONLY)
    try:
        download_file(site, "server", ref, dest, resume=True)
        assert os.pread(theirs, size + 1, 0) == b"x" * size
        assert os.fstat(theirs).st_nlink == 0  # replaced by our own file, then renamed
    finally:
        os.close(theirs)
    assert dest.read_bytes() == src.read_bytes()
    assert kept(out) == []


def test_fifo_at_the_state_path_does_not_block(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "copy.bin"
    _, state = FileConsumer(dest, resume=True).resume_paths(ref)
    os.mkfifo(state)
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            download_file(site, "server", ref, dest, resume=True)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=fetch)
    t.start()
    t.join(20)
    if t.is_alive():  # blocked opening the FIFO: let it go before failing
        fd = os.open(state, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(20)
        pytest.fail("the download blocked opening a FIFO planted at its state path")
    assert errors == []
    assert dest.read_bytes() == src.read_bytes()
    assert kept(out) == []  # the FIFO was replaced by a record, then removed


# ----------------------------------------------------------------- the destination itself


@needs_root
@pytest.mark.parametrize("kind", ["fifo", "char device", "symlink to a file", "symlink to a dir"])
def test_destination_that_is_not_a_regular_file_is_refused(
    cells: tuple[Cell, Cell], src: Path, out: Path, tmp_path: Path, kind: str
) -> None:
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "dest"
    target = victim(tmp_path)
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "char device":
        os.mknod(dest, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    elif kind == "symlink to a file":
        dest.symlink_to(target)
    else:
        dest.symlink_to(tmp_path)
    before = os.lstat(dest)
    with pytest.raises(FileExistsError, match="not a regular file"):
        download_file(site, "server", ref, dest)
    after = os.lstat(dest)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)  # still there
    assert target.read_bytes() == b"precious, must stay as it is"
    assert kept(out) == []


def test_fifo_planted_at_the_destination_mid_download_is_not_replaced(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    owner, site = cells
    ref = offer_slow(owner, src)
    dest = out / "copy.bin"

    def plant(ref_id: str, done: int, total: Any, rate: float) -> None:
        if done and not os.path.lexists(dest):
            os.mkfifo(dest)

    with pytest.raises(DownloadError, match="is a FIFO"):
        download_file(site, "server", ref, dest, progress_cb=plant, progress_interval=0.0)
    assert stat.S_ISFIFO(os.lstat(dest).st_mode)
    assert kept(out) == []


# ----------------------------------------------------------------- the folder, mid-download


@pytest.mark.parametrize("resume", [False, True])
def test_folder_removed_mid_download_fails_cleanly(
    cells: tuple[Cell, Cell], src: Path, out: Path, resume: bool
) -> None:
    owner, site = cells
    ref = offer_slow(owner, src)
    dest = out / "copy.bin"

    def remove(ref_id: str, done: int, total: Any, rate: float) -> None:
        if done and out.exists():
            shutil.rmtree(out)

    with pytest.raises(DownloadError) as info:
        download_file(
            site, "server", ref, dest, resume=resume, progress_cb=remove, progress_interval=0.0
        )
    assert "was removed" in info.value.reason or "No such file" in info.value.reason
    assert not out.exists()
    assert fds_under(out) == []  # the part, the folder: every descriptor closed


def test_folder_swapped_for_a_symlink_does_not_redirect_anything(
    cells: tuple[Cell, Cell], src: Path, out: Path, tmp_path: Path
) -> None:
    owner, site = cells
    ref = offer_slow(owner, src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = tmp_path / "moved"
    dest = out / "copy.bin"

    def swap(ref_id: str, done: int, total: Any, rate: float) -> None:
        if done and not moved.exists():
            out.rename(moved)
            out.symlink_to(elsewhere)

    with pytest.raises(DownloadError, match="moved or replaced"):
        download_file(
            site, "server", ref, dest, resume=True, progress_cb=swap, progress_interval=0.0
        )
    assert list(elsewhere.iterdir()) == []  # nothing written or renamed through the link
    assert not (moved / "copy.bin").exists()


# ----------------------------------------------------------------- space and names


class _Huge(SizedSource):
    """An owner that claims an object bigger than the site's free space."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.meta = {"name": "huge"}
        self.reads = 0

    def read(self, offset: int, length: int) -> bytes:
        self.reads += 1
        if self.reads > 3:
            raise RuntimeError("the site kept asking for data")
        return bytes(length)

    def digest(self, algo: str) -> str:
        return "0" * 32


class _HugeProducer(SizedProducer):
    def __init__(self, size: int) -> None:
        super().__init__(chunk_size=64 * 1024)
        self.source = _Huge(size)

    def open_source(self, ref_id: str, obj: Any) -> SizedSource:
        return self.source


def test_not_enough_free_space_fails_before_asking_for_data(
    cells: tuple[Cell, Cell], out: Path
) -> None:
    owner, site = cells
    st = os.statvfs(out)
    size = st.f_bavail * st.f_frsize + 2**30
    producer = _HugeProducer(size)
    ref = ObjDownloader.add_download_object(
        ObjDownloader.new_transaction(owner, producer, 30.0), "huge"
    )
    with pytest.raises(DownloadError, match="not enough free space"):
        download_file(site, "server", ref, out / "huge.bin", tries=1)
    assert producer.source.reads == 1  # only the first reply, which says the size
    assert kept(out) == [] and not (out / "huge.bin").exists()


LONG_NAMES = {
    "240 ascii": "m" * 236 + ".bin",
    "255 ascii": "m" * 251 + ".bin",
    "255 bytes utf-8": "€" * 85,  # 3 bytes each
    "mixed utf-8": "é" * 126 + "x" + ".b",  # 255 bytes, cut must not split a character
}


@pytest.mark.parametrize("resume", [False, True])
@pytest.mark.parametrize("name", list(LONG_NAMES))
def test_longest_legal_names_download(
    cells: tuple[Cell, Cell], src: Path, out: Path, name: str, resume: bool
) -> None:
    owner, site = cells
    fname = LONG_NAMES[name]
    assert len(os.fsencode(fname)) <= 255
    ref = offer_file(owner, src)
    dest = out / fname
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)
    assert all(len(os.fsencode(p.name)) <= 255 for p in (part, state))
    assert (part, state) == FileConsumer(dest, resume=True).resume_paths(ref)  # deterministic
    download_file(site, "server", ref, dest, resume=resume, chunk_size=MiB)
    assert dest.read_bytes() == src.read_bytes()
    assert kept(out) == []


def test_long_name_resume_keeps_its_part_where_a_new_process_finds_it(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    owner, site = cells
    ref = offer_slow(owner, src)
    dest = out / ("€" * 85)
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)

    with pytest.raises(DownloadError, match="withdrawn"):
        download_withdrawn_at_1mib(site, ref, dest, "test")
    assert kept(out) == sorted([part.name, state.name])
    assert json.loads(state.read_text())["verified"] > 0


# ----------------------------------------------------------------- keep or discard, by type


def test_owner_saying_digest_mismatch_does_not_discard_a_kept_part(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    # Whether to keep a part is decided by the download's own digest check, not by
    # text: an owner's message that merely says "digest mismatch" changes nothing.
    owner, site = cells
    ref = offer_slow(owner, src)
    dest = out / "copy.bin"
    part, state = FileConsumer(dest, resume=True).resume_paths(ref)

    with pytest.raises(DownloadError, match="digest mismatch"):
        download_withdrawn_at_1mib(site, ref, dest, "digest mismatch (or so it says)")
    assert part.exists() and state.exists()


def test_kept_part_written_behind_resumes_in_a_new_consumer(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cache=False drops what it wrote from memory as it goes: a kept part still holds
    # every verified byte, read back from the disk, and the resumed download (written
    # behind again, through the reopened descriptor) completes it.
    monkeypatch.setattr(_file, "WRITE_BEHIND", 64 * 1024)
    piece = 128 * 1024
    data = os.urandom(6 * piece + 3)
    desc = {"size": len(data), "algo": DEFAULT_DIGEST, "digest": "d"}
    dest = out / "copy.bin"
    first = FileConsumer(dest, resume=True, cache=False)
    assert first.resume_from("R1", desc) == 0
    first.begin("R1", len(data), None)
    for off in (piece, 0, 2 * piece):
        first.write(off, [memoryview(data)[off : off + piece]])
    first.verified(3 * piece)
    first.download_failed("R1", "connection lost")
    assert len(kept(out)) == 2 and fds_under(out) == []

    again = FileConsumer(dest, resume=True, cache=False)
    upto = again.resume_from("R1", desc)
    assert upto == 3 * piece
    assert again.read(0, upto) == data[:upto]
    for off in range(upto, len(data), piece):
        again.write(off, [memoryview(data)[off : off + piece]])
    again.download_completed("R1")
    assert again.outcome.ok, again.outcome.reason
    assert dest.read_bytes() == data
    assert kept(out) == [] and fds_under(out) == []


def test_rejected_data_is_discarded_whatever_the_reason_says(out: Path) -> None:
    dest = out / "copy.bin"
    consumer = FileConsumer(dest, resume=True)
    consumer.resume_from("R1", {"size": 10, "algo": DEFAULT_DIGEST, "digest": "d"})
    consumer.begin("R1", 10, None)
    consumer.write(0, [memoryview(b"0123456789")])
    consumer.verified(10)
    assert len(kept(out)) == 2
    consumer.data_rejected("R1")
    consumer.download_failed("R1", "some reason that names no digest")
    assert kept(out) == [] and not dest.exists()
    assert fds_under(out) == []


@pytest.mark.parametrize("claim", [10**18, -1, True, "1024", None])
def test_record_with_a_bad_verified_claim_is_not_resumed(out: Path, claim: Any) -> None:
    desc = {"size": 10, "algo": DEFAULT_DIGEST, "digest": "d"}
    first = FileConsumer(out / "copy.bin", resume=True)
    first.resume_from("R1", desc)
    first.begin("R1", 10, None)
    first.write(0, [memoryview(b"0123456789")])
    first.download_failed("R1", "interrupted")  # keeps the part and its record
    _, state = first.resume_paths("R1")
    record = json.loads(state.read_text())
    record["verified"] = claim
    state.write_text(json.dumps(record))
    again = FileConsumer(out / "copy.bin", resume=True)
    assert again.resume_from("R1", desc) == 0
    again.download_failed("R1", "test over")
    assert fds_under(out) == []


def test_temporaries_left_by_a_killed_process_are_removed(
    cells: tuple[Cell, Cell], src: Path, out: Path
) -> None:
    # A process killed between creating a record's temporary and renaming it leaves
    # `.{stem}.{tag}.{8 hex}.objdl-tmp`; the next download of that (dest, ref) removes
    # it once it ends, and touches nothing that is not named like its own.
    owner, site = cells
    ref = offer_file(owner, src)
    dest = out / "copy.bin"
    part, _ = FileConsumer(dest, resume=True).resume_paths(ref)
    stem = part.name.rsplit(".", 1)[0]
    stale = out / f"{stem}.0badc0de.objdl-tmp"
    stale.write_bytes(b"{}")
    others = [out / f"{stem}.notmine!.objdl-tmp", out / ".other.0badc0de.objdl-tmp"]
    for p in others:
        p.write_bytes(b"not ours")
    download_file(site, "server", ref, dest, resume=True)
    assert dest.read_bytes() == src.read_bytes()
    assert not stale.exists()
    assert all(p.read_bytes() == b"not ours" for p in others)
