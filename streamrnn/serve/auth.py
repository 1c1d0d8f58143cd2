"""Who may send: CURVE encryption with an allow-list of producers' public keys.

The daemon holds the server's secret key (keys.py reads the files); its folder
ingest.curve_allowed_keys holds the public keys of the producers it accepts (re-read every
30 s, so adding a producer needs no restart). Misconfigured keys stop the daemon at
start: it never falls back to accepting anyone.
"""
from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator

from ..keys import KeyError_, expand, load


def start(context: zmq.Context, secret_key_path: str,
          allowed_dir: str) -> ThreadAuthenticator | None:
    """The context's gatekeeper: every CURVE server socket of `context` (curve_server)
    then lets in only the allowed keys. None when CURVE is off (no secret key). Started
    before any such socket binds: one bound without it would let in any key."""
    if not secret_key_path:
        return None
    load(secret_key_path, secret=True)  # a bad key file stops the start here
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
    return authenticator


def curve_server(socket: zmq.Socket, secret_key_path: str) -> None:
    """Make `socket` (not bound yet) a CURVE server with the daemon's key; who may
    connect is the context's authenticator's to say (see `start`)."""
    public, secret = load(secret_key_path, secret=True)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_server = True


def reload(authenticator: ThreadAuthenticator, allowed_dir: str) -> None:
    authenticator.configure_curve(domain="*", location=str(expand(allowed_dir)))
