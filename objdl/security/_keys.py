"""CURVE key pairs, key files, allow-lists and the names bound to each key.

How it works: keys are CurveZMQ (Curve25519) keys in Z85 text, 40 characters, kept
in pyzmq's certificate files: ``NAME.key`` holds a public key, ``NAME.key_secret``
the pair (``objdl keys new`` writes both). An *allow-list directory* holds one
``NAME.key`` per key that may connect, plus ``allowed.json``, a map from ``NAME``
to the names (FQCN patterns) that key may register::

    {"site-1": ["site-1", "site-1.*"], "admin": ["*"]}

A key with no entry there may use ``NAME`` and ``NAME.*`` (its file name and the
cells under it). Patterns are exact names, ``NAME.*`` (every name under ``NAME``, not
``NAME`` itself) or ``*`` (any name). The same directory format gives cells their
peers' public keys for end-to-end encryption: the key for a name is the one whose
most specific pattern matches it (exact, then the nearest ``X.*``, then ``*``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.certs import load_certificate
from zmq.utils import z85

from objdl import fqcn as _fqcn
from objdl.security._errors import KeyFileError

__all__ = [
    "ALLOWED_FILE",
    "KeyPair",
    "KeyPolicy",
    "KeySource",
    "PeerKeys",
    "PublicKeySource",
    "check_pattern",
    "default_patterns",
    "load_keypair",
    "load_public_key",
    "pattern_matches",
    "read_allowed",
    "short_key",
    "write_allowed",
    "write_public_key_file",
]

log = logging.getLogger(__name__)

ALLOWED_FILE = "allowed.json"
"""The file in an allow-list directory that binds each key to the names it may use."""

_Z85_LEN = 40
_RESCAN_S = 1.0  # a peer-key directory is read again on a miss at most this often

PathLike = str | os.PathLike[str]
PublicKeySource = str | bytes | os.PathLike[str]
"""A public key: its Z85 text (40 characters), or the path of a ``.key``/``.key_secret`` file."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair as Z85 bytes (40 characters each). The secret never prints."""

    public: bytes
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_z85(self.public, "public key")
        _check_z85(self.secret, "secret key")
        if zmq.curve_public(self.secret) != self.public:
            raise KeyFileError("the public key does not belong to the secret key")


KeySource = KeyPair | tuple[str | bytes, str | bytes] | str | os.PathLike[str]
"""A key pair: a :class:`KeyPair`, a ``(public, secret)`` Z85 pair, or a ``.key_secret`` path."""


def short_key(key: bytes | str) -> str:
    """The first 8 characters of a Z85 key, for messages and logs."""
    text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
    return text[:8] + "..."


