"""The <name>-credentials Secret: Redis user and password, and the slot-signing key.

Generated once, on first sight of the Organism, and then only ever completed (a missing key is added)
-- never regenerated, so a resync or an operator restart cannot rotate credentials by accident.
Randomness comes from the caller (`generate`) so the builders stay pure and testable.
"""
from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from typing import Any

from ..model import Organism
from ..redis_admin import acl_username
from .naming import PASSWORD_KEY, SIGNING_KEY_KEY, USERNAME_KEY, labels, secret_name


def redis_username(org: Organism) -> str:
    """The Redis user the pods log in as: one ACL user per Organism on the shared Redis."""
    if org.redis is not None and org.redis.mode == "shared":
        return acl_username(org.namespace, org.name)
    return "default"


def generate(org: Organism) -> dict[str, str]:
    """Fresh credentials: 256-bit password and signing key, hex (safe in redis.conf and env)."""
    return {
        USERNAME_KEY: redis_username(org),
        PASSWORD_KEY: secrets.token_hex(32),
        SIGNING_KEY_KEY: secrets.token_hex(32),
    }


def encode(values: Mapping[str, str]) -> dict[str, str]:
    return {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}


def decode(data: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (data or {}).items():
        try:
            out[k] = base64.b64decode(v).decode()
        except (ValueError, UnicodeDecodeError):
            out[k] = ""
    return out


def credentials_secret(org: Organism, values: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(org.name),
            "namespace": org.namespace,
            "labels": labels(org.name, "credentials"),
            "ownerReferences": [org.owner_reference],
        },
        "data": encode(values),
    }


def completion(org: Organism, current: Mapping[str, str], generated: Mapping[str, str]) -> dict[str, str]:
    """The keys to (re)write in an existing Secret: missing ones, and the user name when the Redis mode
    requires another one. Existing passwords and signing keys are never replaced."""
    changes = {k: v for k, v in generated.items() if not current.get(k)}
    wanted_user = redis_username(org)
    if current.get(USERNAME_KEY) and current[USERNAME_KEY] != wanted_user:
        changes[USERNAME_KEY] = wanted_user
    return changes
