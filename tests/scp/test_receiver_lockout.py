"""Idle and trickling connections cannot lock modalities out (plain and TLS).

Fifty hostile sockets hold connections open, idle or sending the A-ASSOCIATE-RQ one byte at
a time; a modality from another address must still store within a few seconds, with the
default timeouts (30 s ARTIM) and limits.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests import factory
from tests.bad_peer import associate_rq
from tests.peers import wait_for
from tests.receiver_fixtures import Node, echoscu, storescu

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class Hostile:
    """``count`` connections, half idle, half trickling one byte every 0.3 s."""

    def __init__(self, port: int, count: int, sources: list[str]) -> None:
        self.sockets: list[socket.socket] = []
        for index in range(count):
            sock = socket.socket()
            sock.bind((sources[index % len(sources)], 0))
            sock.connect(("127.0.0.1", port))
            self.sockets.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        request = associate_rq()
        for index in range(len(request)):
            for sock in self.sockets[::2]:
                with contextlib.suppress(OSError):
                    sock.send(request[index : index + 1])
            if self._stop.wait(0.3):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets:
            sock.close()


@contextlib.contextmanager
def hostile(port: int, sources: list[str], count: int = 50) -> Iterator[Hostile]:
    attack = Hostile(port, count, sources)
    try:
        yield attack
    finally:
        attack.close()


def one_slice(tmp_path: Path) -> Path:
    ds = factory.ct_slice(generate_uid(), generate_uid(), 0)
    return factory.write(ds, tmp_path / "slice.dcm")


@pytest.mark.parametrize(
    "sources",
    [["127.0.0.2"], [f"127.0.1.{n}" for n in range(1, 51)]],
    ids=["one address", "fifty addresses"],
)
def test_fifty_hostile_sockets_do_not_lock_out_a_modality(
    node: Node, tmp_path: Path, sources: list[str]
) -> None:
    path = one_slice(tmp_path)
    with hostile(node.port, sources):
        # Every hostile connection was accepted (or already closed to make room).
        wait_for(lambda: node.receiver.pending_connections > 0, what="pending connections")
        start = time.monotonic()
        sent = storescu(node.port, [path])
        seconds = time.monotonic() - start
        assert sent.returncode == 0, sent.stderr
        assert seconds < 5, f"storescu took {seconds:.1f} s"
        scp = node.settings.scp
        assert node.receiver.pending_connections <= scp.max_pending_connections
    assert len(node.instances()) == 1


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        capture_output=True,
    )
    assert made.returncode == 0, made.stderr
    return key, cert


def test_fifty_idle_tls_sockets_do_not_lock_out_a_modality(
    node_factory: object, tmp_path: Path
) -> None:
    key, cert = _certificate(tmp_path)
    node = node_factory(scp={"tls_enabled": True, "tls_cert": str(cert), "tls_key": str(key)})
    path = one_slice(tmp_path)
    tls = ("+tls", str(key), str(cert), "+cf", str(cert))
    with hostile(node.port, [f"127.0.2.{n}" for n in range(1, 51)]):
        wait_for(lambda: node.receiver.pending_connections > 0, what="pending connections")
        start = time.monotonic()
        sent = storescu(node.port, [path], *tls)
        seconds = time.monotonic() - start
        assert sent.returncode == 0, sent.stderr
        assert seconds < 5, f"storescu took {seconds:.1f} s"
    assert len(node.instances()) == 1


def test_tls_handshake_has_a_deadline(node_factory: object, tmp_path: Path) -> None:
    key, cert = _certificate(tmp_path)
    node = node_factory(
        scp={
            "tls_enabled": True,
            "tls_cert": str(cert),
            "tls_key": str(key),
            "tls_handshake_timeout_s": 1.0,
        }
    )
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.settimeout(3)
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        start = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while sock.recv(4096):
                pass
        assert time.monotonic() - start < 2.5
    wait_for(lambda: node.receiver.pending_connections == 0, what="pending closed")


def test_pending_connections_do_not_count_as_associations(node_factory: object) -> None:
    node = node_factory(scp={"max_associations": 1})
    with hostile(node.port, ["127.0.0.3"], count=4):
        wait_for(lambda: node.receiver.pending_connections == 4, what="pending connections")
        assert node.receiver.active_associations == 0
        assert echoscu(node.port).returncode == 0
