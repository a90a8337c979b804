"""docs/conformance.md keeps up with the code: every SOP class, transfer syntax, status,
setting and implementation identifier the node uses is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from triagenode.config.settings import Destination, ExportSettings, ScpSettings
from triagenode.scp.status import StoreStatus
from triagenode.store.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

STATEMENT = Path(__file__).parents[1] / "docs" / "conformance.md"


@pytest.fixture(scope="module")
def text() -> str:
    return STATEMENT.read_text(encoding="utf-8")


def test_every_accepted_sop_class_and_transfer_syntax_is_listed(text: str) -> None:
    listed = set(re.findall(r"`([0-9.]+)`", text))
    storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    assert storage - listed == set()
    assert set(map(str, ALL_TRANSFER_SYNTAXES)) - listed == set()
    assert "1.2.840.10008.1.1" in listed  # Verification


def test_every_status_and_setting_is_described(text: str) -> None:
    statuses = {f"`{int(s):04X}`" for s in StoreStatus}
    assert {s for s in statuses if s not in text} == set()
    for section, model in (("scp", ScpSettings), ("export", ExportSettings)):
        missing = [k for k in model.model_fields if f"`{k}`" not in text]
        assert missing == [], f"{section}.{missing} not in {STATEMENT.name}"
    assert [k for k in Destination.model_fields if f"`{k}`" not in text] == []


def test_implementation_identifiers_are_the_codes(text: str) -> None:
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in text
    assert f"`{IMPLEMENTATION_VERSION_NAME}`" in text
