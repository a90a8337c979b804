"""What the Triton path costs besides the model: encode latency through a running server.

Point it at a Triton model whose tensors fit the node's (``pixel_values (-1,3,S,S)`` to
``image_embeds (-1,D)``); with a model that does no work (a Python model returning zeros)
the figures are the client, gRPC and server overhead alone::

    python benchmarks/triton_transport.py --url 127.0.0.1:8001 --model null \\
        --image-size 224 --embed-dim 512 --batch-sizes 1 8 32 --repeats 15
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from triagenode.config.settings import TritonSettings
from triagenode.domain import Priority
from triagenode.inference.backends.triton import TritonImageEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--model", default="triagenode_image")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    encoder = TritonImageEncoder(
        TritonSettings(url=args.url, model_name=args.model),
        image_size=args.image_size,
        embed_dim=args.embed_dim,
    )
    rng = np.random.default_rng(0)
    rows = []
    for n in args.batch_sizes:
        images = rng.standard_normal((n, 3, args.image_size, args.image_size), np.float32)
        encoder.encode_prioritized(images, Priority.routine)  # warm-up
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            encoder.encode_prioritized(images, Priority.routine)
            times.append(time.perf_counter() - started)
        times.sort()
        p50 = times[len(times) // 2]
        rows.append(
            {
                "batch": n,
                "megabytes": round(images.nbytes / 1e6, 1),
                "p50_ms": round(p50 * 1000, 1),
                "min_ms": round(times[0] * 1000, 1),
                "images_per_s": round(n / p50, 1),
            }
        )
    encoder.close()
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
