"""objdl: move large objects from one process to many over a ZeroMQ broker.

The names most programs need, re-exported here so one import does:

    from objdl import Cell, offer_file, download_file, DownloadError

Each also lives in its layer's module (``objdl.cell``, ``objdl.message``,
``objdl.downloader``, ``objdl.objects``, ``objdl.errors``, ``objdl.security``), which
hold more (constants, lower-level pieces); these are the same objects. The broker is its
own package: ``from broker import Broker``.

Importing objdl is light: it does not import numpy, torch, cryptography or tqdm, and
starts no thread; a `Cell` starts its threads when it starts.
"""

from objdl.cell import Cell, CellLike, PendingRequest
from objdl.downloader import (
    Consumer,
    DownloadStatus,
    InvalidStateError,
    ObjDownloader,
    Producer,
    ProduceRC,
    RefOutcome,
    RetryPolicy,
    SiteRecord,
    SizedConsumer,
    SizedProducer,
    SizedSource,
    TransferOutcome,
    TransferStatus,
    download_object,
)
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError, ObjdlError, WireError
from objdl.message import (
    Message,
    MessageHeaderKey,
    MessageType,
    ReturnCode,
    Signal,
    make_reply,
    new_cell_message,
)
from objdl.objects import (
    BytesConsumer,
    BytesSource,
    DictConsumer,
    DictSource,
    DownloadError,
    FileConsumer,
    FileSource,
    ObjectProducer,
    check_destination,
    download_bytes,
    download_dict,
    download_file,
    new_transaction,
    offer_bytes,
    offer_dict,
    offer_file,
)
from objdl.security import (
    AuthenticationError,
    KeyFileError,
    KeyPair,
    KeyPolicy,
    SecureUnavailableError,
    load_keypair,
    load_public_key,
)

__version__ = "0.1.0"
"""The package version; pyproject.toml reads it from here (the one place it is written)."""

# fmt: off
__all__ = [  # noqa: RUF022 (grouped by layer, not sorted)
    # cells
    "Cell", "CellLike", "PendingRequest",
    # messages
    "Message", "MessageHeaderKey", "MessageType", "ReturnCode", "Signal",
    "make_reply", "new_cell_message",
    # downloader: the seed's API, and what a download reports
    "ObjDownloader", "Producer", "Consumer", "ProduceRC", "DownloadStatus", "download_object",
    "SizedSource", "SizedProducer", "SizedConsumer", "RetryPolicy",
    "TransferOutcome", "TransferStatus", "RefOutcome", "SiteRecord",
    # objects: ready downloads, one call each side
    "offer_bytes", "offer_file", "offer_dict", "new_transaction",
    "download_bytes", "download_file", "download_dict", "check_destination",
    "BytesSource", "FileSource", "DictSource", "ObjectProducer",
    "BytesConsumer", "FileConsumer", "DictConsumer",
    # errors
    "ObjdlError", "CellError", "BrokerUnavailableError", "NameTakenError", "WireError",
    "InvalidStateError", "DownloadError",
    # security
    "KeyPair", "KeyPolicy", "load_keypair", "load_public_key",
    "AuthenticationError", "KeyFileError", "SecureUnavailableError",
]
# fmt: on
