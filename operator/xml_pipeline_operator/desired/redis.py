"""The dedicated Redis: a Service plus a Deployment (or a StatefulSet with a PVC when persistent).

The password never appears in the pod spec or in process arguments: redis-server reads its
`requirepass` line from stdin (`redis-server -`), fed by a shell here-document expanded from an
environment variable that comes from the Secret. The variable is unset before exec, so it is not in
redis-server's environment either; the probes authenticate through REDISCLI_AUTH (read by redis-cli
from its environment, so it is not on a command line).
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any

from xml_pipeline.contract import LABEL_COMPONENT, LABEL_INSTANCE, LABEL_NAME

from ..model import Organism
from ..podshape import apply_shape
from ..settings import OperatorSettings
from .naming import (
    APP_NAME,
    ORGANISM_LABEL,
    PASSWORD_KEY,
    CLIENT_LABEL,
    REDIS_CLIENT_LABEL,
    REDIS_PORT,
    labels,
    redis_name,
    secret_name,
    selector_labels,
)
from .binding import PASSWORD_KEY as BINDING_PASSWORD_KEY
from .binding import binding_name, client_username, config_line
from .security import REDIS_GID, REDIS_UID, container_security_context, pod_basics, pod_security_context

#: Labels the chart gives the operator's pods (xpo.labels: part-of and component are fixed names).
OPERATOR_POD_LABELS = {"app.kubernetes.io/part-of": "xml-pipeline", LABEL_COMPONENT: "operator"}
#: Fraction of the container memory limit given to Redis as maxmemory (the rest: buffers, AOF rewrite).
MAXMEMORY_FRACTION = Decimal("0.8")

_START = (
    "set -eu\n"
    'pw="$REDIS_PASSWORD"\n'
    'cpw="$XP_CLIENT_PASSWORD"\n'
    "unset REDIS_PASSWORD REDISCLI_AUTH XP_CLIENT_PASSWORD\n"
    "exec redis-server - {args} <<END_OF_CONFIG\n"
    "requirepass $pw\n"
    "{client}\n"
    "END_OF_CONFIG\n"
)

_PING = ["sh", "-c", "redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG"]


def endpoint(org: Organism, settings: OperatorSettings) -> str | None:
    """The Redis URL the pods use (never with credentials), or None without the redis backend."""
    if org.redis is None:
        return None
    if org.redis.mode == "dedicated":
        return f"redis://{redis_name(org.name)}.{org.namespace}.svc:{REDIS_PORT}/0"
    if org.redis.mode == "shared":
        return settings.shared_redis_url
    assert org.redis.external is not None
    return org.redis.external.url


def redis_args(org: Organism) -> list[str]:
    """redis-server options (none secret, so they may be seen in the pod spec and in `ps`)."""
    assert org.redis is not None
    persistent = org.redis.persistence.enabled
    args = ["--port", str(REDIS_PORT), "--dir", "/data",
            # AOF only when the data outlives the pod anyway; never RDB snapshots (no fork spikes).
            "--appendonly", "yes" if persistent else "no", "--save", "''",
            # Evicting keys would silently break threads: refuse writes instead when memory is full.
            "--maxmemory-policy", "noeviction"]
    limit = org.redis.resources.limits.get("memory")
    if limit:
        from kubernetes.utils.quantity import parse_quantity
        args += ["--maxmemory", str(int(parse_quantity(limit) * MAXMEMORY_FRACTION))]
    return args


def start_script(org: Organism) -> str:
    """The container's shell script. The organism's client user (desired/binding.py) is a `user` line
    of the config, its password expanded from the environment like requirepass's."""
    assert org.redis is not None
    client = config_line(client_username(org.namespace, org.name), "$cpw", org.redis.prefix)
    return _START.format(args=" ".join(redis_args(org)), client=client)


def redis_service(org: Organism) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(org),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(org.name, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }


def _metadata(org: Organism) -> dict[str, Any]:
    """Metadata of every dedicated-Redis object: one name, the contract labels, owned by the Organism."""
    return {
        "name": redis_name(org.name),
        "namespace": org.namespace,
        "labels": labels(org.name, "redis"),
        "ownerReferences": [org.owner_reference],
    }


