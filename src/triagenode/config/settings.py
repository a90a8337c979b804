"""Typed settings: ``triagenode.toml`` plus ``TRIAGENODE_<SECTION>__<KEY>`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo stops the start with
the key's dotted name instead of being silently ignored. :func:`load_settings` turns any
validation failure into one :class:`~triagenode.errors.ConfigError` line per problem.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from triagenode.config.base import Section
from triagenode.config.labels import LabelSettings
from triagenode.config.triage import TriageSettings, label_set_problems
from triagenode.domain import Priority
from triagenode.errors import ConfigError
from triagenode.uids import is_valid_uid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "ALL_ROLES",
    "ApiSettings",
    "AuditSettings",
    "Backend",
    "ClusterSettings",
    "DatabaseSettings",
    "Destination",
    "ExportSettings",
    "ModelSettings",
    "NodeSettings",
    "RetentionSettings",
    "Role",
    "ScpSettings",
    "Settings",
    "StudySettings",
    "SyslogSettings",
    "TritonSettings",
    "load_settings",
    "placeholder_secret_problem",
]

ENV_PREFIX = "TRIAGENODE_"
# What one process may run (node.roles); "all" names every one of them.
Role = Literal["receiver", "worker", "exporter", "api", "all"]
# model.backend: "auto" picks the fastest correct one on this machine.
Backend = Literal["auto", "torch", "onnxruntime", "openvino", "tensorrt", "triton"]
ALL_ROLES = ("receiver", "worker", "exporter", "api")
DEFAULT_MODEL_SOURCE = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# PS3.5 6.2: an AE title is 1-16 characters of the default repertoire, no backslash or
# control characters; leading and trailing spaces are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(
            "must be 1 to 16 printable ASCII characters without backslash "
            f"(got {value!r}, {len(stripped)} characters)"
        )
    return stripped


class NodeSettings(Section):
    data_dir: Path = Field(
        default=Path("triagenode-data"),
        description="Folder for the spool, the SQLite database, results, engines and caches",
    )
    uid_root: str = Field(
        default="2.25",
        description="Root for every UID the node makes (SRs, series, device). '2.25' makes "
        "UUID-derived UIDs; an organisation's registered root is better in production",
    )
    station_name: str = Field(default="TRIAGENODE", max_length=16)
    institution_name: str = Field(default="", max_length=64)
    environment: Literal["development", "production"] = Field(
        default="development",
        description="'production' refuses placeholder secrets and the demo model",
    )
    roles: list[Role] = Field(
        default_factory=lambda: list[Role](["all"]),
        min_length=1,
        description="What this process runs: 'receiver' (the DICOM SCP), 'worker' "
        "(classification), 'exporter' (sending results), 'api' (admin API and console), or "
        "'all'. Processes with different roles share one PostgreSQL database and one spool",
    )

    @field_validator("uid_root")
    @classmethod
    def _uid_root_valid(cls, value: str) -> str:
        if not is_valid_uid(value) or len(value) > 43:
            raise ValueError(
                "must be a DICOM UID root of digits and dots, no leading zeros, at most 43 "
                f"characters (got {value!r})"
            )
        return value


class ScpSettings(Section):
    ae_title: str = "TRIAGENODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles accepted; empty accepts any (refused in production "
        "unless allow_any_calling_ae is true)",
    )
    allow_any_calling_ae: bool = Field(
        default=False,
        description="With node.environment = 'production', an empty allowed_calling_aets "
        "is refused unless this says, explicitly, that any calling AE may store",
    )
    max_associations: int = Field(default=16, ge=1, le=1024)
    max_pending_connections: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="Connections not yet associated (TLS handshake, A-ASSOCIATE-RQ not "
        "complete); when full, the oldest is closed to make room",
    )
    max_pending_per_address: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="Connections not yet associated from one source address; when full, "
        "that address's oldest is closed",
    )
    max_pdu: int = Field(
        default=256 * 1024,
        ge=0,
        le=64 * 1024 * 1024,
        description="Maximum PDU length received, bytes (advertised and enforced: larger "
        "PDUs are aborted); 0 advertises unlimited, data is streamed to disk either way",
    )
    check_called_ae: bool = Field(
        default=True,
        description="Reject associations whose called AE title is not ae_title",
    )
    accept_unknown_sop_classes: bool = Field(
        default=False,
        description="Accept presentation contexts for SOP classes the node does not know "
        "(private or newer storage classes) and store them like any other",
    )
    acse_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="ARTIM: the whole A-ASSOCIATE-RQ must arrive within this many seconds "
        "of the connection (after the TLS handshake)",
    )
    tls_handshake_timeout_s: float = Field(
        default=10.0, gt=0, description="The whole TLS handshake must finish within this"
    )
    dimse_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest wait for the next fragment of a message (command or dataset) "
        "already begun; the association is aborted after it",
    )
    network_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Longest wait for the next message or release on an idle association; "
        "the association is aborted after it",
    )
    min_free_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=0,
        description="C-STOREs are refused (0xA701) while the spool's file system has less "
        "free space, so the database and audit trail keep room; 0 disables",
    )
    tls_enabled: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = Field(
        default=None, description="CA bundle; when set, peers must present a certificate"
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets_valid(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in value]

    @model_validator(mode="after")
    def _tls_complete(self) -> ScpSettings:
        if self.tls_enabled and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_enabled needs tls_cert and tls_key")
        return self


class StudySettings(Section):
    stable_after_s: float = Field(
        default=30.0, gt=0, le=86400, description="Quiet seconds before a study is complete"
    )
    stable_after_by_priority: dict[Priority, float] = Field(
        default_factory=dict,
        description="Quiet period per priority, e.g. {stat = 5, urgent = 10}; others use "
        "stable_after_s",
    )
    max_attempts: int = Field(default=3, ge=1, le=100)

    @field_validator("stable_after_by_priority", mode="before")
    @classmethod
    def _priority_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {Priority.parse(k): v for k, v in value.items()}
        return value

    @field_validator("stable_after_by_priority")
    @classmethod
    def _positive(cls, value: dict[Priority, float]) -> dict[Priority, float]:
        for priority, seconds in value.items():
            if not 0 < seconds <= 86400:
                raise ValueError(f"{priority.name}: must be in (0, 86400] seconds")
        return value

    def quiet_period(self, priority: Priority) -> float:
        return self.stable_after_by_priority.get(priority, self.stable_after_s)


class DatabaseSettings(Section):
    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; empty means SQLite at <data_dir>/triagenode.sqlite3",
    )
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("sqlite", "postgresql")):
            raise ValueError(
                f"must be a sqlite:// or postgresql:// URL (got {value.split(':')[0]!r})"
            )
        return value

    password_file: Path | None = Field(
        default=None,
        description="File holding the PostgreSQL password (a Docker or Kubernetes secret); "
        "read at start, it replaces any password in url. Trailing newlines are not part of it",
    )

    @field_validator("password_file")
    @classmethod
    def _password_readable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        if not (info.data.get("url") or "").startswith("postgresql"):
            raise ValueError("needs database.url to be a postgresql:// URL")
        read_password_file(value)
        return value


def url_with_password(url: str, password: str) -> str:
    """``url`` (``dialect+driver://user[:old]@host...``) with ``password``, percent-encoded
    as SQLAlchemy reads it back."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        raise ConfigError("database.url: a password file needs a user in the URL (user@host)")
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def read_password_file(path: Path) -> str:
    """The password in ``path`` without trailing newlines; ValueError when unusable."""
    try:
        password = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise ValueError(f"cannot read {path} ({reason})") from None
    if not password:
        raise ValueError(f"{path} is empty")
    return password


# A Triton model name is a folder name in the model repository; a header name is gRPC
# metadata (lower-case, "grpc-" is reserved by gRPC itself).
_TRITON_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_GRPC_HEADER = re.compile(r"^(?!grpc-)[a-z0-9_.-]{1,64}$")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


class TritonSettings(Section):
    """``[model.triton]``: where ``model.backend = "triton"`` sends preprocessed batches."""

    url: str = Field(
        default="127.0.0.1:8001",
        description="gRPC address of the Triton server, host:port (no scheme)",
    )
    model_name: str = Field(
        default="triagenode_image", description="model in the server's repository"
    )
    model_version: str = Field(
        default="", description="version number; empty: the server's version policy"
    )
    timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="per request, and for the checks at start"
    )
    tls: bool = Field(default=False, description="gRPC over TLS")
    tls_ca: Path | None = Field(default=None, description="CA bundle (default: system CAs)")
    tls_cert: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    tls_key: Path | None = Field(default=None, description="private key of tls_cert")
    headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="gRPC metadata sent with every request (for example a gateway's token); "
        "values are secrets, never shown",
    )

    @field_validator("url")
    @classmethod
    def _url_is_host_port(cls, value: str) -> str:
        match = _HOST_PORT.match(value.strip())
        if not match or not 1 <= int(match.group(2)) <= 65535:
            raise ValueError(
                "must be host:port of the server's gRPC endpoint, without a scheme "
                f"(got {value!r}; for example 'triton.example.org:8001')"
            )
        return value.strip()

    @field_validator("model_name")
    @classmethod
    def _model_name_valid(cls, value: str) -> str:
        if not _TRITON_NAME.match(value):
            raise ValueError(
                f"must be 1-128 characters of letters, digits, '_', '.', '-' (got {value!r})"
            )
        return value

    @field_validator("model_version")
    @classmethod
    def _version_is_a_number(cls, value: str) -> str:
        if value and not re.fullmatch(r"[1-9][0-9]{0,8}", value):
            raise ValueError(f"must be empty or a positive version number (got {value!r})")
        return value

    @field_validator("headers")
    @classmethod
    def _headers_valid(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, secret in value.items():
            if not _GRPC_HEADER.match(name):
                raise ValueError(
                    f"header name {name!r}: lower-case letters, digits, '-', '_', '.'; "
                    "not starting with 'grpc-'"
                )
            if not all(" " <= ch <= "~" for ch in secret.get_secret_value()):
                raise ValueError(f"header {name!r}: the value must be printable ASCII")
        return value

    @model_validator(mode="after")
    def _tls_consistent(self) -> TritonSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        uses_tls = self.tls_ca or self.tls_cert
        if uses_tls and not self.tls:
            raise ValueError("tls_ca/tls_cert/tls_key are set but tls = false")
        return self


class ModelSettings(Section):
    source: str = DEFAULT_MODEL_SOURCE
    revision: str | None = Field(
        default=None,
        description="Commit (40 hex digits) an hf-hub: source is pinned to; required in "
        "production, so every node loads the same weights. Results record the commit loaded",
    )
    backend: Backend = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"
    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=10.0, ge=0, le=10000)
    slices_per_series: int = Field(
        default=8, ge=1, le=1000, description="At most this many evenly spaced CT/MR slices"
    )
    max_images_per_study: int = Field(
        default=16, ge=1, le=1000, description="At most this many images of a study are scored"
    )
    artifacts_dir: Path | None = Field(
        default=None, description="ONNX models and engines; default <data_dir>/engines"
    )
    threads: int = Field(
        default=0, ge=0, le=256, description="CPU threads; 0 lets the backend choose"
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        default="all", description="ONNX Runtime graph optimisation level (onnxruntime backend)"
    )
    calibration: Path | None = Field(
        default=None,
        description="Site calibration file from `triagenode calibrate` (per-finding calibration "
        "and thresholds); refused when made for other model weights",
    )
    performance_hint: Literal["latency", "throughput"] = Field(
        default="latency",
        description="OpenVINO PERFORMANCE_HINT (openvino backend): latency = one stream",
    )
    triton: TritonSettings = Field(
        default_factory=TritonSettings,
        description="Triton Inference Server the triton backend sends image batches to",
    )
    prefetch_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Threads decoding and preprocessing a study's next images while the "
        "encoder runs; 0 = serial (decode every image, then encode)",
    )
    prefetch_images: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Most preprocessed images waiting for the encoder at once, over all "
        "studies (about 0.6 MB each at 224 px); a study's images are encoded in batches of "
        "at most half of this, the next decoded while one is encoded",
    )

    @field_validator("source")
    @classmethod
    def _source_known(cls, value: str) -> str:
        if value == "demo" or value.startswith(("hf-hub:", "local-dir:")):
            return value
        raise ValueError(f"must be 'demo', 'hf-hub:<repo>' or 'local-dir:<path>' (got {value!r})")

    @field_validator("revision")
    @classmethod
    def _revision_is_a_commit(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not re.fullmatch(r"[0-9a-f]{40}", value):
            raise ValueError(
                "must be a commit hash of 40 lower-case hex digits (a branch or tag can move)"
            )
        return value

    @model_validator(mode="after")
    def _revision_for_hub_only(self) -> ModelSettings:
        if self.revision is not None and not self.source.startswith("hf-hub:"):
            raise ValueError("revision: only an hf-hub: source has revisions")
        return self


SendKind = Literal["sr", "summary-sc", "summary-pdf", "kos"]


class Destination(Section):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    send: list[SendKind] = Field(
        default_factory=lambda: list[SendKind](["sr", "summary-sc"]),
        min_length=1,
        description="What this destination gets of each classified study: the TID 1500 SR "
        '("sr"), the summary card as a Secondary Capture ("summary-sc") and as an '
        'Encapsulated PDF ("summary-pdf"), the Key Object Selection of the key images ("kos")',
    )

    @field_validator("ae_title")
    @classmethod
    def _ae_title_valid(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("send")
    @classmethod
    def _send_unique(cls, value: list[SendKind]) -> list[SendKind]:
        repeated = sorted({kind for kind in value if value.count(kind) > 1})
        if repeated:
            raise ValueError(f"each kind at most once (repeated: {', '.join(repeated)})")
        return value


class ExportSettings(Section):
    max_attempts: int = Field(default=8, ge=1, le=1000)
    senders: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Sending threads per destination (each destination has its own lane, so "
        "one that does not answer never delays another); more than one lets a stat SR "
        "overtake a pass in progress to the same destination",
    )
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds to connect, to be answered an association, and per C-STORE",
    )
    probe_interval_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="Seconds between background C-ECHOs of every destination; /readyz "
        "reports the last result and its age, and never opens an association itself",
    )
    mode: Literal["send", "shadow"] = Field(
        default="send",
        description="'shadow' classifies and keeps SRs and results locally but sends nothing "
        "(validation before go-live)",
    )


