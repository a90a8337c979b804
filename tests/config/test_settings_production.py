"""``node.environment = "production"``: no open DICOM port by default, no placeholder secrets."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from triagenode.config.settings import load_settings, placeholder_secret_problem
from triagenode.errors import ConfigError

GOOD_SECRET = "Qx7_vR2mK9pL4sT8wZ1nB6cF3hJ0dG5yU-aE"  # 36 base64url characters, 216 bits


def _production(tmp_path: Path, **sections: Any):  # type: ignore[no-untyped-def]
    base: dict[str, Any] = {
        "node": {"data_dir": str(tmp_path), "environment": "production"},
        "model": {"source": "local-dir:/models/biomedclip"},
        "scp": {"allowed_calling_aets": ["CT1", "PACS"]},
        "audit": {"secret": secrets.token_urlsafe(32)},
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return load_settings(None, **base)


def test_production_refuses_any_calling_ae_unless_said_explicitly(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"scp\.allowed_calling_aets: empty.*allow_any_calling_ae"
    ):
        _production(tmp_path, scp={"allowed_calling_aets": []})
    allowed = _production(tmp_path, scp={"allowed_calling_aets": [], "allow_any_calling_ae": True})
    assert allowed.scp.allowed_calling_aets == []
    assert _production(tmp_path).scp.allowed_calling_aets == ["CT1", "PACS"]
    # development keeps the demo easy: any calling AE, no question asked
    assert load_settings(None, node={"data_dir": str(tmp_path)}).scp.allowed_calling_aets == []


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ("changeme-changeme-changeme-changeme-1234", "placeholder"),
        ("CHANGEME0123456789abcdefghijklmnopqrstuv", "placeholder"),
        ("a" * 64, "repeats characters"),
        ("abababababababababababababababababab", "repeats characters"),
        ("0123456789012345678901234567890123456789", "bits of entropy"),
        ("Correct-Horse-Battery-Staple-1", "bits of entropy"),
        (secrets.token_hex(16), "bits of entropy"),
    ],
    ids=["changeme", "changeme-upper", "one-char", "two-chars", "digits", "short", "hex-16"],
)
def test_production_refuses_placeholder_secrets(tmp_path: Path, secret: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _production(tmp_path, audit={"secret": secret})
    message = str(refused.value)
    assert message.startswith("audit.secret: ") or "audit.secret: " in message
    assert words in message
    assert secret not in message  # a refused secret is still never echoed
    # the same value is accepted while developing
    load_settings(None, node={"data_dir": str(tmp_path)}, audit={"secret": secret})


@pytest.mark.parametrize(
    "secret",
    [secrets.token_urlsafe(32), secrets.token_hex(32), secrets.token_hex(32).upper()],
    ids=["token_urlsafe-32", "token_hex-32", "token_hex-32-upper"],
)
def test_random_secrets_pass(tmp_path: Path, secret: str) -> None:
    assert placeholder_secret_problem(secret) is None
    assert _production(tmp_path, audit={"secret": secret}).audit.secret is not None


def test_no_secret_means_a_random_key_file_and_is_fine(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        node={"data_dir": str(tmp_path), "environment": "production"},
        model={"source": "local-dir:/models/biomedclip"},
        scp={"allowed_calling_aets": ["CT1"]},
    )
    assert settings.audit.secret is None
    assert placeholder_secret_problem(GOOD_SECRET) is not None  # 216 bits: too few
