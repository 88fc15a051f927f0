"""The CA certificate of a TLS Redis, as a file in the pump and worker pods.

Where the Organism's Redis speaks TLS with a private CA, the pods verify its certificate against that
CA instead of their image's system trust store:

- external Redis: `spec.backend.redis.external.caSecretRef` names a Secret key of the user's;
- shared Redis: the operator's own CA file (XPO_SHARED_REDIS_CA_FILE), copied into each Organism's
  `<name>-credentials` Secret under `ca.crt` (and into its binding, desired/binding.py).

Either way the pods mount that one key read-only at CA_PATH (a Secret volume with a single item) and
organism.yaml names the path (`backend.redis_ca_cert`; a path is not a secret, the ConfigMap may hold
it). The kubelet updates a mounted Secret in place; the library's connection pool reads the file at
each new connection, its pipe and a worker's own connection when the process starts. A dedicated Redis
speaks plain TCP inside the namespace: no CA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..model import Organism
from ..settings import OperatorSettings
from .naming import secret_name

#: The key of the CA in the credentials and binding Secrets, and the file name in the pods.
CA_KEY = "ca.crt"
CA_VOLUME = "redis-ca"
CA_DIR = "/etc/xml-pipeline/redis-ca"
CA_PATH = f"{CA_DIR}/{CA_KEY}"


@dataclass(frozen=True)
class CaSource:
    """The Secret key the pods' CA file is projected from."""

    secret: str
    key: str


def ca_source(org: Organism, settings: OperatorSettings) -> CaSource | None:
    """Where the pods' CA comes from, or None (plain Redis, or the system trust store)."""
    if org.redis is None:
        return None
    if org.redis.mode == "external" and org.redis.external is not None and org.redis.external.ca is not None:
        return CaSource(org.redis.external.ca.name, org.redis.external.ca.key)
    if org.redis.mode == "shared" and settings.shared_redis_ca:
        return CaSource(secret_name(org.name), CA_KEY)
    return None


def ca_volume(source: CaSource) -> dict[str, Any]:
    """Only the CA key of the Secret becomes a file (never the passwords beside it)."""
    return {"name": CA_VOLUME, "secret": {"secretName": source.secret,
                                          "items": [{"key": source.key, "path": CA_KEY}]}}


def ca_mount() -> dict[str, Any]:
    return {"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True}
