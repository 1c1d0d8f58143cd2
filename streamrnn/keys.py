"""CURVE key files: NAME.key (public, safe to copy) and NAME.key_secret (secret, stays with
its owner), as `streamrnn keys generate` writes them. Producers (client.py) and the
daemon (serve/auth.py) read them here; no sockets are made here but the ones passed in.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth


class KeyError_(ValueError):
    """A key file or folder that cannot be used; the message says which and why."""


def expand(path: str) -> Path:
    """Paths may name $CREDENTIALS_DIRECTORY (systemd's LoadCredential=) and ~."""
    return Path(os.path.expanduser(os.path.expandvars(path)))


def load(path: str, secret: bool) -> tuple[bytes, bytes | None]:
    file = expand(path)
    if "$" in str(file):
        raise KeyError_(f"{path}: an environment variable in it is not set")
    try:
        public, secret_key = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as e:
        raise KeyError_(f"cannot read key file {file}: {e}") from None
    if secret and not secret_key:
        raise KeyError_(f"{file} holds no secret key (that is a NAME.key_secret file's job)")
    return public, secret_key


def secure_client(socket: zmq.Socket, server_key_path: str, client_key_path: str) -> None:
    """CURVE for a producer: the daemon's public key, and the producer's own key pair."""
    server_public, _ = load(server_key_path, secret=False)
    public, secret = load(client_key_path, secret=True)
    socket.curve_serverkey = server_public
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def generate(directory: str, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write DIR/NAME.key and DIR/NAME.key_secret. An existing pair is in use somewhere
    (its public half handed out), so it is replaced only when `force` says so."""
    folder = Path(directory)
    if not force:
        for existing in (folder / f"{name}.key", folder / f"{name}.key_secret"):
            if existing.exists():
                raise KeyError_(f"{existing} already exists: not overwriting a key that may "
                                "be in use (pass --force to replace the pair)")
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)

