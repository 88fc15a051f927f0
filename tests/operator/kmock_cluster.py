"""`Cluster`: kmock's KubernetesEmulator with the few API-server behaviours kopf and the operator need.

Stock kmock 0.8 stores request bodies and merges patches, nothing more. This subclass adds:
  * metadata.uid, creationTimestamp, namespace (from the URL), generateName, generation and a monotonically
    increasing resourceVersion -- kopf's finalizer patch tests the resourceVersion, and its
    consistency tracking needs it to change;
  * generation + 1 when a patch touches `spec` (observedGeneration logic depends on it);
  * 201 on create, 422 (not 500) when a JSON patch's `test` operation fails;
  * list resourceVersion, and watches that honour ?resourceVersion=N instead of replaying everything;
  * `cluster.history`: the full request log (kmock's own keeps only requests in flight: its
    reaction matching re-filters that log on every request, which is quadratic);
  * the status of every answer (`cluster.status_of(request)`);
  * 403 on /api/v1/namespaces (kmock cannot parse that URL; kopf falls back to the given namespaces);
  * fault injection: `cluster.faults.append(fn)`, where fn(request) returns an HTTP status to fail
    that request with, or None.
What it still does NOT emulate (tests must not rely on it): label/field selectors, 409 on stale
resourceVersions, server-side apply / strategic merge (all patches are merge patches), status
subresource isolation, schema validation and defaulting, ownerReference garbage collection,
Secret stringData, Service clusterIP, and every controller (Deployments never get a status unless a
test writes one).
"""
from __future__ import annotations

import contextlib
import datetime
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock

Fault = Callable[[kmock.Request], "int | None"]


@attrs.define(kw_only=True)
class Cluster(kmock.KubernetesEmulator):
    _rv: int = attrs.field(default=100, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    #: Every request served, in order. Use this instead of iterating the emulator: see _handle.
    history: list[kmock.Request] = attrs.field(factory=list, init=False)
    #: HTTP status answered to each request, by id(request) (kmock records requests, not responses).
    statuses: dict[int, int] = attrs.field(factory=dict, init=False)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock 0.8 cannot parse the cluster-scoped collection URL /api/v1/namespaces (500). Answer
        # what an API server says to an operator without RBAC on namespaces: 403. kopf then falls
        # back to the namespaces it was given, as it does in a cluster without that permission.
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 403, "reason": "Forbidden",
                 "message": "namespaces is forbidden (emulated: kmock cannot serve this URL)"}, status=403)
        return await super().__call__(raw_request)

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        try:
            obj = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return None
        return None if obj.deleted else obj.raw

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock matches every request against its reactions by re-filtering its whole request log,
        # which makes each request O(requests so far): after a few thousand requests, each one takes
        # a second. So kmock's own log holds only the requests in flight (the matching needs those);
        # the full log is `history`.
        self.history.append(request)
        try:
            response = await self._handle_realistically(request)
        except kmock.KubernetesError as e:
            self.statuses[id(request)] = e.status
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._requests.remove(request)
        self.statuses[id(request)] = response.status
        return response

    def status_of(self, request: kmock.Request) -> int | None:
        return self.statuses.get(id(request))

    async def _handle_realistically(self, request: kmock.Request) -> Any:
        if request.resource is not None:
            for fault in list(self.faults):
                status = fault(request)
                if status:
                    raise kmock.KubernetesError(status=status, reason="InjectedFault",
                                                message=f"injected by the test: {request.method} {request.url.path}")
            if request.action == kmock.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):  # kopf's events use generateName
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp",
                                datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = self._bump()
            elif request.action == kmock.action.UPDATE and request.name is not None:
                rv = self._bump()
                if isinstance(request.data, dict):
                    meta = request.data.setdefault("metadata", {})
                    meta["resourceVersion"] = rv
                    current = self._stored(request)
                    if "spec" in request.data and current is not None and request.data["spec"] is not None:
                        if _merge(current.get("spec"), request.data["spec"]) != current.get("spec"):
                            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
                elif isinstance(request.data, list):  # JSON patch: after kopf's `test` on the old RV
                    request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
        try:
            response = await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        if request.action == kmock.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)
        return response

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(self._rv)
        return result

    async def _serve_watch(self, request: kmock.Request) -> Any:
        since = request.params.get("resourceVersion")
        async for item in super()._serve_watch(request):
            if (since and since.isdigit() and isinstance(item, dict) and item.get("type") == "ADDED"
                    and int(item["object"].get("metadata", {}).get("resourceVersion") or 0) <= int(since)):
                continue  # already in the LIST the client started from
            yield item


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 merge of `patch` into `base`, without mutating `base` (does a patch change the spec?)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out
