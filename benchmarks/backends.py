"""Compare every image-encoder backend on this machine (thin wrapper of the CLI).

Same as ``triagenode benchmark backends``; defaults to the BiomedCLIP architecture with
random weights, 100 agreement images and batch sizes 1, 4, 8, writing
``benchmarks/results/backends-<host>.json``::

    python benchmarks/backends.py                 # BiomedCLIP architecture, random weights
    python benchmarks/backends.py --demo-model    # tiny demo model, seconds
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from triagenode.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--demo-model" not in args and "--random-biomedclip" not in args:
        args.append("--random-biomedclip")
    if "--json-out" not in args:
        out = Path(__file__).parent / "results" / f"backends-{socket.gethostname()}.json"
        args += ["--json-out", str(out)]
    if "--batch-sizes" not in args:
        args += ["--batch-sizes", "1", "4", "8"]
    sys.exit(main(["benchmark", "backends", *args]))
