"""Prometheus metrics of the node: names defined once, used by every part.

Counters and histograms live in one registry per process (:data:`REGISTRY`); gauges that
describe database state (studies by state, queue depth, audit chain length) are computed
from the database when ``/metrics`` is scraped. No label ever carries PHI: labels are AE
titles, destination names, priorities, states and outcomes only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = [
    "ASSOCIATIONS",
    "BATCH_SIZE",
    "EXPORT_ATTEMPTS",
    "EXPORT_FAILURES",
    "INFERENCE_SECONDS",
    "INSTANCES_RECEIVED",
    "INSTANCES_REJECTED",
    "RECEIVED_BYTES",
    "REGISTRY",
    "STUDIES_PROCESSED",
]

REGISTRY = CollectorRegistry(auto_describe=True)

ASSOCIATIONS = Counter(
    "triagenode_associations",
    "DICOM associations by outcome (accepted, rejected)",
    ["outcome"],
    registry=REGISTRY,
)
INSTANCES_RECEIVED = Counter(
    "triagenode_instances_received",
    "Instances stored and acknowledged with success",
    registry=REGISTRY,
)
INSTANCES_REJECTED = Counter(
    "triagenode_instances_rejected",
    "C-STORE requests answered with a failure status, by reason",
    ["reason"],
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "triagenode_received_bytes",
    "Bytes of instances stored",
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "triagenode_inference_seconds",
    "Time to encode one batch of images, by backend",
    ["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "triagenode_batch_size",
    "Images per encoded batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
STUDIES_PROCESSED = Counter(
    "triagenode_studies_processed",
    "Studies processed, by outcome (reported, failed, ignored, not_applicable) and priority",
    ["outcome", "priority"],
    registry=REGISTRY,
)
EXPORT_ATTEMPTS = Counter(
    "triagenode_export_attempts",
    "C-STORE attempts of SRs to destinations",
    ["destination"],
    registry=REGISTRY,
)
EXPORT_FAILURES = Counter(
    "triagenode_export_failures",
    "Failed C-STORE attempts of SRs to destinations",
    ["destination"],
    registry=REGISTRY,
)