def _check_z85(key: object, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode("ascii", "replace")
    if not isinstance(key, bytes) or len(key) != _Z85_LEN:
        raise KeyFileError(f"a {what} must be 40 characters of Z85 text")
    try:
        z85.decode(key)
    except Exception as exc:  # KeyError, struct.error...: whatever z85 makes of junk
        raise KeyFileError(f"the {what} is not valid Z85 text") from exc
    return key


def _is_z85_text(value: str | bytes) -> bool:
    try:
        _check_z85(value, "key")
    except KeyFileError:
        return False
    return True


def _read_cert(path: PathLike) -> tuple[bytes, bytes | None]:
    try:
        public, secret = load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {os.fspath(path)!r}: no such file") from exc
    except ValueError as exc:
        raise KeyFileError(f"key file {os.fspath(path)!r} holds no public key") from exc
    try:
        _check_z85(public, f"public key in {os.fspath(path)!r}")
        if secret is not None:
            _check_z85(secret, f"secret key in {os.fspath(path)!r}")
    except KeyFileError as exc:
        raise KeyFileError(str(exc)) from None
    return public, secret


def load_keypair(source: KeySource) -> KeyPair:
    """A key pair from a :class:`KeyPair`, a ``(public, secret)`` pair or a ``.key_secret`` file.

    Raises:
        KeyFileError: the file is missing or holds no secret key, a key is not Z85,
            or the public key does not belong to the secret key.
    """
    if isinstance(source, KeyPair):
        return source
    if isinstance(source, tuple):
        if len(source) != 2:
            raise KeyFileError("a key pair must be (public, secret)")
        public, secret = source
        return KeyPair(_check_z85(public, "public key"), _check_z85(secret, "secret key"))
    if isinstance(source, (str, os.PathLike)):
        public, maybe_secret = _read_cert(source)
        if maybe_secret is None:
            raise KeyFileError(
                f"key file {os.fspath(source)!r} holds no secret key: "
                "give the NAME.key_secret file, not NAME.key"
            )
        return KeyPair(public, maybe_secret)
    raise TypeError(f"a key pair must be a path or (public, secret), not {type(source).__name__}")


def load_public_key(source: PublicKeySource) -> bytes:
    """A public key (Z85 bytes) from Z85 text or a ``.key``/``.key_secret`` file.

    Raises:
        KeyFileError: the file is missing or malformed, or the text is not a Z85 key.
    """
    if isinstance(source, (str, bytes)) and _is_z85_text(source):
        return _check_z85(source, "public key")
    if isinstance(source, bytes):
        raise KeyFileError("a public key must be 40 characters of Z85 text")
    if isinstance(source, (str, os.PathLike)):
        return _read_cert(source)[0]
    raise TypeError(f"a public key must be Z85 text or a path, not {type(source).__name__}")


def write_public_key_file(path: PathLike, public: bytes) -> None:
    """Write `public` as a pyzmq certificate file (public part only)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    text = (
        f"#   ****  Generated on {stamp} by objdl  ****\n"
        "#   ZeroMQ CURVE Public Certificate\n\n"
        "metadata\n"
        "curve\n"
        f'    public-key = "{public.decode("ascii")}"\n'
    )
    _write_atomic(Path(path), text)


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with a file holding `text`, never writing through a planted link.

    The temporary has a random name and is created ``O_EXCL | O_NOFOLLOW``, so a
    symlink (or any file) another user left at a name we might pick is refused, not
    written through; ``os.replace`` then swaps the name itself, link or not.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- name patterns


def check_pattern(pattern: object) -> str:
    """Return `pattern` if it is ``*``, a valid name, or ``NAME.*``; else raise ValueError."""
    if not isinstance(pattern, str):
        raise ValueError(f"a name pattern must be a str, not {type(pattern).__name__}")
    if pattern == "*":
        return pattern
    base = pattern[:-2] if pattern.endswith(".*") else pattern
    try:
        _fqcn.validate(base)
    except ValueError as exc:
        raise ValueError(f"bad name pattern {pattern!r}: use NAME, NAME.* or *; {exc}") from None
    return pattern


def pattern_matches(pattern: str, name: str) -> bool:
    """True when `name` matches `pattern` (``*``, an exact name, or ``NAME.*``)."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def default_patterns(label: str) -> list[str]:
    """The names a key file ``LABEL.key`` with no ``allowed.json`` entry may use."""
    return [label, label + ".*"] if _fqcn.is_valid(label) else []


def read_allowed(directory: PathLike) -> dict[str, list[str]]:
    """The bindings in ``DIR/allowed.json`` (``{}`` if there is none).

    Raises:
        KeyFileError: the file is not JSON of the form ``{"NAME": ["pattern", ...]}``
            or holds a bad pattern.
    """
    path = Path(directory) / ALLOWED_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(raw, dict):
        raise KeyFileError(f"{str(path)!r} must hold a JSON object of NAME: [patterns]")
    out: dict[str, list[str]] = {}
    for label, patterns in raw.items():
        if not isinstance(patterns, list):
            raise KeyFileError(f"{str(path)!r}: the names of {label!r} must be a list")
        try:
            out[label] = [check_pattern(p) for p in patterns]
        except ValueError as exc:
            raise KeyFileError(f"{str(path)!r}: {label!r}: {exc}") from None
    return out


def write_allowed(directory: PathLike, bindings: Mapping[str, list[str]]) -> None:
    """Replace ``DIR/allowed.json`` with `bindings` (written atomically)."""
    text = json.dumps(dict(sorted(bindings.items())), indent=2) + "\n"
    _write_atomic(Path(directory) / ALLOWED_FILE, text)


# ---------------------------------------------------------------------- policy


class KeyPolicy:
    """Which public keys may connect, and which names each one may use.

    The broker uses it to answer ZAP (may this key connect?) and to check every
    ``REG`` (may this key register this name?); cells use it to find a peer's key.

    Args:
        bindings: public key (Z85 text or bytes) -> name patterns.
        labels: public key -> a human name for messages (e.g. its file name).
    """

    def __init__(
        self,
        bindings: Mapping[str | bytes, Iterable[str]],
        labels: Mapping[bytes, str] | None = None,
    ) -> None:
        self._names: dict[bytes, tuple[str, ...]] = {}
        for key, patterns in bindings.items():
            z = _check_z85(key, "public key")
            checked = tuple(check_pattern(p) for p in patterns)
            merged = self._names.get(z, ()) + checked
            self._names[z] = tuple(dict.fromkeys(merged))
        self._labels = dict(labels or {})
        self._exact: dict[str, set[bytes]] = {}
        self._subtree: dict[str, set[bytes]] = {}
        self._any: set[bytes] = set()
        for z, patterns in self._names.items():
            for p in patterns:
                if p == "*":
                    self._any.add(z)
                elif p.endswith(".*"):
                    self._subtree.setdefault(p[:-2], set()).add(z)
                else:
                    self._exact.setdefault(p, set()).add(z)

    @classmethod
    def from_dir(cls, directory: PathLike) -> KeyPolicy:
        """Read an allow-list directory: every ``NAME.key`` and ``allowed.json``.

        Raises:
            KeyFileError: the directory is missing, or a file in it is malformed.
        """
        path = Path(directory)
        if not path.is_dir():
            raise KeyFileError(f"key directory {str(path)!r} does not exist")
        allowed = read_allowed(path)
        bindings: dict[str | bytes, list[str]] = {}
        labels: dict[bytes, str] = {}
        for cert in sorted(path.glob("*.key")):
            label = cert.name[: -len(".key")]
            public, _ = _read_cert(cert)
            names = allowed.get(label)
            bindings.setdefault(public, []).extend(
                default_patterns(label) if names is None else names
            )
            labels[public] = label if public not in labels else f"{labels[public]},{label}"
        if any(path.glob("*.key_secret")):
            log.warning("key directory %s holds secret key files: keep those private", path)
        return cls(bindings, labels)

    @classmethod
    def exact(cls, keys: Mapping[str, PublicKeySource]) -> KeyPolicy:
        """Each name bound to exactly one key: ``{"site-1": key_or_path, ...}``."""
        bindings: dict[str | bytes, list[str]] = {}
        labels: dict[bytes, str] = {}
        for name, source in keys.items():
            _fqcn.validate(name)
            public = load_public_key(source)
            bindings.setdefault(public, []).append(name)
            labels.setdefault(public, name)
        return cls(bindings, labels)

    @classmethod
    def of(cls, source: PathLike | Mapping[str, PublicKeySource] | KeyPolicy) -> KeyPolicy:
        """A policy from an allow-list directory, a mapping name -> key, or a policy."""
        if isinstance(source, KeyPolicy):
            return source
        if isinstance(source, Mapping):
            return cls.exact(source)
        if isinstance(source, (str, os.PathLike)):
            return cls.from_dir(source)
        raise TypeError(f"keys must be a directory or a mapping, not {type(source).__name__}")

    @property
    def keys(self) -> frozenset[bytes]:
        return frozenset(self._names)

    def label(self, key: bytes) -> str:
        return self._labels.get(key, short_key(key))

    def allows_key(self, key: bytes | str) -> bool:
        """True when `key` (Z85) may connect at all."""
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        return key in self._names

    def names_for(self, key: bytes | str) -> tuple[str, ...]:
        """The name patterns bound to `key` (empty if unknown)."""
        if isinstance(key, str):
            key = key.encode("ascii", "replace")
        return self._names.get(key, ())

    def check(self, identity: str | None, name: str) -> str:
        """``""`` if the connection authenticated as `identity` may use `name`, else why not.

        This is the broker's ``authorize`` callable (see :class:`broker.RoutingTable`).
        """
        if identity is None:
            return "not allowed: this connection has no authenticated key"
        patterns = self.names_for(identity)
        if any(pattern_matches(p, name) for p in patterns):
            return ""
        if not patterns:
            return f"not allowed: key {short_key(identity)} may use no names"
        return f"not allowed: key {short_key(identity)} may use only {', '.join(patterns)}"

    __call__ = check

    def check_subtree(self, identity: str | None, prefix: str) -> str:
        """``""`` if `identity` may hold the whole subtree `prefix` (a relay broker:
        the name itself and every name under it), else why not.

        It may when its patterns cover `prefix` (exactly, or a ``X.*`` above it, or
        ``*``) and every name under it (``prefix.*``, a ``X.*`` above it, or ``*``).
        """
        if identity is None:
            return "not allowed: this connection has no authenticated key"
        patterns = self.names_for(identity)
        below = prefix + _fqcn.SEPARATOR
        covers_name = any(pattern_matches(p, prefix) for p in patterns)
        covers_below = any(
            p == "*" or (p.endswith(".*") and below.startswith(p[:-1])) for p in patterns
        )
        if covers_name and covers_below:
            return ""
        allowed = ", ".join(patterns) if patterns else "no names"
        return (
            f"not allowed: key {short_key(identity)} may not hold the subtree {prefix!r} "
            f"(that needs {prefix} and {prefix}.*; it may use only {allowed})"
        )

    def lookup(self, name: str) -> tuple[bytes | None, str]:
        """The key trusted for `name` and ``""``, or None and why there is none.

        The most specific binding wins: an exact name, then the nearest ``X.*``
        above `name`, then ``*``. Two different keys at that level: ambiguous, none.
        """
        candidates = self._exact.get(name)
        where = f"bound exactly to {name!r}"
        if not candidates:
            node: str | None = name
            while node is not None and not candidates:
                node = node.rpartition(_fqcn.SEPARATOR)[0] or None
                if node is not None:
                    candidates = self._subtree.get(node)
                    where = f"bound to {node + '.*'!r}"
        if not candidates:
            candidates, where = self._any, "bound to '*'"
        if not candidates:
            return None, f"no public key is bound to {name!r}"
        if len(candidates) > 1:
            labels = ", ".join(sorted(self.label(k) for k in candidates))
            return None, f"ambiguous: several keys are {where} ({labels})"
        return next(iter(candidates)), ""


class PeerKeys:
    """A cell's view of its peers' public keys, for end-to-end encryption.

    Args:
        source: an allow-list style directory (read again, at most once a second,
            when a name is not found), a mapping of name -> public key, or a
            :class:`KeyPolicy`.
        own: this cell's (name, public key): used for messages to itself when the
            source has no key for that name.
    """

    def __init__(
        self,
        source: PathLike | Mapping[str, PublicKeySource] | KeyPolicy,
        own: tuple[str, bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = Path(source) if isinstance(source, (str, os.PathLike)) else None
        self._policy = KeyPolicy.of(source)
        self._own = own
        self._clock = clock
        self._lock = threading.Lock()
        self._next_scan = clock() + _RESCAN_S

    @property
    def where(self) -> str:
        return repr(str(self._dir)) if self._dir is not None else "the peer_keys mapping"

    def lookup(self, name: str) -> tuple[bytes | None, str]:
        """The public key for `name` and ``""``, or None and why there is none."""
        key, why = self._policy.lookup(name)
        if key is None and self._dir is not None and self._rescan_due():
            try:
                self._policy = KeyPolicy.from_dir(self._dir)
            except KeyFileError as exc:
                log.warning("peer keys: keeping the keys read before: %s", exc)
            key, why = self._policy.lookup(name)
        if key is None and self._own is not None and name == self._own[0]:
            return self._own[1], ""
        return key, why

    def _rescan_due(self) -> bool:
        with self._lock:
            now = self._clock()
            if now < self._next_scan:
                return False
            self._next_scan = now + _RESCAN_S
            return True
