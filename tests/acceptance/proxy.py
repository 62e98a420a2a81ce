"""A TCP proxy the test controls, between processes and a real server: partitions and outages.

Each connection through the proxy is relayed by two threads. :meth:`TcpProxy.partition`
stops relaying in both directions and stops accepting: bytes stay in the kernel's
buffers and nothing answers, as when packets are dropped, so the process behind it
sees silence, not a closed connection. :meth:`TcpProxy.heal` relays again, and what
was held flows on, as after a partition that TCP rode out. :meth:`TcpProxy.cut` is an
outage instead: connections closed, new ones refused, until :meth:`TcpProxy.restore`.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url


def target_of(url: str) -> tuple[str, int]:
    """The host and port a store or broker URL points at."""
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    return parts.hostname or "127.0.0.1", int(parts.port or 0)


def through(url: str, proxy: TcpProxy) -> str:
    """``url`` with its host and port replaced by the proxy's (credentials kept)."""
    if url.startswith("postgresql"):
        moved = make_url(url).set(host="127.0.0.1", port=proxy.port)
        return moved.render_as_string(hide_password=False)
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{proxy.port}" if auth else f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class TcpProxy:
    """Listens on a free loopback port and relays every connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._held = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listen()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.1)
        self.port = int(listener.getsockname()[1])
        self._listener = listener
        threading.Thread(
            target=self._accept, args=(listener,), name="proxy-accept", daemon=True
        ).start()

    def cut(self) -> None:
        """An outage: every relayed connection is closed and new ones are refused, until
        :meth:`restore` (the server behind is untouched)."""
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_relayed()

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._listen()

    def partition(self) -> None:
        """Relay nothing and accept nothing until :meth:`heal`."""
        self._held.set()

    def heal(self) -> None:
        """Relay again."""
        self._held.clear()

    def close(self) -> None:
        """Stop, closing every relayed connection."""
        self._closed.set()
        self._held.clear()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_relayed()

    def _close_relayed(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed.is_set() and listener.fileno() != -1:
            if self._held.is_set():  # connection attempts wait in the backlog, unanswered
                self._closed.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed: cut() or close()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._relay, args=(src, dst), name="proxy-relay", daemon=True
                ).start()

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if self._held.is_set():
                    self._closed.wait(0.05)
                    continue
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
        except (OSError, ValueError):  # ValueError: a socket cut() closed under us
            with contextlib.suppress(OSError):
                dst.close()
