"""objdl for asyncio programs: the same concepts and names as the threaded API, awaitable.

- :class:`Cell`: a cell whose event loop owns its socket (no thread on the hot path);
  it talks to threaded cells through the same broker. ``async def`` handlers run on
  the loop, plain ones on handler threads (or inline).
- :func:`download_bytes`, :func:`download_file`, :func:`download_dict` and the seed's
  :func:`download_object`, awaitable, with the threaded helpers' options and
  :class:`~objdl.objects.DownloadError`; cancelling the awaiting task cancels the
  download and leaves nothing behind.
- The owner's side takes an asyncio cell as it takes a threaded one:
  ``objdl.objects.offer_bytes(cell, ...)``, ``ObjDownloader.new_transaction(cell, ...)``;
  producers run on the cell's handler threads, never on the loop.
- Direct data links as on threaded cells: ``Cell(..., data_bind=...)`` offers the
  owner's data socket, and an asyncio site takes the links offered to it; the loop
  drives the link sockets too.
"""

from objdl.aio._download import download_bytes, download_dict, download_file, download_object
from objdl.cell._aio import AsyncCell as Cell
from objdl.objects import DownloadError

__all__ = [
    "Cell",
    "DownloadError",
    "download_bytes",
    "download_dict",
    "download_file",
    "download_object",
]
