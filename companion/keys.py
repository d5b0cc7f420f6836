"""ZeroMQ CURVE keys for a backend reachable beyond this machine.

Layout under ``<data_dir>/keys/``::

    server.key, server.key_secret     the backend's key pair (``companion keys create --server``)
    client.key, client.key_secret     this companion's key pair (``companion keys create``)
    allowed/<user>.key                client public keys the backend accepts; the file name
                                      (without .key) is the user id that client may act as

Invariants
- A backend bound to anything but loopback (``ipc://``, ``tcp://127.*``, ``localhost``,
  ``[::1]``) refuses to start without its secret key and at least one allowed client key.
- With CURVE on, the server maps each connection to the user named by its key file and
  refuses messages that claim another client id (per-user isolation over the network).
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth

from companion.errors import UserError


class KeyError_(UserError):
    """A missing or unreadable key file; the message says what to run."""


def keys_dir(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / "keys"


def is_loopback(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (ipc, inproc, tcp on a loopback address)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a public host name


def create_keypair(folder: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` and ``<name>.key_secret`` into folder; refuses to overwrite unless force."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pub, sec = folder / f"{name}.key", folder / f"{name}.key_secret"
    if (pub.exists() or sec.exists()) and not force:
        raise KeyError_(f"{pub} already exists; pass --force to replace it.")
    pub_f, sec_f = zmq.auth.create_certificates(str(folder), name)
    Path(sec_f).chmod(0o600)
    return Path(pub_f), Path(sec_f)


def load_keypair(secret_file: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        pub, sec = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read the key pair {secret_file}: {exc}.") from None
    if not sec:
        raise KeyError_(f"{secret_file} holds no secret key.")
    return pub, sec


def load_public(public_file: Path) -> bytes:
    try:
        pub, _ = zmq.auth.load_certificate(str(public_file))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read the public key {public_file}: {exc}.") from None
    return pub


def allow_client(folder: Path, public_file: Path, user: str) -> Path:
    """Copy a client's public key into ``allowed/<user>.key``."""
    load_public(public_file)  # validate before copying
    dest = Path(folder) / "allowed" / f"{user}.key"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(public_file, dest)
    return dest


def allowed_clients(folder: Path) -> dict[bytes, str]:
    """client public key -> user id, from ``allowed/*.key``."""
    out = {}
    for f in sorted((Path(folder) / "allowed").glob("*.key")):
        out[load_public(f)] = f.stem
    return out


def apply_client_curve(sock: zmq.Socket, server_public: bytes, client_secret_file: Path) -> None:
    pub, sec = load_keypair(client_secret_file)
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.curve_serverkey = server_public
