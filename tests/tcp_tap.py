"""A TCP listener on a free port that counts connections: a black hole, or a relay to a peer.

As a black hole (``forward_to=None``) it accepts every connection and never answers, the way
a PACS hangs when its disk or database stalls. As a relay it passes bytes both ways to a real
peer, so a test can count the associations the node opens to it (one per connection) and
cut the peer off (:meth:`TcpTap.refuse`) without stopping it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["TcpTap"]


class TcpTap:
    """Listens on 127.0.0.1; ``port`` is where to connect, ``accepted`` how many did."""

    def __init__(self, forward_to: tuple[str, int] | None = None) -> None:
        self.forward_to = forward_to
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._refusing = False
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="tcp-tap", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._refusing:
                    conn.close()
                    continue
                self.accepted += 1
                self._open.append(conn)
            if self.forward_to is not None:
                self._relay(conn)

    def _relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.forward_to, timeout=5)  # type: ignore[arg-type]
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.append(upstream)
        for source, sink in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def refuse(self) -> None:
        """From now on, close every new connection at once and drop the open ones."""
        with self._lock:
            self._refusing = True
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self._drop()
        self._thread.join(5)

    def __enter__(self) -> TcpTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
