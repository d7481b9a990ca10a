"""objdl's opt-in security: CURVE connections to the broker, and end-to-end sealing.

Two independent layers (docs/SECURITY.md):

- **CURVE** (ZeroMQ's CurveZMQ): the broker has a key pair and an allow-list
  directory of cell public keys, each bound to the names it may register. A cell
  whose key is not allowed cannot connect; an allowed key cannot register a name it
  is not bound to. Pieces here: key files (:func:`load_keypair`,
  :func:`load_public_key`), :class:`KeyPolicy`, and :func:`zap_reply`.
- **secure=True** (end to end): a message is sealed by its sender for its receiver
  (X25519 + HKDF-SHA256 + ChaCha20-Poly1305) so the broker sees only ciphertext, and
  replays are refused. :func:`end_to_end` builds a cell's state; it is the only
  thing that needs the optional ``cryptography`` package, imported on first use.

Nothing here opens a socket or starts a thread; the cell and the broker do.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from objdl.security._errors import (
    AuthenticationError,
    KeyFileError,
    Rejected,
    SecureUnavailableError,
)
from objdl.security._keys import (
    ALLOWED_FILE,
    KeyPair,
    KeyPolicy,
    KeySource,
    PeerKeys,
    PublicKeySource,
    check_pattern,
    default_patterns,
    load_keypair,
    load_public_key,
    pattern_matches,
    read_allowed,
    short_key,
    write_allowed,
    write_public_key_file,
)
from objdl.security._zap import ZAP_ENDPOINT, zap_reply

if TYPE_CHECKING:
    from objdl.security._e2e import EndToEnd

__all__ = [
    "ALLOWED_FILE",
    "SECURE_HEADER",
    "ZAP_ENDPOINT",
    "AuthenticationError",
    "KeyFileError",
    "KeyPair",
    "KeyPolicy",
    "KeySource",
    "PeerKeySource",
    "PeerKeys",
    "PublicKeySource",
    "Rejected",
    "SecureUnavailableError",
    "check_pattern",
    "default_patterns",
    "end_to_end",
    "load_keypair",
    "load_public_key",
    "pattern_matches",
    "read_allowed",
    "short_key",
    "write_allowed",
    "write_public_key_file",
    "zap_reply",
]

SECURE_HEADER = "secure"
"""The header that marks a sealed message (``MessageHeaderKey.SECURE``)."""

PeerKeySource = str | os.PathLike[str] | Mapping[str, PublicKeySource] | KeyPolicy
"""Peers' public keys: an allow-list style directory, a name -> key mapping, or a policy."""


def end_to_end(fqcn: str, keypair: KeyPair, peers: PeerKeySource) -> EndToEnd:
    """A cell's end-to-end state, importing ``cryptography`` now.

    Raises:
        SecureUnavailableError: ``cryptography`` is not installed.
        KeyFileError: the peer keys cannot be read.
    """
    try:
        e2e = importlib.import_module("objdl.security._e2e")
    except ImportError as exc:
        if not (exc.name or "").startswith("cryptography"):
            raise
        raise SecureUnavailableError(
            "secure=True needs the 'cryptography' package, which is not installed: "
            "pip install 'objdl[secure]'; refusing rather than sending plaintext"
        ) from None
    peer_keys = PeerKeys(peers, own=(fqcn, keypair.public))
    end: EndToEnd = e2e.EndToEnd(fqcn, keypair, peer_keys)
    return end
