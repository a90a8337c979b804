"""Real Triton servers for the tests, from the ``nvidia-pytriton`` wheel (tritonserver 2.51).

Two ways, both on loopback ports:

- :func:`pytriton_server`: ``tests/triton_server.py`` (pytriton) hosting the demo model's
  ``image.onnx`` in ONNX Runtime on CPU, plus the ``order_probe`` model.
- :func:`exported_tritonserver`: the ``tritonserver`` binary itself loading what
  ``triagenode optimize export-triton`` wrote, its ``platform: "onnxruntime_onnx"`` switched
  to the Python backend (``tests/triton_onnx_model.py``) since the wheel has no ONNX Runtime
  backend; optionally with (mutual) TLS.

pytriton pins ``numpy<2`` and the node runs on numpy 2, so the server runs from the Python
named by ``TRIAGENODE_TEST_PYTRITON_PYTHON`` (``scripts/test`` makes one: a virtual
environment with ``--system-site-packages`` and ``pip install nvidia-pytriton 'numpy<2'``),
or from this Python when it has pytriton with numpy<2; :func:`pytriton_python` is None
otherwise and the tests skip, saying so.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import ipaddress
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.onnx_fixtures import _demo_export_dir
from tests.peers import free_port, wait_for

PYTRITON_ENV = "TRIAGENODE_TEST_PYTRITON_PYTHON"
MODEL = "triagenode_image"
SERVER_MAX_BATCH = 8


def pytriton_python() -> str | None:
    """A Python that can run pytriton, or None."""
    named = os.environ.get(PYTRITON_ENV)
    if named:
        return named
    if importlib.util.find_spec("pytriton") is not None and np.__version__.startswith("1."):
        return sys.executable
    return None


def skip_reason() -> str:
    return (
        "no Triton server: nvidia-pytriton needs numpy<2 and this Python has numpy "
        f"{np.__version__}; set {PYTRITON_ENV} to a Python with nvidia-pytriton "
        "(see tests/triton_support.py)"
    )


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class TritonServer:
    url: str
    metrics_port: int
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    log: Path

    def expect(self, marker: str, timeout: float = 300.0) -> None:
        """Wait for a protocol line of tests/triton_server.py (stdout, read by a thread)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {marker} from the server: {self._tail()}") from None
            if line.strip() == marker:
                return
            if line == "":
                raise AssertionError(f"the Triton server exited before {marker}: {self._tail()}")

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def pending(self, model: str) -> float:
        """Requests queued in the server's scheduler (Prometheus metric)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("nv_inference_pending_request_count") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _start_pytriton(python: str, log_path: Path) -> TritonServer:
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    with log_path.open("w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [
                python,
                str(Path(__file__).with_name("triton_server.py")),
                *("--onnx", str(_demo_export_dir() / "image.onnx"), "--name", MODEL),
                *("--grpc-port", str(grpc_port), "--http-port", str(http_port)),
                *("--metrics-port", str(metrics_port), "--max-batch", str(SERVER_MAX_BATCH)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return TritonServer(f"127.0.0.1:{grpc_port}", metrics_port, process, lines, log_path)


@contextlib.contextmanager
def pytriton_server(python: str, folder: Path) -> Iterator[TritonServer]:
    """``tests/triton_server.py`` started with ``python``; stopped by closing its stdin.

    A second try with other ports when the first does not come up: a free port picked here
    can be taken by another process before the server binds it.
    """
    for attempt in (1, 2):
        server = _start_pytriton(python, folder / f"server-{attempt}.log")
        try:
            server.expect("READY", timeout=180)
            break
        except AssertionError:
            server.process.kill()
            server.process.wait()
            if attempt == 2:
                raise
    try:
        yield server
    finally:
        assert server.process.stdin is not None
        server.process.stdin.close()
        _stop(server.process)


_DIST = """
import pathlib, sys, sysconfig, pytriton
root = pathlib.Path(pytriton.__file__).parent
print(root / "tritonserver")
print(root.parent / "nvidia_pytriton.libs")
print(f"{sys.version_info[0]}.{sys.version_info[1]}")
print(pathlib.Path(sys.executable).parent)
print(sysconfig.get_config_var("LIBDIR"))
"""


def _export_repository(repo: Path) -> None:
    from triagenode.cli import main

    args = ["optimize", "export-triton", str(repo), "--artifacts", str(_demo_export_dir())]
    assert main([*args, "--max-batch", str(SERVER_MAX_BATCH), "--preferred-batch", "4"]) == 0
    config = repo / MODEL / "config.pbtxt"
    text = config.read_text()
    assert 'platform: "onnxruntime_onnx"' in text
    config.write_text(text.replace('platform: "onnxruntime_onnx"', 'backend: "python"'))
    shutil.copy(Path(__file__).with_name("triton_onnx_model.py"), repo / MODEL / "1" / "model.py")


@contextlib.contextmanager
def exported_tritonserver(python: str, folder: Path, pki: Path | None = None) -> Iterator[str]:
    """``tritonserver`` serving export-triton's repository; yields its gRPC address.

    With ``pki`` (see :func:`make_pki`), gRPC is mutual TLS: server.crt signed by ca.crt,
    clients must present a certificate of the same CA.
    """
    import tritonclient.grpc as grpcclient

    found = subprocess.run([python, "-c", _DIST], capture_output=True, text=True, check=True)
    dist, libs, version, bindir, libdir = found.stdout.split("\n")[:5]
    server = folder / "tritonserver"
    shutil.copytree(dist, server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = Path(dist) / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy(stub, server / "backends" / "python")
    repo = folder / "models"
    _export_repository(repo)
    grpc_port = free_port()
    env = dict(os.environ)
    # The Python backend's stub embeds libpython: it must load this interpreter's library
    # and find the server Python's packages (numpy<2) first on PATH.
    env["PATH"] = f"{bindir}:{env.get('PATH', '')}"
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, libs, env.get("LD_LIBRARY_PATH")) if p)
    tls_args: list[str] = []
    client_tls: dict[str, object] = {}
    if pki is not None:
        tls_args = [
            "--grpc-use-ssl=true",
            "--grpc-use-ssl-mutual=true",
            f"--grpc-server-cert={pki / 'server.crt'}",
            f"--grpc-server-key={pki / 'server.key'}",
            f"--grpc-root-cert={pki / 'ca.crt'}",
        ]
        client_tls = {
            "ssl": True,
            "root_certificates": str(pki / "ca.crt"),
            "private_key": str(pki / "client.key"),
            "certificate_chain": str(pki / "client.crt"),
        }
    log_path = folder / "tritonserver.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={server / 'backends'}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc_port}",
            "--allow-http=false",
            "--allow-metrics=false",
            "--exit-timeout-secs=5",
            *tls_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"127.0.0.1:{grpc_port}"
    try:
        client = grpcclient.InferenceServerClient(url, **client_tls)  # type: ignore[arg-type]

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text(errors="replace")[-2000:]
            try:
                return bool(client.is_model_ready(MODEL))
            except grpcclient.InferenceServerException:
                return False

        wait_for(ready, timeout=300, what="tritonserver to load the exported model")
        client.close()
        yield url
    finally:
        process.terminate()
        _stop(process)
        log.close()


def make_pki(folder: Path) -> Path:
    """ca, server (127.0.0.1/localhost), client, and other-ca + stranger, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def issue(stem: str, common: str, issuer: tuple | None, server: bool = False) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer[0].subject if issuer else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if server:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
        (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert, key

    ca = issue("ca", "triagenode test CA", None)
    issue("server", "localhost", ca, server=True)
    issue("client", "triagenode node", ca)
    other = issue("other-ca", "someone else's CA", None)
    issue("stranger", "stranger", other)
    return folder
