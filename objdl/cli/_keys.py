"""The key options of the cell-side commands, and settings taken from the environment.

``--key FILE`` (this cell's ``NAME.key_secret``), ``--broker-key FILE`` (the broker's
public key: connect with CURVE) and ``--peer-keys DIR`` (peers' public keys, for
``--secure``) become the ``curve_keys``/``broker_public_key``/``peer_keys`` of
:class:`objdl.cell.Cell`. Every file is checked here, before any connection, so a
mistake is one line that names the file and what is wrong with it; a key the broker
turns away is translated by :func:`start_cell` into a line that names the options.

Each option falls back to an environment variable (:data:`ENV`); the option wins.
"""

from __future__ import annotations

import argparse
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from objdl.cell import Cell
from objdl.cli._common import EXIT_USAGE, CliError
from objdl.errors import BrokerUnavailableError, CellError, NameTakenError
from objdl.security import (
    AuthenticationError,
    KeyFileError,
    SecureUnavailableError,
    load_keypair,
    load_public_key,
)

__all__ = [
    "ENV",
    "KeyOptions",
    "add_key_args",
    "env_default",
    "env_help",
    "key_options",
    "start_cell",
]

ENV = {
    "broker": "OBJDL_BROKER",
    "name": "OBJDL_NAME",
    "key": "OBJDL_KEY",
    "broker_key": "OBJDL_BROKER_KEY",
    "peer_keys": "OBJDL_PEER_KEYS",
}
"""The environment variable behind each option (by its ``dest``)."""


def env_default(dest: str, fallback: str | None = None) -> str | None:
    """The value of `dest`'s environment variable if set and not empty, else `fallback`."""
    return os.environ.get(ENV[dest]) or fallback


def env_help(dest: str) -> str:
    return f"; default ${ENV[dest]} if set"


def add_key_args(p: argparse.ArgumentParser) -> None:
    """``--key``, ``--broker-key`` and ``--peer-keys``, each defaulting to its variable."""
    p.add_argument(
        "--key",
        default=env_default("key"),
        metavar="FILE",
        help="this cell's key pair, NAME.key_secret from 'objdl keys new' (needed by "
        "--broker-key and --peer-keys; must be readable by you only)" + env_help("key"),
    )
    p.add_argument(
        "--broker-key",
        default=env_default("broker_key"),
        metavar="FILE",
        help="the broker's public key (BROKER.key): connect with CURVE, as --key"
        + env_help("broker_key"),
    )
    p.add_argument(
        "--peer-keys",
        default=env_default("peer_keys"),
        metavar="DIR",
        help="directory of peers' public keys (NAME.key files, or the broker's allowed-keys "
        "directory): needed for --secure" + env_help("peer_keys"),
    )


@dataclass(frozen=True)
class KeyOptions:
    """Checked key options: what to give :class:`Cell`, and how to name them in errors."""

    key: str | None = None
    broker_key: str | None = None
    peer_keys: str | None = None

    def cell_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.key is not None:
            kw["curve_keys"] = self.key
        if self.broker_key is not None:
            kw["broker_public_key"] = self.broker_key
        if self.peer_keys is not None:
            kw["peer_keys"] = self.peer_keys
        return kw


