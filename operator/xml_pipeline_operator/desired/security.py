"""Pod Security "restricted" settings for every pod the operator creates."""
from __future__ import annotations

from typing import Any

#: uid/gid of the xml-pipeline image's unprivileged user (the Dockerfile creates it with these ids).
APP_UID = 10001
APP_GID = 10001
#: uid/gid of the `redis` user in the official redis:*-alpine images.
REDIS_UID = 999
REDIS_GID = 1000


def pod_security_context(uid: int, gid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "fsGroup": gid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(uid: int, gid: int) -> dict[str, Any]:
    # Repeated at container level so the container stays restricted even if copied out of this pod.
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": gid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_basics() -> dict[str, Any]:
    """Pod fields that keep the environment and the API surface minimal."""
    return {
        # The pods never talk to the Kubernetes API.
        "automountServiceAccountToken": False,
        # No <SERVICE>_PORT variables: the container environment is exactly the XP_* contract.
        "enableServiceLinks": False,
    }
