"""The farm's shared secret and its workers' lifetime, added to TVM's own tracker and RPC server.

Why: TVM's RPC assumes a trusted network. Whoever reaches its tracker can lease a device by key
and run a shared library on it, and a device server killed with SIGKILL leaves its popen worker
serving (and listed by the tracker). This module closes both gaps without forking TVM:

- **Tracker** (``start_tracker`` runs in TVM's popen worker): with a secret, each connection
  must answer a challenge (``HMAC(secret, nonce)``) before it may list or lease devices, and a
  device may register only with match keys that carry ``HMAC(secret, key:nonce)``.
- **Device server** (``server_worker_init``, TVM's ``server_init_callback``): match keys are
  128 random bits signed as above, and every client handshake is read (``MSG_PEEK``) before
  TVM's accept loop sees it; one without ``-edgekit-auth=HMAC(secret, match key)`` is refused
  with TVM's key-mismatch code, so even a leaked match key runs nothing.
- **Lifetime**: the popen workers, and each session process they fork, get
  ``PR_SET_PDEATHSIG`` = SIGKILL, so they die with the process that started them.

The secret authenticates; it does not encrypt: models, match keys and tokens cross the network
in the clear, so the network must still be trusted against eavesdroppers (or tunnelled).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import os
import secrets
import signal
import socket
import struct
import time
from typing import Any

SECRET_ENV = "EDGEKIT_FARM_SECRET"
AUTH_HELLO, AUTH = 100, 101  # edgekit's tracker codes, beside TVM's TrackerCode (-1..7)
TOKEN_OPT = "-edgekit-auth="
NEEDS_SECRET = "edgekit: this tracker needs the farm secret"
_PR_SET_PDEATHSIG = 1
_MAX_KEY = 4096


def resolve_secret(secret: str | None) -> str | None:
    """The secret given, else ``$EDGEKIT_FARM_SECRET``, else None (no secret)."""
    return secret or os.environ.get(SECRET_ENV) or None


def mac(secret: str, purpose: str, message: str) -> str:
    """HMAC-SHA256 of ``purpose:message``: one secret, separate purposes, no cross-replay."""
    return hmac.new(secret.encode(), f"{purpose}:{message}".encode(), hashlib.sha256).hexdigest()


def client_key(matchkey: str, secret: str | None) -> str:
    """The key a client sends the device server: the match key plus its token."""
    return f"{matchkey} {TOKEN_OPT}{mac(secret, 'rpc', matchkey)}" if secret else matchkey


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup still applies
        return
    if os.getppid() != parent_pid:  # died before prctl took effect
        os._exit(1)


# ---- the device server's side (runs inside TVM's popen worker) -------------------------------

def _signed_key(secret: str, prefix: str, delimiter: str = ":", cmap: Any = None) -> str:
    """Replacement for ``tvm.rpc.base.random_key``: 128 random bits, signed for the tracker."""
    while True:
        nonce = secrets.token_hex(16)
        key = f"{prefix}{delimiter}{nonce}.{mac(secret, 'put', f'{prefix}:{nonce}')}"
        if not cmap or key not in cmap:
            return key


def signed_key_ok(secret: str, rpc_key: str, matchkey: str) -> bool:
    """Whether a match key a device registers was made by a holder of the secret."""
    prefix, _, rand = str(matchkey).rpartition(":")
    nonce, _, tag = rand.partition(".")
    return prefix == rpc_key and hmac.compare_digest(tag, mac(secret, "put", f"{prefix}:{nonce}"))


def _handshake_ok(conn: socket.socket, secret: str, timeout: float = 5.0) -> bool:
    """Peek at a client's RPC handshake ([magic, len, key]) and check its token; the bytes
    stay in the socket for TVM's own handshake."""
    conn.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            data = conn.recv(8 + _MAX_KEY, socket.MSG_PEEK)
            if len(data) >= 8:
                _, keylen = struct.unpack("<ii", data[:8])
                if not 0 < keylen <= _MAX_KEY:
                    return False
                if len(data) >= 8 + keylen:
                    break
            if not data or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    except OSError:
        return False
    finally:
        conn.settimeout(None)  # TVM's C++ loop needs the blocking socket back
    words = data[8:8 + keylen].decode("utf-8", "replace").split()
    if not words or not words[0].startswith("client:"):
        return False
    tokens = [w[len(TOKEN_OPT):] for w in words[1:] if w.startswith(TOKEN_OPT)]
    expected = mac(secret, "rpc", words[0][len("client:"):])
    return len(tokens) == 1 and hmac.compare_digest(tokens[0], expected)


