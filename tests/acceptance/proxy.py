"""A TCP proxy the test controls: a network partition between one process and a real server.

Each connection through the proxy is relayed by two threads. :meth:`TcpProxy.partition`
stops relaying in both directions and stops accepting: bytes stay in the kernel's
buffers and nothing answers, as when packets are dropped, so the process behind it
sees silence, not a closed connection. :meth:`TcpProxy.heal` relays again, and what
was held flows on, as after a partition that TCP rode out.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class TcpProxy:
    """Listens on a free loopback port and relays every connection to ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._held = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

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
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            if self._held.is_set():  # connection attempts wait in the backlog, unanswered
                self._closed.wait(0.05)
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
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
        except OSError:
            with contextlib.suppress(OSError):
                dst.close()
