"""Resident memory of one image encoder alone, opened from a cached model file.

Run once per model, each in its own process, so no other backend's memory is counted::

    python benchmarks/encoder_memory.py ort ARTIFACTS/image.onnx
    python benchmarks/encoder_memory.py bf16 ARTIFACTS/openvino/<key>-bf16-<...>.xml

Prints the growth of the resident set after opening the encoder and after encoding
batches of 1 and 8 (224 px), with the runtime libraries already imported.
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ort", "fp32", "bf16", "int8"])
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    import onnxruntime  # noqa: F401 - runtimes imported before the baseline
    import openvino  # noqa: F401

    from triagenode.inference.backends.onnxruntime import OnnxRuntimeImageEncoder
    from triagenode.inference.backends.openvino import OpenVinoImageEncoder

    base = rss_mib()
    if args.kind == "ort":
        encoder = OnnxRuntimeImageEncoder(args.model, device="cpu", threads=args.threads)
    else:
        encoder = OpenVinoImageEncoder(args.model, precision=args.kind, threads=args.threads)
    opened = rss_mib()
    images = np.zeros((8, 3, args.size, args.size), np.float32)
    for _ in range(2):
        encoder.encode(images)
        encoder.encode(images[:1])
    print(
        f"{args.kind} {args.model.name}: after open +{opened - base:.0f} MiB, "
        f"after batches 1 and 8 +{rss_mib() - base:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