class _CheckedListener:
    """TVM's listening socket, with ``accept`` refusing clients without a valid token.

    A refused client gets TVM's key-mismatch reply; TVM's loop is handed a decoy whose bad magic
    it skips, so the device stays registered and keeps listening."""

    def __init__(self, sock: socket.socket, secret: str) -> None:
        self._sock, self._secret = sock, secret

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        from tvm.rpc import base

        conn, addr = self._sock.accept()
        if _handshake_ok(conn, self._secret):
            return conn, addr
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
        conn.close()
        decoy, feed = socket.socketpair()
        feed.sendall(b"\0\0\0\0")
        feed.close()
        return decoy, addr


def server_worker_init(parent_pid: int, secret: str | None) -> None:
    """TVM's ``server_init_callback``: die with ``parent_pid``; with a secret, sign match keys
    and check every client's token."""
    from tvm.rpc import base, server

    die_with_parent(parent_pid)
    worker_pid = os.getpid()
    serve_loop = server._serve_loop

    def _serve_loop(*args: Any) -> Any:  # runs in the session process TVM forks per client
        die_with_parent(worker_pid)
        return serve_loop(*args)

    server._serve_loop = _serve_loop
    if secret:
        base.random_key = functools.partial(_signed_key, secret)
        listen_loop = server._listen_loop

        def _listen_loop(sock: socket.socket, *args: Any) -> Any:
            return listen_loop(_CheckedListener(sock, secret), *args)

        server._listen_loop = _listen_loop


# ---- the tracker's side (runs inside TVM's popen worker) -------------------------------------

def _secret_handler(base_handler: type, secret: str) -> type:
    """A subclass of TVM's tracker connection handler that enforces the secret."""
    from tvm.rpc.base import TrackerCode as Code

    open_codes = {Code.PING, Code.UPDATE_INFO, Code.GET_PENDING_MATCHKEYS}

    class SecretHandler(base_handler):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self._nonce: str | None = None
            self._authed = False
            self._registered = False

        def call_handler(self, args: list[Any]) -> None:
            code = args[0] if args else None
            if code == AUTH_HELLO:
                self._nonce = secrets.token_hex(16)
                self.ret_value([Code.SUCCESS, self._nonce])
            elif code == AUTH:
                nonce, self._nonce = self._nonce, None
                self._authed = bool(nonce) and len(args) > 1 and hmac.compare_digest(
                    str(args[1]), mac(secret, "tracker", nonce))
                self.ret_value(Code.SUCCESS if self._authed else Code.FAIL)
            elif code == Code.PUT:
                if not signed_key_ok(secret, str(args[1]), str(args[2][1])):
                    self.ret_value(Code.FAIL)
                    return
                self._registered = True
                super().call_handler(args)
            elif code in open_codes or self._authed:
                super().call_handler(args)
            else:
                self.ret_value([Code.FAIL, NEEDS_SECRET])

        def summary(self) -> dict[str, Any]:
            return self._info if self._registered else {}  # unregistered: not listed

    return SecretHandler


def start_tracker(parent_pid: int, secret: str | None, host: str, port: int,
                  port_end: int) -> tuple[int, str]:
    """Run in a TVM popen worker: die with ``parent_pid``, enforce ``secret``, start TVM's
    tracker; returns (port, stop key)."""
    from tvm.rpc import tracker

    die_with_parent(parent_pid)
    if secret:
        tracker.TCPEventHandler = _secret_handler(tracker.TCPEventHandler, secret)
    return tracker._popen_start_tracker_server(host, port, port_end, silent=True)


# ---- the client's side -----------------------------------------------------------------------

def authenticate(sock: socket.socket, secret: str) -> str | None:
    """Answer the tracker's challenge on ``sock``; returns None or why it failed."""
    from tvm.rpc import base

    try:
        base.sendjson(sock, [AUTH_HELLO])
        reply = base.recvjson(sock)
    except OSError:
        return "the tracker does not take a farm secret (it was started without one)"
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == 0):
        return "the tracker does not take a farm secret (it was started without one)"
    base.sendjson(sock, [AUTH, mac(secret, "tracker", str(reply[1]))])
    if base.recvjson(sock) != 0:
        return "the tracker refused the farm secret (it was started with another one)"
    return None
