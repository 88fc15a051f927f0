"""kopf registrations, kept thin: each handler delegates to `Reconciler` and reports.

Handlers are synchronous on purpose: kopf runs them in a thread pool, so the blocking `kubernetes`
client never stalls the event loop (which, in the tests, also serves the kmock API).

`register()` puts everything into a given registry, so one process (or one test) can run several
operators side by side without kopf's global default registry.
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from xml_pipeline.contract import LABEL_MANAGED_BY

from . import GROUP, PLURAL, VERSION, rotation
from .desired.naming import MANAGED_BY, ORGANISM_LABEL
from .kube import ApiError, Kube
from .metrics import METRICS
from .reconcile import Reconciler, Result
from .redis_admin import RedisAdmin, Tenant, make_admin
from .settings import OperatorSettings

logger = logging.getLogger(__name__)

FINALIZER = "xml-pipeline.dev/finalizer"
ANNOTATION_PREFIX = "xml-pipeline.dev"


def namespaced(namespace: str | None) -> str:
    """`namespace` as kopf passes it to a handler of a namespaced resource (Organisms, Deployments,
    StatefulSets): always a str. kopf's handler types say `str | None` because they also cover
    cluster-scoped resources; this narrows, and fails loudly if that ever stops holding."""
    if namespace is None:
        raise kopf.PermanentError("expected a namespaced resource, got no namespace")
    return namespace


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings, kube: Kube | None = None) -> None:
    """kopf's own knobs: where it keeps its state, what it posts as events, what it watches."""
    # Handler progress and the last handled spec live in annotations: the CRD's structural schema
    # would prune kopf's default status.kopf field.
    kopf_settings.persistence.finalizer = FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
    # kopf's per-object warnings and errors (a handler failing, retried) become Kubernetes Events; its
    # INFO lines do not (every successful resync would post one: a write on an idle cluster). Our own
    # events are explicit kopf.event() calls.
    kopf_settings.posting.loggers = True
    kopf_settings.posting.level = logging.WARNING
    # Watch only our workloads server-side; handlers filter by the same labels client-side too.
    for resource in (("apps", "deployments"), ("apps", "statefulsets")):
        kopf_settings.watching.label_selectors[resource] = f"{ORGANISM_LABEL},{LABEL_MANAGED_BY}={MANAGED_BY}"
    kopf_settings.watching.server_timeout = 600
    kopf_settings.watching.client_timeout = 660
    apply_peering(kopf_settings, settings)
    if settings.webhook_port:
        from . import webhook
        name = settings.webhook_configuration
        publish = (lambda ca: webhook.publish_ca(kube or Kube(), name, ca)) if name else None
        kopf_settings.admission.server = webhook.make_server(
            port=settings.webhook_port, host=settings.webhook_host, cert_dir=settings.webhook_cert_dir,
            publish=publish)


