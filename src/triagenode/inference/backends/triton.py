"""Triton image encoder: the image tower runs on a shared NVIDIA Triton Inference Server.

Many nodes, few GPUs: each node preprocesses its images and sends the batches over gRPC
(``tritonclient``) to one Triton server, whose dynamic batcher merges the nodes' requests on
its GPUs. The text tower stays on the node (the label embeddings are computed once at start
and cached), so only pixels cross the network: no DICOM header, no patient data.

A study's triage priority travels as Triton request priority (:func:`triton_priority`), so
on a server whose model has the priority levels of ``triagenode optimize export-triton``,
a stat study's images overtake routine ones queued by other nodes.

At start the model is checked against the node's: one FP32 input ``(-1, 3, S, S)``, one FP32
output ``(-1, D)``, batching on, and, when the model repository was written by
``export-triton``, the same weights (``triagenode.weights_sha256`` parameter). A mismatch or
an unreachable server stops the start with an error naming the server and the model.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from triagenode.domain import Priority
from triagenode.errors import ModelLoadError, TriageNodeError

__all__ = [
    "DEFAULT_PRIORITY_LEVEL",
    "INSTALL_HINT",
    "PRIORITY_LEVELS",
    "WEIGHTS_PARAMETER",
    "TritonImageEncoder",
    "TritonRequestError",
    "triton_priority",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'triagenode[triton]'"
# Triton priority 1 is the most urgent; 0 means "the model's default level".
_LEVELS = {Priority.stat: 1, Priority.urgent: 2, Priority.routine: 3, Priority.low: 4}
PRIORITY_LEVELS = len(_LEVELS)
DEFAULT_PRIORITY_LEVEL = _LEVELS[Priority.routine]
WEIGHTS_PARAMETER = "triagenode.weights_sha256"
PRECISION_PARAMETER = "triagenode.precision"


class TritonRequestError(TriageNodeError):
    """A batch the Triton server did not answer, or answered with the wrong shape."""


def triton_priority(priority: Priority | int) -> int:
    """Triton request priority (1 = most urgent) of a study's triage priority."""
    return _LEVELS[Priority.parse(int(priority))]


def _client_module() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as exc:
        raise ModelLoadError(
            f'model.backend = "triton" needs tritonclient[grpc] ({INSTALL_HINT})'
        ) from exc
    return grpcclient


def _dims(values: list[Any]) -> list[int]:
    return [int(v) for v in values]


