"""Pump and worker Deployments with the XP_* environment of the contract and the config mounted."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from xml_pipeline import contract

from ..model import Organism, Resources
from ..podshape import PodShape, apply_shape
from .naming import (CONFIG_DIR, CONFIG_HASH_ANNOTATION, CONFIG_KEY, CONFIG_PATH, CREDENTIALS_DIGEST_ANNOTATION,
                     PASSWORD_KEY, SIGNING_KEY_KEY, USERNAME_KEY, config_map_name, labels, pump_name, secret_name,
                     selector_labels, worker_name)
from .tls import CaSource, ca_mount, ca_volume
from .security import APP_GID, APP_UID, container_security_context, pod_basics, pod_security_context

Role = contract.Role

_HEALTHCHECK = ["xml-pipeline", "healthcheck"]
#: The pump serves Prometheus metrics here (`xml-pipeline pump --metrics-port`); worker pods need none
#: (the pump counts every task and reads the streams). The chart's PodMonitor scrapes port "metrics".
PUMP_METRICS_PORT = 9102


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def xp_env(org: Organism, role: Role, endpoint: str | None) -> list[dict[str, Any]]:
    """The container environment: exactly the XP_* variables of the contract, secrets by reference.

    Without the redis backend the XP_REDIS_* variables are left out (BackendConfig.from_env skips
    unset variables; there is no Redis to describe).
    """
    creds = secret_name(org.name)
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_ORGANISM, "value": org.name},
        {"name": contract.ENV_ROLE, "value": role},
        {"name": contract.ENV_BACKEND_TYPE, "value": org.backend_type},
    ]
    if org.redis is not None:
        assert endpoint is not None
        external = org.redis.external
        user = _secret_env(contract.ENV_REDIS_USERNAME, creds, USERNAME_KEY)
        password = _secret_env(contract.ENV_REDIS_PASSWORD, creds, PASSWORD_KEY)
        if external is not None:
            password = _secret_env(contract.ENV_REDIS_PASSWORD, external.password.name, external.password.key)
            if external.username is not None:
                user = _secret_env(contract.ENV_REDIS_USERNAME, external.username.name, external.username.key)
        env += [
            {"name": contract.ENV_REDIS_URL, "value": endpoint},
            user,
            password,
            {"name": contract.ENV_REDIS_PREFIX, "value": org.redis.prefix},
            {"name": contract.ENV_REDIS_TTL, "value": str(org.redis.ttl)},
        ]
    env += [
        _secret_env(contract.ENV_SIGNING_KEY, creds, SIGNING_KEY_KEY),
        {"name": contract.ENV_CONFIG, "value": CONFIG_PATH},
    ]
    return env


def config_hash(org: Organism, organism_yaml: str, endpoint: str | None, ca: str | None = None) -> str:
    """Hash of everything a pod reads once at start. Written on the pod templates, so a change of
    config, TTL, prefix, endpoint, image or worker processes rolls the pods (a replica count change
    only scales); so does a new shared-Redis CA (`ca`, PEM; the pump's pipe reads it at start)."""
    material = {
        "organism.yaml": organism_yaml,
        "image": org.image,
        "env": xp_env(org, "pump", endpoint),
        "processes": org.workers.processes if org.workers else None,
    }
    if ca:
        material["ca"] = hashlib.sha256(ca.encode()).hexdigest()
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def _container(org: Organism, role: Role, endpoint: str | None, resources: Resources,
               fixed_ids: bool, ca: CaSource | None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": role,
        "image": org.image,
        "command": ["xml-pipeline", role],
        "env": xp_env(org, role, endpoint),
        # The heartbeat the healthcheck reads is refreshed by the process under /tmp.
        "livenessProbe": {"exec": {"command": _HEALTHCHECK}, "initialDelaySeconds": 10, "periodSeconds": 15,
                          "timeoutSeconds": 5, "failureThreshold": 4},
        "readinessProbe": {"exec": {"command": _HEALTHCHECK}, "periodSeconds": 5, "timeoutSeconds": 5},
        "resources": resources.to_k8s(),
        "securityContext": container_security_context(APP_UID, APP_GID, fixed=fixed_ids),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if ca is not None:
        container["volumeMounts"].append(ca_mount())
    if role == "pump":
        container["command"] += ["--metrics-port", str(PUMP_METRICS_PORT)]
        container["ports"] = [{"name": "metrics", "containerPort": PUMP_METRICS_PORT, "protocol": "TCP"}]
    return container


def _template(org: Organism, role: Role, endpoint: str | None, resources: Resources,
              digest: str, credentials_digest: str | None, fixed_ids: bool, shape: PodShape,
              ca: CaSource | None) -> dict[str, Any]:
    annotations = {CONFIG_HASH_ANNOTATION: digest}
    if credentials_digest:
        # Shared mode: pods read the password once at start, so a new one in the Secret rolls them
        # (rotation.py). An HMAC keyed with a secret, never the password or a plain hash of it.
        annotations[CREDENTIALS_DIGEST_ANNOTATION] = credentials_digest
    return apply_shape({
        "metadata": {
            "labels": labels(org.name, role),
            "annotations": annotations,
        },
        "spec": {
            **pod_basics(),
            "securityContext": pod_security_context(APP_UID, APP_GID, fixed=fixed_ids),
            "terminationGracePeriodSeconds": 30,
            "containers": [_container(org, role, endpoint, resources, fixed_ids, ca)],
            "volumes": [
                {"name": "config", "configMap": {"name": config_map_name(org.name),
                                                 "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
                {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            ] + ([ca_volume(ca)] if ca is not None else []),
        },
    }, shape)


def _deployment(org: Organism, role: Role, name: str, replicas: int, strategy: dict[str, Any],
                template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": org.namespace,
            "labels": labels(org.name, role),
            "ownerReferences": [org.owner_reference],
        },
        "spec": {
            "replicas": replicas,
            "strategy": strategy,
            "selector": {"matchLabels": selector_labels(org.name, role)},
            "template": template,
        },
    }


def pump_deployment(org: Organism, endpoint: str | None, digest: str,
                    credentials_digest: str | None = None, *, fixed_ids: bool = True,
                    ca: CaSource | None = None) -> dict[str, Any]:
    """`fixed_ids=False`: the platform assigns the pods' user ids (XPO_POD_USER_IDS=platform). `ca`:
    the Secret key mounted as the TLS Redis's CA file (desired/tls.py).

    One pump: Recreate (never two at once, the pump being the only reader of the ingress in the
    memory/manager backends). Several pumps (redis backend only): they share the ingress consumer
    group, so a RollingUpdate that starts the new pump before stopping an old one never leaves the
    ingress unread.
    """
    replicas = org.pump.replicas
    # rollingUpdate None: a Deployment switched back to Recreate must lose it (the API refuses both).
    strategy: dict[str, Any] = ({"type": "Recreate", "rollingUpdate": None} if replicas == 1 else
                                {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    return _deployment(org, "pump", pump_name(org.name), replicas, strategy,
                       _template(org, "pump", endpoint, org.pump_resources, digest, credentials_digest, fixed_ids,
                                 org.pump.shape, ca))


def worker_deployment(org: Organism, endpoint: str | None, digest: str,
                      credentials_digest: str | None = None, *, fixed_ids: bool = True,
                      ca: CaSource | None = None) -> dict[str, Any]:
    assert org.workers is not None
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}
    a = org.workers.autoscaling
    # Autoscaled: the replica count only seeds the Deployment (apply.py never writes it afterwards).
    replicas = org.workers.replicas if a is None else max(1, a.min_replicas)
    return _deployment(org, "worker", worker_name(org.name), replicas, strategy,
                       _template(org, "worker", endpoint, org.workers.resources, digest, credentials_digest,
                                 fixed_ids, org.workers.shape, ca))