def apply_peering(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Standalone, or one of an active/standby set (XPO_PEERING): the replica with the highest priority
    acts, the others pause. Priorities are drawn at random at start (equal priorities would pause
    everyone: kopf then assumes two conflicting operators). A standby resumes once the active replica's
    keep-alive expired: at most peering_lifetime seconds after it stopped refreshing it."""
    if settings.peering is None:
        kopf_settings.peering.standalone = True
        return
    kopf_settings.peering.standalone = False
    kopf_settings.peering.mandatory = True
    kopf_settings.peering.name = settings.peering
    kopf_settings.peering.clusterwide = settings.clusterwide
    kopf_settings.peering.lifetime = settings.peering_lifetime
    if not kopf_settings.peering.priority:  # drawn once (this runs again in the startup handler)
        kopf_settings.peering.priority = secrets.randbelow(2**31 - 1) + 1


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings, *, kube: Kube | None = None,
             admin: RedisAdmin | None = None) -> Reconciler:
    """Register all handlers of one operator instance; returns its Reconciler (for tests and metrics)."""
    kube = kube or Kube()
    reconciler = Reconciler(kube, settings, admin or make_admin(settings))
    # Shared-Redis tenancy (an index of shared Organisms for the overlap check, the usage timer).
    from .tenancy.handlers import register_tenancy
    register_tenancy(registry, reconciler.admin)
    seen: dict[str, tuple[Any, ...]] = {}
    seen_lock = threading.Lock()

    kopf.on.login(registry=registry)(kopf.login_via_client)
    if settings.webhook_port:  # pods labelled xml-pipeline.dev/client get the organism's binding
        from . import webhook
        webhook.register(registry, lambda ns, name: kube.get("Organism", ns, name))

    @kopf.on.startup(registry=registry, id="configure")
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, reconciler.settings, kube)

    @kopf.on.cleanup(registry=registry, id="close-client")
    def cleanup(**_: Any) -> None:
        kube.close()

    def run(namespace: str, name: str, retry: int, source: str) -> Result | None:
        try:
            result = reconciler.reconcile(namespace, name)
        except ApiError as e:
            METRICS.inc("xpo_reconciles_total", result="error")
            raise kopf.TemporaryError(f"Kubernetes API error: {e}", delay=settings.retry_delay(retry)) from None
        if result is None:
            return None  # deleted meanwhile
        for event in result.events:
            # kopf.event only reads apiVersion/kind/metadata with .get(); its annotation asks for a Body.
            kopf.event(dict(result.body),  # type: ignore[arg-type]
                       type=event.type, reason=event.reason, message=event.message)
        METRICS.inc("xpo_reconciles_total", result="retry" if result.retry else "ok")
        METRICS.set_phase(f"{namespace}/{name}", result.status.get("phase", ""))
        logger.debug("reconciled %s/%s (%s): phase=%s", namespace, name, source, result.status.get("phase"))
        return result

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="reconcile")
    def organism_changed(namespace: str | None, name: str, retry: int, reason: str, **_: Any) -> None:
        namespace = namespaced(namespace)
        result = run(namespace, name, retry, str(reason))
        if result is not None and result.retry:
            raise kopf.TemporaryError(result.retry, delay=settings.retry_delay(retry))

    def rotation_requested(body: kopf.Body, **_: Any) -> bool:
        credentials = (body.get("status") or {}).get("credentials") or {}
        return rotation.request_pending(body.get("metadata", {}).get("annotations"), credentials.get("request"))

    # kopf's change detection ignores annotations under its own storage prefix (xml-pipeline.dev/),
    # so a new rotate-credentials value is noticed here, by watching for it.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="rotation-requested", when=rotation_requested)
    def organism_rotation(type: str | None, namespace: str | None, name: str, **_: Any) -> None:
        namespace = namespaced(namespace)
        if type in ("ADDED", "MODIFIED"):
            run(namespace, name, 0, "rotation requested")

    if settings.resync_seconds > 0:
        @kopf.timer(GROUP, VERSION, PLURAL, registry=registry, id="resync", interval=settings.resync_seconds,
                    initial_delay=settings.resync_seconds)
        def organism_resync(namespace: str | None, name: str, **_: Any) -> None:
            namespace = namespaced(namespace)
            # Repairs drift (an edited or deleted Deployment, a lost status). Errors are retried on
            # the next tick.
            run(namespace, name, 0, "resync")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, id="cleanup")
    def organism_deleted(body: kopf.Body, namespace: str | None, name: str, retry: int, **_: Any) -> None:
        namespace = namespaced(namespace)
        # Children go with the Organism through their ownerReferences (garbage collection). What GC
        # cannot reach is outside the cluster: the Organism's ACL user on a shared Redis.
        redis = (body.get("status") or {}).get("redis") or {}
        if redis.get("mode") == "shared":
            tenant = Tenant(namespace=namespace, name=name, prefix=str(redis.get("prefix", "")),
                            username=_shared_username(namespace, name))
            try:
                # Under the Organism's lock: a pass that began before the deletion (a Deployment's
                # event) finishes first, so it cannot put back a user this release has removed;
                # passes after it see the deletionTimestamp and do nothing.
                with reconciler.lock(namespace, name):
                    reconciler.admin.release_tenant(tenant)
            except Exception as e:  # noqa: BLE001 -- any failure of the seam is retried, never lost
                raise kopf.TemporaryError(f"releasing the shared-Redis tenant failed: {e}",
                                          delay=settings.retry_delay(retry)) from None
        reconciler.forget(namespace, name)
        METRICS.forget_phase(f"{namespace}/{name}")
        # kopf.event, not kopf.info: posting.level is WARNING (see configure_kopf), which filters kopf.info.
        kopf.event(dict(body), type="Normal", reason="Deleted",  # type: ignore[arg-type]  # see run()
                   message="Organism cleanup finished; owned objects are garbage-collected")

    def workload_event(type: str | None, body: kopf.Body, namespace: str | None, **_: Any) -> None:
        """An owned Deployment/StatefulSet changed: refresh the Organism (status, or repair a deletion)."""
        namespace = namespaced(namespace)
        if type is None:
            return  # initial listing: the resume handlers reconcile every Organism anyway
        uid = str(body.get("metadata", {}).get("uid"))
        summary = _summary(body)
        with seen_lock:
            if type == "DELETED":
                seen.pop(uid, None)
            else:
                last = seen.get(uid)
                seen[uid] = summary
                # ADDED: we just created it, the creating pass reports on it. Unchanged summary: only
                # metadata moved (e.g. our own annotation patches).
                if type == "ADDED" or last == summary:
                    return
        owner = _owner_name(body)
        if owner is not None:
            run(namespace, owner, 0, f"{body.get('kind', 'workload')} {type}")

    for plural in ("deployments", "statefulsets"):
        # The label filter written out here so kopf's parameter type checks it (kopf does not export
        # the type of kopf.PRESENT, so a module constant could not be annotated with it).
        kopf.on.event("apps", "v1", plural, registry=registry,
                      labels={ORGANISM_LABEL: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY},
                      id=f"{plural}-changed")(workload_event)

    return reconciler


def _summary(body: Mapping[str, Any]) -> tuple[Any, ...]:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    return (meta.get("generation"), spec.get("replicas"), status.get("observedGeneration"), status.get("replicas"),
            status.get("readyReplicas"), status.get("updatedReplicas"), status.get("availableReplicas"))


def _owner_name(body: Mapping[str, Any]) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "Organism" and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return str(ref.get("name"))
    return None


def _shared_username(namespace: str, name: str) -> str:
    from .redis_admin import acl_username
    return acl_username(namespace, name)