class ApiSettings(Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    rate_limit_per_minute: int = Field(default=600, ge=1)
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    min_free_spool_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="/readyz fails when the spool's file system has less free space",
    )
    max_image_pixels: int = Field(
        default=30_000_000,
        ge=4,
        description="/predict refuses (413) an image or frame declaring more pixels, read "
        "from its header before decoding (30 M covers a 4740x5928 mammogram)",
    )
    max_frames: int = Field(
        default=4096, ge=1, description="/predict refuses (413) DICOM with more frames"
    )
    max_inflated_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="/predict refuses (413) a deflated DICOM data set inflating to more bytes",
    )
    max_decoded_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024 * 1024,
        description="/predict refuses (413) a request whose pictures together hold more "
        "bytes of pixels once reduced while decoding (shortest side kept at 512 or more)",
    )
    max_concurrent_predictions: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Predict calls decoding or running at once; more are answered 503 with "
        "Retry-After",
    )
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate (chain); with tls_key the API serves HTTPS"
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        default=None,
        description="CA bundle; when set, clients must present a certificate it signed",
    )

    @model_validator(mode="after")
    def _tls_complete(self) -> ApiSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ValueError(f"{key}: {path} is not a readable file")
        return self


class RetentionSettings(Section):
    """How long patient data stays on the node once its work is done (see docs/security.md)."""

    spool_days: float | None = Field(
        default=30.0,
        ge=0,
        description="Received images are deleted this many days after the study's SR reached "
        "every destination (or the study was ignored); empty keeps them forever",
    )
    results_days: float | None = Field(
        default=90.0,
        ge=0,
        description="SR files are deleted this many days after they reached every "
        "destination (never while a destination still waits); empty keeps them forever",
    )
    interval_minutes: float = Field(
        default=60.0,
        ge=0,
        description="How often `serve` purges what the policy allows; 0 leaves it to "
        "`triagenode purge` (cron, a systemd timer)",
    )


