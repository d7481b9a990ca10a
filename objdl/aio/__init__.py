"""objdl for asyncio programs: the same concepts and names as the threaded API, awaitable.

``objdl.aio.Cell`` is a cell whose event loop owns its socket (no thread on the hot
path); it talks to threaded cells through the same broker. See
:class:`objdl.cell._aio.AsyncCell` for how it works.
"""

from objdl.cell._aio import AsyncCell as Cell

__all__ = ["Cell"]
