"""A small, thread-safe Kubernetes API facade over the official client, speaking plain dicts.

Why not the typed `kubernetes.client.*Api` classes: their models rename fields (camelCase ->
snake_case) and drop unknown ones, which makes "compare desired with actual" error-prone. Here
requests go through the client's ApiClient (auth, TLS, connection pool) and bodies stay exactly as
the API server spells them. One ApiClient is shared by all handler threads (urllib3 pools are
thread-safe), so handlers reuse connections.
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any
from urllib.parse import quote

import kubernetes

from . import GROUP, VERSION

#: kind -> (API prefix, plural). Only what the operator touches (see rbac.RULES).
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": ("/apis/keda.sh/v1alpha1", "scaledobjects"),
    "TriggerAuthentication": ("/apis/keda.sh/v1alpha1", "triggerauthentications"),
    "Organism": (f"/apis/{GROUP}/{VERSION}", "organisms"),
    # Cluster-scoped (namespace ""): the client-pod webhook's configuration, for its caBundle.
    "MutatingWebhookConfiguration": ("/apis/admissionregistration.k8s.io/v1", "mutatingwebhookconfigurations"),
}

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer. The message carries the API's reason, never a request body (may hold secrets).

    Callers catch the subclass they can handle (NotFound, Conflict, Gone, Forbidden, Invalid); any
    other status is a plain ApiError. `api_error()` picks the class for a status."""

    status: int = 0

    def __init__(self, status: int, method: str, path: str, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{method} {path}: HTTP {status} {reason}")


class NotFound(ApiError):
    """404: the object (or its namespace) does not exist."""


class Conflict(ApiError):
    """409: already exists, a resourceVersion/uid precondition failed, or a field manager conflict."""


class Gone(ApiError):
    """410: a watch or list continuation expired."""


class Forbidden(ApiError):
    """403: RBAC refused the request (or an admission webhook did)."""


class Invalid(ApiError):
    """422: the API server's validation (schema, CEL) refused the object."""


_ERRORS: dict[int, type[ApiError]] = {403: Forbidden, 404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}


def api_error(status: int, method: str, path: str, reason: str) -> ApiError:
    """The ApiError subclass for `status` (ApiError itself for statuses without one)."""
    return _ERRORS.get(status, ApiError)(status, method, path, reason)


class Kube:
    """get/create/patch/delete of namespaced objects by kind. Counts requests (for /metrics and tests)."""

    def __init__(self, api_client: kubernetes.client.ApiClient | None = None) -> None:
        self._client = api_client
        self._init_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()  # (verb, kind) -> count

    @property
    def client(self) -> kubernetes.client.ApiClient:
        # Lazy: kopf logs in after handlers are registered; credentials are read at first use.
        if self._client is None:
            with self._init_lock:
                if self._client is None:
                    self._client = kubernetes.client.ApiClient(load_configuration())
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- verbs ----------------------------------------------------------------------------------
    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", _path(kind, namespace, name), kind=kind, verb="get")
        except NotFound:
            return None

    def list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """Every object of `kind` in `namespace` (one page; `items` of the list)."""
        found = self._call("GET", _path(kind, namespace), kind=kind, verb="list")
        return list(found.get("items") or [])

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", _path(kind, namespace), body=body, kind=kind, verb="create")

    def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any], *,
              subresource: str | None = None) -> dict[str, Any]:
        path = _path(kind, namespace, name) + (f"/{subresource}" if subresource else "")
        return self._call("PATCH", path, body=patch, content_type=MERGE_PATCH, kind=kind,
                          verb="patch" if not subresource else f"patch/{subresource}")

    def delete(self, kind: str, namespace: str, name: str, *, uid: str | None = None) -> None:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}  # delete exactly the object we inspected
        try:
            self._call("DELETE", _path(kind, namespace, name), body=body, kind=kind, verb="delete")
        except (NotFound, Conflict):  # gone already, or replaced since (uid precondition)
            pass

    def serves(self, group_version: str, plural: str) -> bool:
        """Does the API server serve `plural` in `group_version` (e.g. KEDA's CRDs installed)?

        API discovery: every authenticated client may read it, no RBAC rule needed."""
        try:
            found = self._call("GET", f"/apis/{group_version}", kind="discovery", verb="get")
        except ApiError as e:
            if e.status in (404, 503):
                return False
            raise
        return any(r.get("name") == plural for r in found.get("resources") or [])

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, method: str, path: str, *, kind: str, verb: str, body: Any = None,
              content_type: str = "application/json") -> dict[str, Any]:
        with self._count_lock:
            self.requests[(verb, kind)] += 1
        client = self.client
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        req = client.param_serialize(method, path, header_params=headers, body=body,
                                     auth_settings=["BearerToken"])
        response = client.call_api(*req, _request_timeout=(10, 60))
        data = response.read()
        if not 200 <= response.status <= 299:
            raise api_error(response.status, method, path, _reason(data, response.reason))
        return json.loads(data) if data else {}

    @property
    def writes(self) -> int:
        with self._count_lock:
            return sum(n for (verb, _), n in self.requests.items() if verb != "get")


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=cfg)
    return cfg


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{quote(name, safe='')}" if name else path


def _reason(data: bytes | None, fallback: str | None) -> str:
    try:
        status = json.loads(data or b"")
        reason, message = status.get("reason") or fallback or "", str(status.get("message") or "")[:300]
        return f"{reason}: {message}" if message else str(reason)
    except (ValueError, AttributeError):
        return str(fallback or "")
