"""Optional dependencies: a missing one ends in a line that names the pip extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import triagenode
from triagenode.errors import TriageNodeError
from triagenode.optional import MissingDependency, require
from triagenode.store.db import Database

SRC = Path(triagenode.__file__).resolve().parents[1]


def _hide(tmp_path: Path, package: str) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import package`` fail."""
    shim = tmp_path / "shim" / package
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(f"raise ImportError('{package} hidden by the test')\n")
    return shim.parent


def test_export_onnx_without_onnx_names_the_extra_and_prints_no_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGENODE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(_hide(tmp_path, "onnx")), str(SRC)])
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "triagenode.cli", "optimize", "export-onnx", "--demo-model"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("triagenode: error: ONNX export needs the 'onnx' package"), last
    assert last.endswith("pip install 'triagenode[onnx]'"), last
    assert not list(tmp_path.rglob("*.onnx"))


def test_require_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require("json", "none", "Parsing") is sys.modules["json"]
    # None: import raises ImportError (the submodule too: other tests may have imported it)
    monkeypatch.setitem(sys.modules, "tritonclient", None)
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)
    with pytest.raises(MissingDependency) as raised:
        require("tritonclient.grpc", "triton", "The triton backend")
    message = str(raised.value)
    assert message.startswith("The triton backend needs the 'tritonclient' package")
    assert message.endswith("install it with: pip install 'triagenode[triton]'")
    # Caught where the CLI catches the node's errors, and where code expects an ImportError.
    assert isinstance(raised.value, TriageNodeError) and isinstance(raised.value, ImportError)
    assert raised.value.name == "tritonclient"


def test_postgres_url_without_psycopg_names_the_postgres_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingDependency, match=r"pip install 'triagenode\[postgres\]'$"):
        Database("postgresql+psycopg://triagenode@127.0.0.1:1/none")
