"""The object downloader: the seed's API, correct, per cell, windowed for sized objects.

An owner offers objects within a transaction and hands out their ref ids; each site
pulls an object chunk by chunk with :func:`download_object`.
"""

from objdl.downloader._budget import MAX_INFLIGHT_PER_SITE, MAX_INFLIGHT_TOTAL
from objdl.downloader._defs import (
    OBJ_DOWNLOADER_CHANNEL,
    OBJ_DOWNLOADER_TOPIC,
    Consumer,
    DownloadStatus,
    InvalidStateError,
    Producer,
    ProduceRC,
    RetryPolicy,
)
from objdl.downloader._outcome import RefOutcome, SiteRecord, TransferOutcome, TransferStatus
from objdl.downloader._owner import ObjDownloader
from objdl.downloader._site import download_object
from objdl.downloader.sized import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DIGEST,
    DEFAULT_WINDOW,
    DIGESTS,
    SizedConsumer,
    SizedProducer,
    SizedSource,
    new_hash,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_DIGEST",
    "DEFAULT_WINDOW",
    "DIGESTS",
    "MAX_INFLIGHT_PER_SITE",
    "MAX_INFLIGHT_TOTAL",
    "OBJ_DOWNLOADER_CHANNEL",
    "OBJ_DOWNLOADER_TOPIC",
    "Consumer",
    "DownloadStatus",
    "InvalidStateError",
    "ObjDownloader",
    "ProduceRC",
    "Producer",
    "RefOutcome",
    "RetryPolicy",
    "SiteRecord",
    "SizedConsumer",
    "SizedProducer",
    "SizedSource",
    "TransferOutcome",
    "TransferStatus",
    "download_object",
    "new_hash",
]