def _check_file(option: str, path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"{option} {path}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        why = exc.strerror or exc
        raise CliError(f"{option} {path}: cannot read it: {why}", EXIT_USAGE) from None
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{option} {path}: not a regular file", EXIT_USAGE)
    if not os.access(path, os.R_OK):
        raise CliError(f"{option} {path}: not readable by this user", EXIT_USAGE)
    return st


def _one(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def key_options(args: argparse.Namespace, secure: bool = False) -> KeyOptions:
    """Check ``args.key``/``broker_key``/``peer_keys`` (and that `secure` has what it needs).

    Raises:
        CliError (exit 2): a file is missing, unreadable, not a key, or readable by
            others (a secret key); an option is given without the one it needs.
    """
    key, broker_key, peer_keys = args.key, args.broker_key, args.peer_keys
    if key is None and (broker_key is not None or peer_keys is not None):
        given = "--broker-key" if broker_key is not None else "--peer-keys"
        raise CliError(
            f"{given} needs --key (this cell's NAME.key_secret, or ${ENV['key']})", EXIT_USAGE
        )
    if secure and (key is None or peer_keys is None):
        raise CliError(
            "--secure needs --key (this cell's key pair) and --peer-keys (its peers' public "
            f"keys), or ${ENV['key']} and ${ENV['peer_keys']}",
            EXIT_USAGE,
        )
    if key is not None:
        st = _check_file("--key", key)
        try:
            load_keypair(key)
        except KeyFileError as exc:
            raise CliError(f"--key {key}: not a usable key pair: {_one(exc)}", EXIT_USAGE) from None
        if st.st_mode & 0o077:
            raise CliError(
                f"--key {key}: a secret key readable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {key}",
                EXIT_USAGE,
            )
    if broker_key is not None:
        _check_file("--broker-key", broker_key)
        try:
            load_public_key(broker_key)
        except KeyFileError as exc:
            raise CliError(
                f"--broker-key {broker_key}: not a public key: {_one(exc)}", EXIT_USAGE
            ) from None
    if peer_keys is not None and not Path(peer_keys).is_dir():
        raise CliError(
            f"--peer-keys {peer_keys}: not a directory (give the folder of NAME.key files)",
            EXIT_USAGE,
        )
    return KeyOptions(key, broker_key, peer_keys)


def start_cell(
    name: str,
    url: str,
    connect_timeout: float,
    keys: KeyOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> Cell:
    """A started cell, or a :class:`CliError` that says why not, in terms of the options.

    `extra` are more ``Cell`` arguments, checked already (the data socket's, from
    :func:`objdl.cli._direct.data_options`; ``direct_links``).
    """
    keys = keys or KeyOptions()
    extra = extra or {}
    try:
        cell = Cell(name, url, start_timeout=connect_timeout, **keys.cell_kwargs(), **extra)
    except SecureUnavailableError as exc:
        raise CliError(_one(exc), EXIT_USAGE, kind="secure_unavailable") from None
    except (KeyFileError, ValueError) as exc:
        raise CliError(f"cannot use the keys given: {_one(exc)}", EXIT_USAGE) from None
    try:
        cell.start()
    except AuthenticationError as exc:
        raise CliError(_refused(name, url, keys, exc), kind="auth") from None
    except BrokerUnavailableError as exc:
        hint = ""
        if keys.broker_key is None:
            hint = " (if that broker uses CURVE, give --key and --broker-key)"
        raise CliError(_one(exc) + hint, kind="broker_unavailable") from None
    except NameTakenError as exc:
        raise CliError(_one(exc), kind="name_taken") from None
    except CellError as exc:
        bind = extra.get("data_bind")
        if bind is not None and cell.data_url is None:  # start() binds before connecting
            why = exc.__cause__ if exc.__cause__ is not None else exc
            raise CliError(
                f"--data-bind {bind}: cannot listen there: {_one(why)} (a port in use, or an "
                "address not of this host?)",
                EXIT_USAGE,
            ) from None
        raise CliError(f"could not connect {name!r} to {url}: {exc}") from None
    return cell


def _refused(name: str, url: str, keys: KeyOptions, exc: AuthenticationError) -> str:
    reason = _one(Exception(exc.reason))
    if keys.key is None or keys.broker_key is None:
        return (
            f"the broker at {url} refused {name!r}: {reason}; it uses CURVE: give --key "
            "(this cell's NAME.key_secret) and --broker-key (the broker's public key)"
        )
    if exc.kind == "name":  # the key was let in, the name is not bound to it
        return (
            f"the broker at {url} refused {name!r} with --key {keys.key}: {reason}; use a "
            "name this key is bound to, or ask the broker's operator to bind it "
            f"(objdl keys allow LABEL --pub KEY --names {name})"
        )
    return (
        f"the broker at {url} refused --key {keys.key}: {reason}; check that --broker-key "
        f"{keys.broker_key} is this broker's public key and that the broker's operator "
        "allowed this key (objdl keys allow)"
    )
