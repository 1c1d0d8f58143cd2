"""Who may send: CURVE encryption with an allow-list of producers' public keys.

Keys are ZeroMQ certificate files as `streamrnn keys generate` writes them: NAME.key
(public, safe to copy) and NAME.key_secret (secret, stays with its owner). The daemon
holds the server's secret; its folder ingest.curve_allowed_keys holds the public keys of
the producers it accepts (re-read every 30 s, so adding a producer needs no restart).
Misconfigured keys stop the daemon at start: it never falls back to accepting anyone.
"""
from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


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


def secure_server(socket: zmq.Socket, secret_key_path: str, allowed_dir: str,
                  context: zmq.Context) -> ThreadAuthenticator:
    """Make `socket` (not bound yet) a CURVE server that lets in only allowed keys."""
    public, secret = load(secret_key_path, secret=True)
    folder = expand(allowed_dir)
    if not allowed_dir or not folder.is_dir():
        what = "does not exist" if allowed_dir and not folder.exists() else "is not a folder"
        raise KeyError_(f"ingest.curve_allowed_keys = {allowed_dir!r} {what}: with CURVE "
                        "on, producers are let in only by their public key files there")
    if not list(folder.glob("*.key")):
        raise KeyError_(f"no producer public keys (*.key) in {folder}: nobody could send")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(folder))
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True
    return authenticator


def reload(authenticator: ThreadAuthenticator, allowed_dir: str) -> None:
    authenticator.configure_curve(domain="*", location=str(expand(allowed_dir)))


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
