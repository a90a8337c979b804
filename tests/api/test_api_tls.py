"""HTTPS for the admin API (api.tls_cert, api.tls_key, api.tls_client_ca) on a real server,
with a certificate authority, server and client certificates made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.api_support import ApiWorld, build_world, serving
from triagenode.errors import ConfigError
from triagenode.store import migrate
from triagenode.store.db import Database


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    folder: Path,
    stem: str,
    common: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(issuer[0].subject if issuer else _name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    signer = issuer[1] if issuer else key
    cert = builder.sign(signer, hashes.SHA256())
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca", "triagenode test CA", None, None)
    _issue(folder, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    _issue(folder, "client", "auditor workstation", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    other = _issue(folder, "other-ca", "someone else's CA", None, None)
    _issue(folder, "stranger", "stranger", other, ExtendedKeyUsageOID.CLIENT_AUTH)
    return folder


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    # TLS is the server's business, not the database's: SQLite only
    database = Database(f"sqlite:///{tmp_path / 'api.sqlite3'}")
    migrate.upgrade(database)
    yield database
    database.dispose()


def _serve(world: ApiWorld) -> Iterator[str]:
    with serving(world.app) as address:
        yield address


@pytest.fixture
def https(make_settings, sqlite_db: Database, pki: Path) -> Iterator[tuple[ApiWorld, str]]:
    settings = make_settings(
        api={"tls_cert": str(pki / "server.crt"), "tls_key": str(pki / "server.key")}
    )
    world = build_world(settings, sqlite_db)
    for address in _serve(world):
        yield world, address


@pytest.fixture
def mutual(make_settings, sqlite_db: Database, pki: Path) -> Iterator[tuple[ApiWorld, str]]:
    settings = make_settings(
        api={
            "tls_cert": str(pki / "server.crt"),
            "tls_key": str(pki / "server.key"),
            "tls_client_ca": str(pki / "ca.crt"),
        }
    )
    world = build_world(settings, sqlite_db)
    for address in _serve(world):
        yield world, address


def _context(pki: Path, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client is not None:
        context.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return context


def test_api_serves_https_only(https: tuple[ApiWorld, str], pki: Path) -> None:
    world, address = https
    with httpx.Client(verify=_context(pki), timeout=10) as client:
        assert client.get(f"https://{address}/healthz").json() == {"status": "ok"}
        studies = client.get(f"https://{address}/api/v1/studies", headers=world.auth("auditor"))
        assert studies.status_code == 200
    with httpx.Client(timeout=10) as plain, pytest.raises(httpx.TransportError):
        plain.get(f"http://{address}/healthz")
    # the node's certificate is checked by the client: without the CA it is refused
    with httpx.Client(timeout=10) as client, pytest.raises(httpx.ConnectError):
        client.get(f"https://{address}/healthz")


def test_client_certificates_are_required_with_a_client_ca(
    mutual: tuple[ApiWorld, str], pki: Path
) -> None:
    _world, address = mutual
    with httpx.Client(verify=_context(pki, "client"), timeout=10) as client:
        assert client.get(f"https://{address}/healthz").status_code == 200
    for who in (None, "stranger"):
        with (
            httpx.Client(verify=_context(pki, who), timeout=10) as client,
            pytest.raises(httpx.TransportError),
        ):
            client.get(f"https://{address}/healthz")


def test_tls_settings_must_be_complete(make_settings, pki: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        make_settings(api={"tls_cert": str(pki / "server.crt")})
    with pytest.raises(ConfigError, match="tls_client_ca needs tls_cert"):
        make_settings(api={"tls_client_ca": str(pki / "ca.crt")})
    with pytest.raises(ConfigError, match=r"tls_key: .* is not a readable file"):
        make_settings(
            api={"tls_cert": str(pki / "server.crt"), "tls_key": str(pki / "missing.key")}
        )
