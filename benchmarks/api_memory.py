"""Memory of a real node under hostile ``/api/v1/predict`` requests.

Starts ``triagenode serve --demo-model`` as its own process (receiver, worker, exporter and
the admin API under uvicorn), creates an operator token, warms the model with one ordinary
request, then for each hostile image:

1. resets the server's peak RSS (``/proc/PID/clear_refs``), sends the image once and reports
   the status and how far the peak RSS rose above the warm baseline;
2. unless ``--single-only``, sends it ``--concurrency`` times at once (50 by default) and
   reports the statuses, the rise of the peak RSS, and whether the node still answers
   ``/healthz``, an ordinary prediction and (when DCMTK's ``echoscu`` is installed) a C-ECHO.

Hostile images (made in memory, see ``tests/hostile.py``): a 13000x13000 PNG (0.16 MB), a
20000x20000 PNG (0.4 MB), a deflated DICOM that inflates to 512 MiB (0.5 MB), and, for
comparison, the largest images the default limits accept (a 6000x5000 PNG, a 30000x1000 PNG,
a deflated 5477x5477 DICOM frame).

Usage::

    python benchmarks/api_memory.py [--concurrency 50] [--single-only] [--json-out FILE]

Run it with ``PYTHONPATH`` pointing at another checkout's ``src`` to measure that code (use
``--single-only`` on code without the limits: 50 concurrent bombs there can exhaust memory).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import free_port
from tests.hostile import deflated_dicom_bomb, png_bomb

MiB = 1024 * 1024


def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def _picture(width: int, height: int) -> bytes:
    # a smooth gradient: compressible enough to fit the body limit, not trivially so
    row = (np.arange(width, dtype=np.float32) * 255 / width).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(row, (height, width)).copy(), "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images() -> dict[str, bytes]:
    return {
        "png_13000x13000": png_bomb(13000, 13000),
        "png_20000x20000": png_bomb(20000, 20000),
        "dicom_deflate_512MiB": deflated_dicom_bomb(512 * MiB),
        "png_6000x5000_accepted": _picture(6000, 5000),
        "png_30000x1000_accepted": _picture(30000, 1000),
        # a 30 M pixel 8-bit frame, deflated: the largest DICOM frame the defaults accept
        "dicom_deflate_5477x5477_accepted": deflated_dicom_bomb(5477 * 5477, 5477, 5477),
    }


def _echo(port: int) -> bool | None:
    echoscu = shutil.which("echoscu")
    if echoscu is None:
        return None
    env = {**os.environ, "TCP_NODELAY": "1"}
    done = subprocess.run(
        [echoscu, "-aec", "TRIAGENODE", "127.0.0.1", str(port)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


def _post(client: httpx.Client, body: dict[str, Any] | None) -> int | str:
    """The status of a predict call (or of ``/healthz`` for None), or the transport error."""
    try:
        if body is None:
            return client.get("/healthz").status_code
        return client.post("/api/v1/predict", json=body).status_code
    except httpx.TransportError as exc:  # old code can drop the connection, or die
        return type(exc).__name__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--single-only", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="api-memory-"))
    api_port, scp_port = free_port(), free_port()
    config = folder / "triagenode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{folder / "data"}"\n'
        f"[scp]\nport = {scp_port}\n"
        f"[api]\nport = {api_port}\nrate_limit_per_minute = 100000\n"
        '[audit]\nsecret = "api-memory-benchmark-secret-0123456789"\n'
    )
    command = [sys.executable, "-m", "triagenode.cli", "--config", str(config)]
    token = subprocess.run(
        [*command[:3], "token", "create", "--config", str(config), "--name", "bench",
         "--role", "operator"],
        check=True, capture_output=True, text=True,
    ).stdout.split()[0]  # fmt: skip
    server = subprocess.Popen(
        [*command[:3], "serve", "--config", str(config), "--demo-model"],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{api_port}"
    headers = {"Authorization": f"Bearer {token}"}
    results: dict[str, Any] = {"concurrency": args.concurrency, "attacks": {}}
    try:
        with httpx.Client(base_url=base, timeout=600, headers=headers) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    tail = (folder / "server.log").read_text()[-3000:]
                    raise SystemExit(f"the node did not start:\n{tail}")
                time.sleep(0.5)
            ordinary = {"image": base64.b64encode(_picture(512, 512)).decode(), "queries": ["x"]}
            warm = client.post("/api/v1/predict", json=ordinary)
            assert warm.status_code == 200, warm.text
            baseline = _status_kib(server.pid)["VmRSS"]
            results["baseline_rss_mib"] = round(baseline / 1024, 1)
            print(f"warm baseline RSS {baseline / 1024:.0f} MiB (pid {server.pid})")
            for name, data in _images().items():
                body = {"image": base64.b64encode(data).decode(), "queries": ["x"]}
                _reset_peak(server.pid)
                start = _status_kib(server.pid)["VmRSS"]
                answer = _post(client, body)
                peak = _status_kib(server.pid)["VmHWM"]
                row: dict[str, Any] = {
                    "file_mb": round(len(data) / 1e6, 2),
                    "single_status": answer,
                    "single_peak_rise_mib": round((peak - start) / 1024, 1),
                }
                if not args.single_only and server.poll() is None:
                    _reset_peak(server.pid)
                    start = _status_kib(server.pid)["VmRSS"]
                    with ThreadPoolExecutor(args.concurrency) as pool:
                        statuses = list(
                            pool.map(
                                lambda _, body=body: _post(client, body),
                                range(args.concurrency),
                            )
                        )
                    peak = _status_kib(server.pid)["VmHWM"]
                    row["concurrent_statuses"] = dict(Counter(statuses))
                    row["concurrent_peak_rise_mib"] = round((peak - start) / 1024, 1)
                if server.poll() is None:
                    row["healthz_after"] = _post(client, None)
                    row["predict_after"] = _post(client, ordinary)
                    row["c_echo_after"] = _echo(scp_port)
                alive = server.poll() is None
                row["node_alive"] = alive if alive else f"exited {server.returncode}"
                results["attacks"][name] = row
                print(name, json.dumps(row))
                if not alive:
                    break
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