class SyslogSettings(Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=514, ge=1, le=65535)
    protocol: Literal["udp", "tcp", "tls"] = Field(
        default="tcp",
        description="tcp (RFC 6587 octet counting) or tls (RFC 5425) keep every event until "
        "the collector has read it; udp (RFC 5426) can lose events and is only for collectors "
        "that accept nothing else",
    )
    tls_ca: Path | None = None
    ack_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="how long to wait for the collector to close its side after a batch; "
        "a batch is acknowledged (and leaves the backlog) only then",
    )


class AuditSettings(Section):
    secret: SecretStr | None = Field(
        default=None,
        description="Key for the audit hash chain and patient pseudonyms; when empty a random "
        "one is created in <data_dir>/audit.key on first start",
    )
    syslog: SyslogSettings = Field(default_factory=SyslogSettings)
    checkpoint_file: Path | None = Field(
        default=None,
        description="append-only file of signed chain-head checkpoints; default "
        "<data_dir>/audit-checkpoints.log (put it on a volume the node can only append to)",
    )
    checkpoint_key: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs checkpoints; default "
        "<data_dir>/audit-checkpoint.key, created on first use with its .pub beside it",
    )
    checkpoint_public_key: Path | None = Field(
        default=None,
        description="public key `audit verify` checks signatures with; default the one "
        "beside checkpoint_key (an auditor should keep their own copy)",
    )
    checkpoint_interval_s: float = Field(
        default=0.0,
        ge=0,
        description="at most one checkpoint per this many seconds per process; 0 writes one "
        "after every audit event",
    )

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class ClusterSettings(Section):
    """Work held by one process of a split node at a time (docs/scale-out.md)."""

    retry_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="How often a standby process asks for cluster-wide work (the study "
        "scheduler, audit forwarding and checkpoints, retention): about how long a takeover "
        "takes after the holder dies",
    )
    check_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="How often the holder checks that the database connection holding its "
        "lock is alive; it stops the work at once when not",
    )


