"""Where a secret (bearer token, API key) may be sent: https anywhere, plain http only to loopback.

One rule for every client that carries a credential (``mixgrpo pipeline submit`` to the KFP API,
MLflow logging with ``MLFLOW_TRACKING_TOKEN``, the UnifiedReward API key). A cluster-internal
Service reached over plain http inside a NetworkPolicy can be allowed by name with
``$MIXGRPO_PLAIN_HTTP_TOKEN_HOSTS`` (comma-separated host names, e.g. ``unified-reward,mlflow``).
"""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

PLAIN_HTTP_HOSTS_ENV = "MIXGRPO_PLAIN_HTTP_TOKEN_HOSTS"


class InsecureTransportError(ValueError):
    """A secret would travel in clear text to a host that is not this machine."""


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` and ``::1``."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plain_http_allowed_hosts() -> set[str]:
    return {h.strip().lower() for h in os.environ.get(PLAIN_HTTP_HOSTS_ENV, "").split(",") if h.strip()}


def check_secret_transport(url: str, secret: str) -> None:
    """Raise :class:`InsecureTransportError` when ``secret`` (its name) would go to ``url`` over plain
    http to a host other than loopback or one listed in ``$MIXGRPO_PLAIN_HTTP_TOKEN_HOSTS``."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" or is_loopback(host) or host in plain_http_allowed_hosts():
        return
    raise InsecureTransportError(
        f"refusing to send {secret} to {parts.scheme}://{parts.netloc} over plain {parts.scheme or 'http'}: anyone on the "
        f"path can read it. Use https://, or, for a cluster-internal Service behind a NetworkPolicy, list the host "
        f"in ${PLAIN_HTTP_HOSTS_ENV}={host}")
