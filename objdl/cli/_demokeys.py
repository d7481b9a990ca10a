"""Throw-away CURVE keys for ``objdl demo --secure``, in a private temporary folder.

The same files ``objdl keys new``/``allow`` make: a key pair for the broker and for
every cell (``NAME.key``/``NAME.key_secret``, secrets mode 0600 in a 0700 folder),
and the broker's allow-list with each key bound to its cell's name only. Removed by
:meth:`DemoKeys.remove` whatever happened (the demo calls it in a ``finally``).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from objdl.cli._keys import KeyOptions

__all__ = ["DemoKeys"]

BROKER = "broker"


class DemoKeys:
    """Key pairs for the broker and `names`, and an allow-list binding each to its name."""

    def __init__(self, names: list[str]) -> None:
        from zmq.auth.certs import create_certificates

        from objdl.security import load_public_key, write_allowed, write_public_key_file

        self.root = Path(tempfile.mkdtemp(prefix="objdl-demo-keys-"))  # mode 0700
        try:
            self.keys = self.root / "keys"
            self.allowed = self.root / "allowed"
            self.keys.mkdir(mode=0o700)
            self.allowed.mkdir(mode=0o700)
            for name in [BROKER, *names]:
                create_certificates(self.keys, name)
                # In a 0700 folder nobody else could read it meanwhile; the process's
                # umask is left alone (other threads may be creating files).
                (self.keys / f"{name}.key_secret").chmod(0o600)
            for name in names:
                key = load_public_key(self.keys / f"{name}.key")
                write_public_key_file(self.allowed / f"{name}.key", key)
            write_allowed(self.allowed, {name: [name] for name in names})
        except BaseException:
            self.remove()
            raise

    def broker_args(self) -> list[str]:
        """The broker's ``--curve-keys``/``--allowed-keys``."""
        secret = str(self.keys / f"{BROKER}.key_secret")
        return ["--curve-keys", secret, "--allowed-keys", str(self.allowed)]

    def options(self, name: str) -> KeyOptions:
        """`name`'s key pair, the broker's public key, and its peers' public keys."""
        return KeyOptions(
            key=str(self.keys / f"{name}.key_secret"),
            broker_key=str(self.keys / f"{BROKER}.key"),
            peer_keys=str(self.allowed),
        )

    def cell_kwargs(self, name: str) -> dict[str, Any]:
        return self.options(name).cell_kwargs()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
