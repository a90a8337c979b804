"""``[model.triton]`` settings: accepted values, and errors that name the key (no
tritonclient needed), plus the error when tritonclient is missing."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from triagenode.config.settings import load_settings
from triagenode.errors import ConfigError, ModelLoadError


def _load(tmp_path: Path, triton: str) -> object:
    path = tmp_path / "triagenode.toml"
    path.write_text(f'[model]\nbackend = "triton"\n[model.triton]\n{triton}\n')
    return load_settings(path)


def test_triton_settings_from_the_file_and_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRIAGENODE_MODEL__TRITON__TIMEOUT_S", "5")
    settings = _load(
        tmp_path,
        'url = "[::1]:8001"\nmodel_name = "pool_vit.v2"\nmodel_version = "3"\n'
        'headers = { authorization = "Bearer abc", "x-site" = "north" }',
    )
    triton = settings.model.triton  # type: ignore[attr-defined]
    assert (triton.url, triton.model_name) == ("[::1]:8001", "pool_vit.v2")
    assert triton.model_version == "3" and triton.timeout_s == 5.0
    assert triton.headers["authorization"].get_secret_value() == "Bearer abc"
    assert "Bearer abc" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('url = "grpc://triton:8001"', "model.triton.url: must be host:port"),
        ('url = "triton"', "model.triton.url: must be host:port"),
        ('url = "triton:70000"', "model.triton.url: must be host:port"),
        ('model_name = "../etc"', "model.triton.model_name: must be 1-128 characters"),
        ('model_version = "latest"', "model.triton.model_version: must be empty or a positive"),
        ("timeout_s = 0", "model.triton.timeout_s"),
        ('tls_ca = "/ca.pem"', "tls_ca/tls_cert/tls_key are set but tls = false"),
        ('tls = true\ntls_cert = "/c.pem"', "tls_cert and tls_key go together"),
        ('headers = { "grpc-timeout" = "1" }', "header name 'grpc-timeout'"),
        ('headers = { token = "a\\nb" }', "header 'token': the value must be printable ASCII"),
        ('modelname = "x"', "model.triton.modelname: unknown key"),
    ],
)
def test_bad_triton_settings_name_the_key(tmp_path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match="(?s)" + expected.replace("(", r"\(")):
        _load(tmp_path, text)


def test_a_header_value_is_not_echoed_in_the_error(tmp_path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, 'headers = { authorization = "Bearer s3cret\\u0007" }')
    assert "s3cret" not in str(caught.value)


def test_without_tritonclient_the_error_names_the_extra(monkeypatch) -> None:
    from triagenode.config.settings import ModelSettings
    from triagenode.inference.backends.select import select_backend

    model = SimpleNamespace(
        preprocess=SimpleNamespace(image_size=224),
        embed_dim=512,
        identity=SimpleNamespace(weights_sha256="0" * 64),
    )
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # import fails
    with pytest.raises(ModelLoadError, match=r"pip install 'triagenode\[triton\]'"):
        select_backend(ModelSettings(source="demo", backend="triton"), None, model)
