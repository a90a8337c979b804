"""TLS for the receiver (PS3.15 B.1, the BCP 195 profile): server context from settings."""

from __future__ import annotations

import ssl

from triagenode.config.settings import ScpSettings
from triagenode.errors import ConfigError

__all__ = ["server_context"]


def server_context(scp: ScpSettings) -> ssl.SSLContext:
    """An SSL context for accepted associations; peers need a certificate when ``tls_ca``.

    Raises
    ------
    ConfigError
        When the certificate, key or CA file cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(scp.tls_cert), str(scp.tls_key))
        if scp.tls_ca is not None:
            context.load_verify_locations(cafile=str(scp.tls_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"scp.tls_cert/tls_key/tls_ca: cannot load ({exc})") from None
    return context