class Settings(BaseSettings):
    """All of the node's settings. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    scp: ScpSettings = Field(default_factory=ScpSettings)
    study: StudySettings = Field(default_factory=StudySettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    labels: LabelSettings = Field(default_factory=LabelSettings)
    destinations: list[Destination] = Field(default_factory=list)
    export: ExportSettings = Field(default_factory=ExportSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        return self.check_consistency()

    def check_consistency(self) -> Settings:
        """Checks across sections; raises ValueError naming the key at fault."""
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destinations: names must be unique (repeated: {duplicates})")
        if self.node.environment == "production":
            self._production_checks()
        sqlite = not self.database.url or self.database.url.startswith("sqlite")
        if sqlite and set(self.node.roles) != {"all"}:
            raise ValueError(
                f"node.roles: {self.node.roles} splits the node over several processes, which "
                "needs a PostgreSQL database (database.url); SQLite serves one process with "
                "roles = ['all']"
            )
        label_set_errors = label_set_problems(self.triage, self.labels.sets)
        if label_set_errors:
            raise ValueError("; ".join(label_set_errors))
        return self

    def _production_checks(self) -> None:
        problems = []
        if self.model.source == "demo":
            problems.append("model.source: 'demo' is refused when node.environment is production")
        if self.model.source.startswith("hf-hub:") and self.model.revision is None:
            problems.append(
                "model.revision: an hf-hub: source must be pinned to a commit when "
                "node.environment is production (`triagenode model prepare` prints it)"
            )
        if not self.scp.allowed_calling_aets and not self.scp.allow_any_calling_ae:
            problems.append(
                "scp.allowed_calling_aets: empty, so any calling AE could store studies; "
                "list the modalities' and PACS's AE titles, or set "
                "scp.allow_any_calling_ae = true to accept any (node.environment is production)"
            )
        if self.audit.secret is not None:
            weakness = placeholder_secret_problem(self.audit.secret.get_secret_value())
            if weakness:
                problems.append(
                    f"audit.secret: {weakness}; use a random value (`python -c 'import "
                    "secrets; print(secrets.token_urlsafe(32))'`) or leave it empty for a "
                    "random key file (node.environment is production)"
                )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which load_settings passes as init values.
        return (env_settings, init_settings)

    # Derived locations -------------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    @property
    def artifacts_dir(self) -> Path:
        return self.model.artifacts_dir or self.node.data_dir / "engines"

    @property
    def roles(self) -> frozenset[str]:
        """The roles this process runs, 'all' expanded."""
        if "all" in self.node.roles:
            return frozenset(ALL_ROLES)
        return frozenset(self.node.roles)

    @property
    def database_url(self) -> str:
        if self.database.url and self.database.password_file is not None:
            password = read_password_file(self.database.password_file)
            return url_with_password(self.database.url, password)
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.node.data_dir / 'triagenode.sqlite3').resolve()}"


_PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "placeholder", "example", "secret")
_MIN_SECRET_BITS = 256


def placeholder_secret_problem(value: str) -> str | None:
    """Why ``value`` looks like a placeholder or a weak secret, or None when it does not.

    Refused: a known placeholder word (``changeme...``), few distinct characters
    (``aaaa...``, ``abababab...``) and under 32 bytes of entropy, estimated generously as
    length x log2(the character classes used): a hex string counts 4 bits a character,
    base64 6, so ``secrets.token_hex(32)`` and ``secrets.token_urlsafe(32)`` pass.
    """
    lowered = value.lower()
    for word in _PLACEHOLDER_WORDS:
        if word in lowered:
            return f"looks like a placeholder (contains {word!r})"
    if len(set(value)) < 10:
        return f"repeats characters ({len(set(value))} distinct)"
    if all(c in "0123456789abcdef" for c in lowered) and (
        value == lowered or value == value.upper()
    ):
        pool = 16
    else:
        pool = 0
        for members in (
            "abcdefghijklmnopqrstuvwxyz",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "0123456789",
        ):
            if any(c in members for c in value):
                pool += len(members)
        if any(not c.isascii() or not c.isalnum() for c in value):
            pool += 33
    bits = len(value) * math.log2(pool)
    if bits < _MIN_SECRET_BITS:
        return (
            f"has about {int(bits)} bits of entropy, under the {_MIN_SECRET_BITS} (32 bytes) needed"
        )
    return None


def _describe(error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "settings"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if "input" in error and error["type"] not in ("missing",) and not location.endswith("secret"):
        given = error["input"]
        if isinstance(given, (str, int, float, bool)) and "(got" not in message:
            message = f"{message} (got {given!r})"
    return f"{location}: {message}"


def _unknown_env_keys() -> list[str]:
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    problems = []
    for key in os.environ:
        if not key.upper().startswith(ENV_PREFIX) or key.upper().startswith("TRIAGENODE_TEST"):
            continue
        head = key.upper().split("__", 1)[0]
        if head not in known:
            problems.append(
                f"{key}: unknown setting (sections: {', '.join(Settings.model_fields)})"
            )
    return problems


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read settings from ``path`` (TOML, optional), the environment, and ``overrides``.

    ``overrides`` are section dictionaries (``scp={"port": 0}``) merged over the file; the
    environment still wins over both.

    Raises
    ------
    ConfigError
        Naming every bad key with what is allowed, one per line.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    for section, data in overrides.items():
        if isinstance(data, dict) and isinstance(values.get(section), dict):
            values[section] = {**values[section], **data}
        else:
            values[section] = data
    problems = _unknown_env_keys()
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(e) for e in exc.errors())) from None
    _check_data_dir(settings.node.data_dir)
    return settings


def _check_data_dir(data_dir: Path) -> None:
    """The data folder must exist or be creatable, and be writable.

    It holds patient data (images, SRs, the database): it is created ``0700``, and an
    existing one of this user that others could read is narrowed to ``0700`` (with a log
    line), so no other account on the machine can list or read it.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"node.data_dir: cannot create {data_dir} ({exc.strerror})") from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"node.data_dir: {data_dir} is not writable by this user")
    info = data_dir.stat()
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        logging.getLogger(__name__).warning(
            "node.data_dir %s was open to other users (mode %o); narrowed to 0700",
            data_dir,
            info.st_mode & 0o777,
        )
        data_dir.chmod(0o700)