def redis_network_policy(org: Organism, *, keda_scaler: bool = False) -> dict[str, Any]:
    """Only the organism's pump and worker pods (and pods labelled `xml-pipeline.dev/redis-client:
    <name>`, its client pods, and the operator) may open connections to its dedicated Redis, and only
    on the Redis port.

    The password already keeps others out; this is the second wall (a leaked password is useless
    from elsewhere in the cluster). Enforced where the cluster's network plugin implements
    NetworkPolicy; harmless where it does not.
    """
    port = [{"protocol": "TCP", "port": REDIS_PORT}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(org),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(org.name, "redis")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {
                    "matchLabels": {LABEL_NAME: APP_NAME, LABEL_INSTANCE: org.name,
                                    ORGANISM_LABEL: org.name},
                    "matchExpressions": [{"key": LABEL_COMPONENT, "operator": "In",
                                          "values": ["pump", "worker"]}]}},
                    # The operator (its chart's pod labels, any namespace): it changes the client user
                    # while the Redis runs (tenancy/dedicated_client.py: a client password rotation).
                    {"namespaceSelector": {}, "podSelector": {"matchLabels": OPERATOR_POD_LABELS}}],
                 "ports": port},
                {"from": [{"podSelector": {"matchLabels": {REDIS_CLIENT_LABEL: org.name}}}], "ports": port},
                # The organism's client pods (docs/clients.md); they log in as its client user.
                {"from": [{"podSelector": {"matchLabels": {CLIENT_LABEL: org.name}}}], "ports": port},
            ] + ([_keda_peer(port)] if keda_scaler else []),
        },
    }


def _keda_peer(port: list[dict[str, Any]]) -> dict[str, Any]:
    """KEDA's operator (any namespace; the label its chart sets) reads the tasks stream to scale the workers."""
    return {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "keda-operator"}}}], "ports": port}


def _pod_template(org: Organism, settings: OperatorSettings, persistent: bool) -> dict[str, Any]:
    assert org.redis is not None
    password_ref = {"secretKeyRef": {"name": secret_name(org.name), "key": PASSWORD_KEY}}
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}}]
    if not persistent:
        volumes.insert(0, {"name": "data", "emptyDir": {}})
    return apply_shape({
        "metadata": {"labels": labels(org.name, "redis")},
        "spec": {
            **pod_basics(),
            "securityContext": pod_security_context(REDIS_UID, REDIS_GID, fixed=settings.pod_user_ids == "fixed"),
            "containers": [{
                "name": "redis",
                "image": settings.redis_image,
                "command": ["sh", "-c", start_script(org)],
                "env": [{"name": "REDIS_PASSWORD", "valueFrom": password_ref},
                        {"name": "REDISCLI_AUTH", "valueFrom": password_ref},
                        {"name": "XP_CLIENT_PASSWORD", "valueFrom": {"secretKeyRef": {
                            "name": binding_name(org.name), "key": BINDING_PASSWORD_KEY}}}],
                "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
                "readinessProbe": {"exec": {"command": _PING}, "periodSeconds": 5, "timeoutSeconds": 3},
                "livenessProbe": {"exec": {"command": _PING}, "initialDelaySeconds": 15, "periodSeconds": 10,
                                  "timeoutSeconds": 5, "failureThreshold": 6},
                "resources": org.redis.resources.to_k8s(),
                "securityContext": container_security_context(REDIS_UID, REDIS_GID,
                                                              fixed=settings.pod_user_ids == "fixed"),
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": volumes,
        },
    }, org.redis.shape)


def redis_workload(org: Organism, settings: OperatorSettings) -> dict[str, Any]:
    """Deployment (ephemeral data) or StatefulSet with a PersistentVolumeClaim (persistence on)."""
    assert org.redis is not None
    persistence = org.redis.persistence
    meta = _metadata(org)
    if not persistence.enabled:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                # One instance at a time: two would each hold half of the organism's state.
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector_labels(org.name, "redis")},
                "template": _pod_template(org, settings, persistent=False),
            },
        }
    claim_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": persistence.size}}}
    if persistence.storage_class:
        claim_spec["storageClassName"] = persistence.storage_class
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "serviceName": redis_name(org.name),
            "selector": {"matchLabels": selector_labels(org.name, "redis")},
            # Neither deleting the Organism nor scaling deletes the data volume.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
            "template": _pod_template(org, settings, persistent=True),
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels(org.name, "redis")},
                "spec": claim_spec,
            }],
        },
    }
