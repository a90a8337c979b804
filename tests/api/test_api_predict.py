"""Research endpoints with a small real predictor on the demo model (no downloads)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests import factory
from tests.api_support import build_world
from tests.hostile import deflated_dicom_bomb, png_bomb
from triagenode.api import ApiServices, Predictor
from triagenode.api.uploads import ImageLimits, decode_picture, reduce_factor
from triagenode.config.settings import load_settings
from triagenode.store import migrate
from triagenode.store.db import Database

LABEL_SETS = {"chest": ["pneumothorax", "pleural effusion", "no finding"]}


class DemoPredictor:
    """The protocol implemented the plain way on the demo model: encode, compare, softmax."""

    def __init__(self) -> None:
        from triagenode.inference.model import load_model

        self.model = load_model("demo")

    def _pixels(self, image: np.ndarray | bytes) -> np.ndarray:
        from triagenode.inference.preprocess import preprocess_dataset, preprocess_pixels

        if isinstance(image, bytes):
            import pydicom

            return preprocess_dataset(pydicom.dcmread(io.BytesIO(image)), self.model.preprocess)
        scale = 65535.0 if image.dtype == np.uint16 else 255.0
        return preprocess_pixels(image.astype(np.float32) / scale, self.model.preprocess)

    def predict(
        self, images: list[np.ndarray | bytes], queries: list[str] | None, label_set: str | None
    ) -> list[dict[str, Any]]:
        import torch

        if queries is None:
            if label_set not in LABEL_SETS:
                raise ValueError(f"label set {label_set!r}: unknown; known: {sorted(LABEL_SETS)}")
            queries = LABEL_SETS[label_set]
        text = self.model.encode_text(queries)
        batch = torch.from_numpy(np.stack([self._pixels(i) for i in images]))
        with torch.inference_mode():
            features = self.model.clip.encode_image(batch, normalize=True).numpy()
        similarities = features @ text.T
        logits = self.model.logit_scale * similarities
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return [
            {
                "labels": queries,
                "similarities": similarities[i],
                "probabilities": probabilities[i],
                "model": self.model.identity.display_name,
                "warning": self.model.warning,
            }
            for i in range(len(images))
        ]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, dict[str, str]]:
    folder = tmp_path_factory.mktemp("predict")
    settings = load_settings(
        None, node={"data_dir": str(folder)}, audit={"secret": "predict-secret-0123456789"}
    )
    database = Database(f"sqlite:///{folder / 'api.sqlite3'}")
    migrate.upgrade(database)
    predictor = DemoPredictor()
    assert isinstance(predictor, Predictor)
    world = build_world(settings, database, ApiServices(predictor=predictor))
    return TestClient(world.app), world.auth("operator")


def _png(mode: str = "L", fmt: str = "PNG") -> str:
    rng = np.random.default_rng(7)
    shape = (64, 64) if mode == "L" else (64, 64, 3)
    image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _dicom(tmp_path: Path) -> str:
    ds = factory.ct_slice("1.2.3.4", "1.2.3.4.1", 1)
    path = factory.write(ds, tmp_path / "ct.dcm")
    return base64.b64encode(path.read_bytes()).decode()


def test_predict_one_png_with_queries(client: tuple[TestClient, dict[str, str]]) -> None:
    http, headers = client
    answer = http.post(
        "/api/v1/predict",
        json={"image": _png(), "queries": ["a chest x-ray", "a brain MRI"]},
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    (result,) = answer.json()["results"]
    assert result["labels"] == ["a chest x-ray", "a brain MRI"]
    assert len(result["similarities"]) == 2
    assert all(-1.0 <= s <= 1.0 for s in result["similarities"])
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert result["warning"] == "DEMO, NOT FOR CLINICAL USE"
    again = http.post(
        "/api/v1/predict",
        json={"image": _png(), "queries": ["a chest x-ray", "a brain MRI"]},
        headers=headers,
    )
    assert again.json() == answer.json()  # deterministic


def test_batch_predict_png_jpeg_and_dicom(
    client: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    http, headers = client
    images = [_png(), _png("RGB", "JPEG"), _dicom(tmp_path)]
    answer = http.post(
        "/api/v1/batch-predict", json={"images": images, "label_set": "chest"}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 3
    for result in results:
        assert result["labels"] == LABEL_SETS["chest"]
        assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"image": "not base64!", "queries": ["x"]}, 422, "bad-image"),
        ({"image": base64.b64encode(b"GIF89a...").decode(), "queries": ["x"]}, 422, "bad-image"),
        (
            {"image": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode(), "queries": ["x"]},
            422,
            "bad-image",
        ),
        ({"image": "AAAA"}, 422, "invalid-request"),
        ({"image": "AAAA", "queries": ["x"], "extra": 1}, 422, "invalid-request"),
    ],
    ids=["not-base64", "gif", "broken-png", "no-queries", "unknown-field"],
)
def test_bad_requests_are_problems(
    client: tuple[TestClient, dict[str, str]], body: dict[str, Any], status: int, slug: str
) -> None:
    http, headers = client
    answer = http.post("/api/v1/predict", json=body, headers=headers)
    assert answer.status_code == status
    assert answer.json()["type"] == f"urn:triagenode:problem:{slug}"


def test_unknown_label_set(client: tuple[TestClient, dict[str, str]]) -> None:
    http, headers = client
    answer = http.post(
        "/api/v1/batch-predict", json={"images": [_png()], "label_set": "brain"}, headers=headers
    )
    assert answer.status_code == 422
    assert "brain" in answer.json()["detail"]


# Hostile images: measured from their headers and refused before anything is decoded ------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _ct_declaring(tmp_path: Path, **header: int) -> str:
    ds = factory.ct_slice("1.2.3.4", "1.2.3.4.1", 1)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    return _b64(factory.write(ds, tmp_path / "declares.dcm").read_bytes())


@pytest.mark.parametrize(("width", "height"), [(13000, 13000), (20000, 20000), (30001, 1000)])
def test_huge_png_is_refused_from_its_header(
    client: tuple[TestClient, dict[str, str]], width: int, height: int
) -> None:
    http, headers = client
    # only the first row of pixel data is present: a 413 (not "cannot be decoded") proves
    # the size was read from the header and nothing was decoded
    image = _b64(png_bomb(width, height, complete=False))
    answer = http.post("/api/v1/predict", json={"image": image, "queries": ["x"]}, headers=headers)
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["type"] == "urn:triagenode:problem:image-too-large"
    assert f"{width}x{height}" in problem["detail"]
    assert "api.max_image_pixels" in problem["detail"]


def test_deflated_dicom_bomb_is_refused_while_inflating(
    client: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    http, headers = client
    bomb = deflated_dicom_bomb(200 * 1024 * 1024)  # 0.2 MB that inflates to 200 MiB
    assert len(bomb) < 300_000
    answer = http.post(
        "/api/v1/batch-predict",
        json={"images": [_png(), _b64(bomb)], "label_set": "chest"},
        headers=headers,
    )
    assert answer.status_code == 413, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith("image 1:") and "api.max_inflated_bytes" in detail


def test_small_deflated_dicom_is_scored(
    client: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    http, headers = client
    ds = factory.ct_slice("1.2.3.4", "1.2.3.4.1", 1)
    path = factory.write(ds, tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    answer = http.post(
        "/api/v1/predict",
        json={"image": _b64(path.read_bytes()), "label_set": "chest"},
        headers=headers,
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    ("header", "status", "words"),
    [
        ({"Rows": 20000, "Columns": 20000}, 413, "20000x20000"),
        ({"NumberOfFrames": 100000}, 413, "api.max_frames"),
        ({"BitsAllocated": 12}, 422, "BitsAllocated"),
    ],
    ids=["pixels", "frames", "bits"],
)
def test_dicom_header_limits(
    client: tuple[TestClient, dict[str, str]],
    tmp_path: Path,
    header: dict[str, int],
    status: int,
    words: str,
) -> None:
    http, headers = client
    answer = http.post(
        "/api/v1/predict",
        json={"image": _ct_declaring(tmp_path, **header), "queries": ["x"]},
        headers=headers,
    )
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]


def test_large_pictures_are_reduced_while_decoding() -> None:
    limits = ImageLimits(max_pixels=30_000_000, max_frames=10, max_inflated_bytes=1 << 20)
    rng = np.random.default_rng(3)
    grey = Image.fromarray(rng.integers(0, 255, (2100, 4100), dtype=np.uint8), "L")
    sixteen = Image.fromarray(rng.integers(0, 65535, (2100, 3000), dtype=np.uint16))
    colour = Image.fromarray(rng.integers(0, 255, (4500, 4200, 3), dtype=np.uint8), "RGB")
    small = Image.fromarray(rng.integers(0, 255, (300, 200), dtype=np.uint8), "L")
    cases = [
        (grey, "PNG", (525, 1025)),
        (sixteen, "PNG", (525, 750)),
        (small, "PNG", (300, 200)),
    ]
    for image, fmt, shape in [*cases, (colour, "JPEG", None)]:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        pixels = decode_picture(buffer.getvalue(), limits)
        if shape is not None:
            assert pixels.shape == shape
        else:  # JPEG: the decoder's own 1/2 ... 1/8 scaling, never below the kept side
            assert pixels.shape[2] == 3 and 512 <= min(pixels.shape[:2]) < 1024
    assert decode_picture(_png_bytes(sixteen), limits).dtype == np.uint16


@pytest.mark.parametrize(
    ("size", "factor"),
    [((300, 200), 1), ((1023, 1023), 1), ((1024, 1024), 2), ((6000, 5000), 9), ((1000, 30000), 3)],
)
def test_reduce_factor(size: tuple[int, int], factor: int) -> None:
    # the shortest side is kept at 512 or more; a long thin picture goes to about 4 M pixels
    # while its shortest side stays at 256 or more
    assert reduce_factor(*size) == factor


def test_a_batch_holds_a_bounded_number_of_decoded_bytes(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path)},
        audit={"secret": "predict-secret-0123456789"},
        api={"max_decoded_bytes": 2 * 1024 * 1024},
    )
    database = Database(f"sqlite:///{tmp_path / 'api.sqlite3'}")
    migrate.upgrade(database)
    world = build_world(settings, database, ApiServices(predictor=DemoPredictor()))
    rng = np.random.default_rng(5)
    # 1000x1000 grey is kept whole (shortest side under 1024): 1 MB each after decoding
    image = _b64(_png_bytes(Image.fromarray(rng.integers(0, 255, (1000, 1000), dtype=np.uint8))))
    http = TestClient(world.app)
    headers = world.auth("operator")
    two = http.post(
        "/api/v1/batch-predict", json={"images": [image] * 2, "queries": ["x"]}, headers=headers
    )
    assert two.status_code == 200, two.text
    three = http.post(
        "/api/v1/batch-predict", json={"images": [image] * 3, "queries": ["x"]}, headers=headers
    )
    assert three.status_code == 413
    assert three.json()["detail"].startswith("image 2: images 0-2 together hold 3000000 bytes")
    assert "api.max_decoded_bytes" in three.json()["detail"]
    database.dispose()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_answers_busy_when_every_slot_is_taken(
    client: tuple[TestClient, dict[str, str]],
) -> None:
    http, headers = client
    slots = http.app.state.predict_slots  # type: ignore[attr-defined]
    assert slots.size == 2
    with slots, slots:
        answer = http.post(
            "/api/v1/predict", json={"image": _png(), "queries": ["x"]}, headers=headers
        )
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert answer.json()["type"] == "urn:triagenode:problem:busy"
    again = http.post("/api/v1/predict", json={"image": _png(), "queries": ["x"]}, headers=headers)
    assert again.status_code == 200  # the slots were given back


@pytest.mark.parametrize("side", [10000, 60000])
def test_huge_jpeg_is_refused_from_its_header(
    client: tuple[TestClient, dict[str, str]], side: int
) -> None:
    # a 16x16 JPEG whose frame header (SOF0) is rewritten to declare side x side pixels
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = side.to_bytes(2, "big") * 2
    http, headers = client
    answer = http.post(
        "/api/v1/predict", json={"image": _b64(bytes(data)), "queries": ["x"]}, headers=headers
    )
    assert answer.status_code == 413, answer.text
    assert "api.max_image_pixels" in answer.json()["detail"]
