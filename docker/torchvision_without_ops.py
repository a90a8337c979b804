"""Rewrite PyPI's torchvision wheel for a CPU-only PyTorch: ``torchvision-X+cpu.noops``.

PyPI's Linux torchvision wheels are built against PyTorch's CUDA build: their compiled
operators (``_C.so``, ``image.so``) link ``libtorch_cuda.so`` and cannot load beside the CPU
wheel of torch, and one fake-kernel registration then stops ``import torchvision`` with
"operator torchvision::nms does not exist". triagenode (through open_clip) only needs
torchvision's pure-Python transforms, so the CPU image drops the compiled operators and the
CUDA libraries they bundle, and registers the operators' fake kernels only when the
operators exist (none do here). The output is the same bytes for the same input.
A site whose mirror has PyTorch's own CPU wheel of torchvision uses that instead.

    python docker/torchvision_without_ops.py WHEEL OUTDIR
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from pathlib import Path

LOCAL_LABEL = "cpu.noops"
# Fake kernels registered without checking that the operator was loaded (nms, qnms, ...).
FAKE_KERNEL = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.M)
FAKE_KERNEL_GUARDED = (
    r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"
)


def _dropped(name: str) -> bool:
    compiled = name.startswith("torchvision/") and name.endswith(".so")
    return compiled or name.startswith("torchvision.libs/")


def _entry(name: str, like: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """A zip entry dated and moded as ``like``, so a rewrite is reproducible."""
    entry = zipfile.ZipInfo(name, date_time=like.date_time)
    entry.external_attr = like.external_attr
    entry.compress_type = zipfile.ZIP_DEFLATED
    return entry


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def rewrite(wheel: Path, outdir: Path) -> Path:
    match = re.fullmatch(r"torchvision-([0-9.]+)(\+[^-]+)?-(.+)\.whl", wheel.name)
    if match is None:
        raise SystemExit(f"not a torchvision wheel name: {wheel.name}")
    version, tags = match.group(1), match.group(3)
    new_version = f"{version}+{LOCAL_LABEL}"
    old_info, new_info = f"torchvision-{version}.dist-info", f"torchvision-{new_version}.dist-info"
    out = outdir / f"torchvision-{new_version}-{tags}.whl"
    records: list[str] = []
    patched = False
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if _dropped(name) or name == f"{old_info}/RECORD":
                continue
            data = src.read(item)
            if name == "torchvision/_meta_registrations.py":
                text, count = FAKE_KERNEL.subn(FAKE_KERNEL_GUARDED, data.decode())
                if count == 0:
                    raise SystemExit(f"{wheel.name}: no fake-kernel registration to guard")
                data = text.encode()
                patched = True
            if name == f"{old_info}/METADATA":
                data = re.sub(
                    rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1, flags=re.M
                )
            name = name.replace(old_info, new_info, 1)
            dst.writestr(_entry(name, item), data)
            records.append(_record_line(name, data))
        if not patched:
            raise SystemExit(f"{wheel.name}: torchvision/_meta_registrations.py not found")
        records.append(f"{new_info}/RECORD,,")
        record = src.getinfo(f"{old_info}/RECORD")
        dst.writestr(_entry(f"{new_info}/RECORD", record), "\n".join(records) + "\n")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(rewrite(Path(sys.argv[1]), Path(sys.argv[2])))
