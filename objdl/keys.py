"""``objdl keys``: make CURVE key pairs and keep a broker's allow-list directory.

    objdl keys new NAME [--dir DIR]                  NAME.key + NAME.key_secret
    objdl keys allow NAME --dir ALLOWED --pub FILE [--names 'site-1,site-1.*']
    objdl keys revoke NAME --dir ALLOWED
    objdl keys list --dir DIR

The allow-list layout (``NAME.key`` files and ``allowed.json``) is described in
:mod:`objdl.security` and docs/SECURITY.md. Errors are one line on stderr; the exit
status is 0 on success, 1 when the command failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from zmq.auth.certs import create_certificates

from objdl.security import (
    KeyFileError,
    check_pattern,
    default_patterns,
    load_public_key,
    read_allowed,
    short_key,
    write_allowed,
    write_public_key_file,
)

__all__ = ["main"]

_PROG = "objdl keys"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]{0,127}")


class _Failed(Exception):
    """A command failed; the message is the one line to print."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=_PROG, description="Make CURVE keys and manage a broker's allowed keys.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    new = sub.add_parser("new", help="create a key pair: NAME.key (public), NAME.key_secret")
    new.add_argument("name", metavar="NAME", help="key name, usually the cell or broker name")
    new.add_argument("--dir", default=".", help="where to write the files (default: .)")
    new.add_argument("--force", action="store_true", help="overwrite an existing pair")

    allow = sub.add_parser("allow", help="let a public key connect, bound to names")
    allow.add_argument("name", metavar="NAME", help="name of the entry (the file NAME.key)")
    allow.add_argument("--dir", required=True, help="the broker's allowed-keys directory")
    allow.add_argument(
        "--pub", required=True, metavar="FILE", help="the public key: NAME.key, or Z85 text"
    )
    allow.add_argument(
        "--names",
        metavar="PATTERNS",
        help="comma-separated names the key may register: NAME, NAME.* (every name "
        "under NAME) or * (default: 'NAME,NAME.*')",
    )
    allow.add_argument("--force", action="store_true", help="replace an entry with another key")

    revoke = sub.add_parser("revoke", help="remove an entry from an allowed-keys directory")
    revoke.add_argument("name", metavar="NAME")
    revoke.add_argument("--dir", required=True, help="the broker's allowed-keys directory")

    lst = sub.add_parser("list", help="show the keys in a directory and their names")
    lst.add_argument("--dir", required=True, help="a key directory")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``objdl keys`` with `argv` (default: ``sys.argv[1:]``); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "new":
            _new(args.name, Path(args.dir), args.force)
        elif args.command == "allow":
            _allow(args.name, Path(args.dir), args.pub, args.names, args.force)
        elif args.command == "revoke":
            _revoke(args.name, Path(args.dir))
        else:
            _list(Path(args.dir))
    except (_Failed, KeyFileError, OSError) as exc:
        text = " ".join(str(exc).split())
        print(f"{_PROG}: {text}", file=sys.stderr, flush=True)
        return 1
    return 0


def _check_label(name: str) -> str:
    if not _LABEL.fullmatch(name) or name.endswith((".key", ".key_secret")):
        raise _Failed(
            f"bad key name {name!r}: use letters, digits, '_', '-', '~' and '.', "
            "starting with a letter or digit"
        )
    return name


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _new(name: str, directory: Path, force: bool) -> None:
    _check_label(name)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not force and (os.path.lexists(public) or os.path.lexists(secret)):  # a link counts
        raise _Failed(f"{public} or {secret} exists already; use --force to replace the pair")
    directory.mkdir(parents=True, exist_ok=True)
    # pyzmq opens the files by name, following links: it writes into a private folder
    # of our own, and the files are renamed into place, replacing any name (a planted
    # symlink included) rather than writing through it.
    with _private_umask():  # the secret file is born private, never readable by others
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
        try:
            create_certificates(staging, name)
            (staging / public.name).chmod(0o644)
            (staging / secret.name).chmod(0o600)
            os.replace(staging / secret.name, secret)
            os.replace(staging / public.name, public)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    key = load_public_key(public)
    print(f"wrote {public} (public: give it to the broker's allowed keys and to peers)")
    print(f"wrote {secret} (secret: keep it on this host, readable by this user only)")
    print(f"public key: {key.decode()}")


def _parse_names(name: str, names: str | None) -> list[str]:
    if names is None:
        patterns = default_patterns(name)
        if not patterns:
            raise _Failed(f"{name!r} is not a cell name: say which names it may use with --names")
        return patterns
    patterns = [p.strip() for p in names.split(",") if p.strip()]
    if not patterns:
        raise _Failed("--names is empty: give at least one name or pattern")
    try:
        return list(dict.fromkeys(check_pattern(p) for p in patterns))
    except ValueError as exc:
        raise _Failed(str(exc)) from None


def _allow(name: str, directory: Path, pub: str, names: str | None, force: bool) -> None:
    _check_label(name)
    key = load_public_key(pub)
    patterns = _parse_names(name, names)
    target = directory / f"{name}.key"
    if target.exists() and not force:
        old = load_public_key(target)
        if old != key:
            raise _Failed(
                f"{target} already allows another key ({short_key(old)}); use --force to replace it"
            )
    directory.mkdir(parents=True, exist_ok=True)
    allowed = read_allowed(directory)
    write_public_key_file(target, key)
    allowed[name] = patterns
    write_allowed(directory, allowed)
    print(f"allowed {name} (key {short_key(key)}) to use: {', '.join(patterns)}")


def _revoke(name: str, directory: Path) -> None:
    _check_label(name)
    target = directory / f"{name}.key"
    allowed = read_allowed(directory)
    if not target.exists() and name not in allowed:
        raise _Failed(f"{name!r} is not in {directory}")
    if target.exists():
        target.unlink()
    if allowed.pop(name, None) is not None:
        write_allowed(directory, allowed)
    print(f"revoked {name}; a running broker applies it on SIGHUP or restart")


def _list(directory: Path) -> None:
    if not directory.is_dir():
        raise _Failed(f"no such directory: {directory}")
    allowed = read_allowed(directory)
    rows: list[tuple[str, str, str]] = []
    for cert in sorted(directory.glob("*.key")):
        label = cert.name[: -len(".key")]
        key = load_public_key(cert)
        patterns = allowed.get(label)
        shown = ", ".join(patterns) if patterns is not None else ", ".join(default_patterns(label))
        rows.append((label, key.decode(), shown + ("" if patterns is not None else " (default)")))
    for label in sorted(set(allowed) - {r[0] for r in rows}):
        rows.append((label, "(no key file)", ", ".join(allowed[label])))
    if not rows:
        print(f"no keys in {directory}")
    width = max((len(r[0]) for r in rows), default=0)
    for label, key_text, shown in rows:
        print(f"{label:<{width}}  {key_text}  {shown or '(no names)'}")
    secrets = sorted(p.name for p in directory.glob("*.key_secret"))
    if secrets:
        print(f"note: secret keys here: {', '.join(secrets)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
