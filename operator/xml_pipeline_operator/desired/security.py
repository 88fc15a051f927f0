"""Pod Security "restricted" settings for every pod the operator creates."""
from __future__ import annotations

from typing import Any

#: uid/gid of the xml-pipeline image's unprivileged user (the Dockerfile creates it with these ids).
APP_UID = 10001
APP_GID = 10001
#: uid/gid of the `redis` user in the official redis:*-alpine images.
REDIS_UID = 999
REDIS_GID = 1000


def _ids(uid: int, gid: int, fixed: bool, *, fs_group: bool) -> dict[str, Any]:
    if not fixed:
        return {}
    ids: dict[str, Any] = {"runAsUser": uid, "runAsGroup": gid}
    if fs_group:
        ids["fsGroup"] = gid
    return ids


# `fixed=False` (XPO_POD_USER_IDS=platform) leaves runAsUser, runAsGroup and fsGroup out for a
# platform that assigns them per namespace (OpenShift's restricted SCC rejects fixed ids outside the
# namespace's range). runAsNonRoot and the rest of the restricted settings stay either way.
def pod_security_context(uid: int, gid: int, *, fixed: bool = True) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        **_ids(uid, gid, fixed, fs_group=True),
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(uid: int, gid: int, *, fixed: bool = True) -> dict[str, Any]:
    # Repeated at container level so the container stays restricted even if copied out of this pod.
    return {
        "runAsNonRoot": True,
        **_ids(uid, gid, fixed, fs_group=False),
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
