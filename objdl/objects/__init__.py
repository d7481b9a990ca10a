"""Ready producers and consumers: bytes, files and dicts of arrays, one call each side."""

from objdl.objects._bytes import BytesConsumer, BytesSource, download_bytes
from objdl.objects._common import DEFAULT_MAX_MEMORY_SIZE, DownloadError
from objdl.objects._dict import DictConsumer, DictSource, download_dict
from objdl.objects._file import FileConsumer, FileSource, check_destination, download_file
from objdl.objects._offer import (
    ObjectProducer,
    new_transaction,
    offer_bytes,
    offer_dict,
    offer_file,
)

__all__ = [
    "DEFAULT_MAX_MEMORY_SIZE",
    "BytesConsumer",
    "BytesSource",
    "DictConsumer",
    "DictSource",
    "DownloadError",
    "FileConsumer",
    "FileSource",
    "ObjectProducer",
    "check_destination",
    "download_bytes",
    "download_dict",
    "download_file",
    "new_transaction",
    "offer_bytes",
    "offer_dict",
    "offer_file",
]
