"""What this CPU can do for inference: bf16 and int8 instructions, read from /proc/cpuinfo.

Backend selection and precision choice depend on it: OpenVINO and PyTorch run bf16 fast only
where the CPU has AMX (``amx_bf16``, Intel Sapphire Rapids and later) or AVX-512 BF16
(``avx512_bf16``, also AMD Zen 4); elsewhere bf16 is emulated and slower than fp32, so fp32
is used. Tests inject a :class:`CpuCapabilities` instead of the detected one.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["INFERENCE_FLAGS", "CpuCapabilities", "detect_cpu"]

# The flags that decide precision and speed; the cache keys of compiled models carry them.
INFERENCE_FLAGS = (
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "avx512f",
    "avx2",
)


@dataclass(frozen=True)
class CpuCapabilities:
    """A CPU's name and the inference-relevant subset of its feature flags."""

    name: str
    flags: frozenset[str]

    @property
    def amx(self) -> bool:
        """AMX tiles with bf16 (Intel Xeon 4th generation and later)."""
        return "amx_bf16" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 dot products (AMX or AVX-512 BF16)."""
        return self.amx or "avx512_bf16" in self.flags

    @property
    def int8(self) -> bool:
        """Native int8 dot products (VNNI or AMX int8)."""
        return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & self.flags)

    def describe(self) -> str:
        """``name (flag flag ...)`` with the inference flags only, for logs and reports."""
        return f"{self.name} ({' '.join(sorted(self.flags)) or 'no AVX2/AVX-512/AMX'})"

    @classmethod
    def from_cpuinfo(cls, text: str) -> CpuCapabilities:
        """Parse the text of ``/proc/cpuinfo`` (first processor's name and flags)."""
        name, flags = "", frozenset[str]()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key == "flags" and not flags:
                flags = frozenset(value.split()) & frozenset(INFERENCE_FLAGS)
        return cls(name or platform.processor() or "unknown", flags)


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuCapabilities:
    """This machine's CPU; outside Linux the flags are unknown (empty: fp32 everywhere)."""
    try:
        return CpuCapabilities.from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return CpuCapabilities(platform.processor() or "unknown", frozenset())