class TritonImageEncoder:
    """:class:`~triagenode.inference.backends.base.ImageEncoder` over a Triton model.

    Parameters
    ----------
    settings : triagenode.config.settings.TritonSettings
        ``url``, ``model_name``, ``model_version``, ``timeout_s``, TLS files, ``headers``.
    image_size, embed_dim : int
        What the node's model expects and produces; the server's model must agree.
    weights_sha256 : str, optional
        The node's weights; a model exported from other weights is refused.
    client : optional
        A ``tritonclient.grpc.InferenceServerClient`` (tests); made from ``settings`` if None.

    Raises
    ------
    ModelLoadError
        When the server cannot be reached or its model does not fit the node's.
    """

    backend = "triton"

    def __init__(
        self,
        settings: Any,
        *,
        image_size: int,
        embed_dim: int,
        weights_sha256: str | None = None,
        client: Any = None,
    ) -> None:
        self._grpc = _client_module()
        self.url = settings.url
        self.model_name = settings.model_name
        self.model_version = settings.model_version
        self.timeout_s = float(settings.timeout_s)
        self._headers = {
            name: value.get_secret_value() for name, value in settings.headers.items()
        } or None
        self.image_size = int(image_size)
        self.embed_dim = int(embed_dim)
        self.device = "triton"
        self.precision = "fp32"
        where = f"Triton server {self.url}, model {self.model_name!r}"
        self._where = where
        if client is None:
            try:
                client = self._grpc.InferenceServerClient(
                    self.url,
                    ssl=bool(settings.tls),
                    root_certificates=str(settings.tls_ca) if settings.tls_ca else None,
                    private_key=str(settings.tls_key) if settings.tls_key else None,
                    certificate_chain=str(settings.tls_cert) if settings.tls_cert else None,
                )
            except Exception as exc:
                raise ModelLoadError(f"{where}: cannot create a gRPC client ({exc})") from exc
        self._client = client
        try:
            self._check_model(weights_sha256)
        except BaseException:
            self.close()
            raise

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._client, method)(
                *args, headers=self._headers, client_timeout=self.timeout_s, **kwargs
            )
        except self._grpc.InferenceServerException as exc:
            raise ModelLoadError(f"{self._where}: {what} failed ({exc.message()})") from exc

    def _check_model(self, weights_sha256: str | None) -> None:
        if not self._call("the liveness check (is the server running?)", "is_server_live"):
            raise ModelLoadError(f"{self._where}: the server is not live")
        version = self.model_version
        if not self._call("the model readiness check", "is_model_ready", self.model_name, version):
            wanted = f" version {version}" if version else ""
            raise ModelLoadError(
                f"{self._where}{wanted} is not ready on the server; {self._ready_models()} "
                "(set model.triton.model_name, or load the model written by "
                "`triagenode optimize export-triton`)"
            )
        meta = self._call(
            "reading the model metadata",
            "get_model_metadata",
            self.model_name,
            version,
            as_json=True,
        )
        config = self._call(
            "reading the model config", "get_model_config", self.model_name, version, as_json=True
        ).get("config", {})
        problems = self._contract_problems(meta, config)
        if problems:
            raise ModelLoadError(
                f"{self._where} does not fit this node's model: " + "; ".join(problems)
            )
        self._input = str(meta["inputs"][0]["name"])
        self._output = str(meta["outputs"][0]["name"])
        self.max_batch = int(config.get("max_batch_size", 0))
        parameters = config.get("parameters", {})
        served = parameters.get(WEIGHTS_PARAMETER, {}).get("string_value")
        if weights_sha256 and served and served != weights_sha256:
            raise ModelLoadError(
                f"{self._where} was exported from other weights ({served[:12]} != "
                f"{weights_sha256[:12]}); re-run `triagenode optimize export-triton` and "
                "reload the model on the server"
            )
        if not served:
            log.warning(
                "%s carries no %s parameter: cannot confirm it serves this node's weights",
                self._where,
                WEIGHTS_PARAMETER,
            )
        self.precision = str(parameters.get(PRECISION_PARAMETER, {}).get("string_value", "fp32"))
        levels = int(config.get("dynamic_batching", {}).get("priority_levels", 0) or 0)
        # With fewer levels the scale would be cut arbitrarily: send none (0, the default).
        self._send_priority = levels >= PRIORITY_LEVELS
        if not self._send_priority:
            log.warning(
                "%s has %d priority levels (needs %d): requests go without priority, so stat "
                "studies do not overtake routine ones on the server",
                self._where,
                levels,
                PRIORITY_LEVELS,
            )
        log.info(
            "triton encoder %s: %s -> %s, server max batch %d, %d priority levels",
            self._where,
            self._input,
            self._output,
            self.max_batch,
            levels,
        )

    def _ready_models(self) -> str:
        """The server's ready models, when it lets us list them (often restricted)."""
        try:
            index = self._client.get_model_repository_index(
                headers=self._headers, client_timeout=self.timeout_s, as_json=True
            )
        except self._grpc.InferenceServerException as exc:
            return f"the server does not list its models ({exc.message()})"
        ready = sorted(
            str(m.get("name")) for m in index.get("models", []) if m.get("state") == "READY"
        )
        return f"ready models: {', '.join(ready) or 'none'}"

    def _contract_problems(self, meta: dict[str, Any], config: dict[str, Any]) -> list[str]:
        problems: list[str] = []
        inputs, outputs = meta.get("inputs", []), meta.get("outputs", [])
        size = self.image_size
        if int(config.get("max_batch_size", 0)) < 1:
            problems.append("max_batch_size must be >= 1 (the node sends batches)")
        if len(inputs) != 1 or len(outputs) != 1:
            problems.append(f"needs 1 input and 1 output (has {len(inputs)} and {len(outputs)})")
            return problems
        expected_in, expected_out = [-1, 3, size, size], [-1, self.embed_dim]
        for kind, tensor, expected in (
            ("input", inputs[0], expected_in),
            ("output", outputs[0], expected_out),
        ):
            name, datatype = tensor.get("name"), tensor.get("datatype")
            if datatype != "FP32":
                problems.append(f"{kind} {name!r} is {datatype}, not FP32")
            dims = _dims(tensor.get("shape", []))
            if dims != expected:
                problems.append(f"{kind} {name!r} has shape {dims}, not {expected}")
        return problems

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Unit-norm embeddings ``(N, embed_dim)`` of preprocessed ``(N,3,H,W)`` images."""
        return self.encode_prioritized(images, Priority.routine)

    def encode_prioritized(self, images: np.ndarray, priority: Priority | int) -> np.ndarray:
        """:meth:`encode` sent with the Triton request priority of ``priority``.

        Raises
        ------
        TritonRequestError
            When the server fails the request or answers with another shape.
        """
        images = np.ascontiguousarray(images, dtype=np.float32)
        level = triton_priority(priority) if self._send_priority else 0
        parts = [
            self._infer(images[start : start + self.max_batch], level)
            for start in range(0, len(images), self.max_batch)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _infer(self, batch: np.ndarray, level: int) -> np.ndarray:
        tensor = self._grpc.InferInput(self._input, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        try:
            result = self._client.infer(
                self.model_name,
                [tensor],
                model_version=self.model_version,
                outputs=[self._grpc.InferRequestedOutput(self._output)],
                priority=level,
                headers=self._headers,
                client_timeout=self.timeout_s,
            )
        except self._grpc.InferenceServerException as exc:
            raise TritonRequestError(
                f"{self._where}: a batch of {len(batch)} failed ({exc.message()})"
            ) from exc
        try:
            embeddings = result.as_numpy(self._output)
        except ValueError as exc:  # fewer bytes than the shape it declares
            raise TritonRequestError(
                f"{self._where}: the answer to a batch of {len(batch)} is malformed ({exc})"
            ) from exc
        if embeddings is None or embeddings.shape != (len(batch), self.embed_dim):
            shape = None if embeddings is None else embeddings.shape
            raise TritonRequestError(
                f"{self._where}: answered shape {shape} for a batch of {len(batch)} "
                f"(expected ({len(batch)}, {self.embed_dim}))"
            )
        return np.asarray(embeddings, dtype=np.float32)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:  # closing a broken channel must not hide the first error
                log.debug("closing the Triton client: %s", exc)
