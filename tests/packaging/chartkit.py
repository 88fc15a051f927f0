"""Helpers of the packaging tests: where things are, the scenarios of values, running helm, and the
operator's built objects (through its pure builders) for the checks that cover them too."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "xml-pipeline-operator"
CRD = CHART / "crds" / "organisms.xml-pipeline.dev.yaml"
TOOLS_BIN = ROOT / ".tools" / "bin"
RELEASE = "xml-pipeline"
NAMESPACE = "xml-pipeline-system"

# Every documented combination of values (docs/install.md, the chart README), by name.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "shared-deploy": {"sharedRedis": {"mode": "deploy"}},
    "shared-deploy-ephemeral": {
        "sharedRedis": {"mode": "deploy", "deploy": {"persistence": {"enabled": False}}},
    },
    "shared-existing": {
        "sharedRedis": {"mode": "existing", "existing": {
            "url": "rediss://redis.platform.svc:6380/0", "username": "xp-admin",
            "existingSecret": "redis-admin", "existingSecretKey": "admin-password"}},
    },
    # A rediss:// shared Redis with a private CA (mounted into the operator, XPO_SHARED_REDIS_CA_FILE).
    "shared-existing-ca": {
        "sharedRedis": {"mode": "existing", "existing": {
            "url": "rediss://redis.platform.svc:6380/0", "existingSecret": "redis-admin",
            "caSecret": "redis-ca", "caSecretKey": "root.pem"}},
    },
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                    "podMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "metrics-service": {"metrics": {"service": {"enabled": True}}},
    # Active/standby operators through kopf peering, cluster-wide and namespaced.
    "peering": {"replicaCount": 2},
    "peering-namespaced": {"replicaCount": 2, "watchNamespaces": ["team-a", "team-b"], "autoscaler": "keda"},
    "webhook": {"webhook": {"enabled": True}},
    "webhook-cert-manager": {"webhook": {"enabled": True, "certManager": {"enabled": True},
                                         "namespaceSelector": {"matchLabels": {"xml-pipeline.dev/clients": "on"}}}},
    # OpenShift-style: the platform assigns user ids (restricted SCC).
    "platform-user-ids": {"podUserIds": "platform", "sharedRedis": {"mode": "deploy"}},
    "no-rbac": {
        "rbac": {"create": False, "aggregateToDefaultRoles": False},
        "serviceAccount": {"create": False, "name": "operator-sa"},
    },
    # Everything at once, with every scheduling knob set, to prove they render into valid objects.
    "everything": {
        "watchNamespaces": ["team-a"],
        "image": {"digest": "sha256:" + "a" * 64, "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "regcred"}],
        "logLevel": "DEBUG",
        "probeExternalRedis": False,
        "organismDefaults": {"image": "registry.example/xp:1.2.3", "ttl": 3600,
                             "redisImage": "redis:7.2.5-alpine"},
        "sharedRedis": {"mode": "deploy", "deploy": {
            "persistence": {"enabled": True, "size": "5Gi", "storageClassName": "fast"},
            "maxmemory": "1gb",
            "nodeSelector": {"disk": "ssd"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "redis",
                             "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                  "labelSelector": {"matchLabels": {"a": "b"}}}}]}},
        }},
        "serviceAccount": {"create": True, "name": "xp-operator", "annotations": {"a": "b"}},
        "healthPort": 9090,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoExecute",
                         "tolerationSeconds": 30}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"team": "platform"},
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "1m", "scrapeTimeout": "15s"}},
    },
}


def _version(binary: str) -> str:
    try:
        return subprocess.run([binary, "version", "--short"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def find_binary(name: str, prefix: str) -> str | None:
    """`name` from PATH or .tools/bin, if it reports a version starting with `prefix`."""
    for candidate in (shutil.which(name), str(TOOLS_BIN / name)):
        if candidate and os.access(candidate, os.X_OK) and _version(candidate).startswith(prefix):
            return candidate
    return None


def helm_template(binary: str, values: dict[str, Any], tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `helm template` with `values` (as a values file); the caller checks the result."""
    fd, name = tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=tmp)
    values_file = Path(name)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(values, f)
    return subprocess.run(
        [binary, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file),
         *extra],
        capture_output=True, text=True, timeout=60,
    )


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (str) or valueFrom (dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


#: A template subset with every shapeable field (docs/operator.md, Shaping the pods).
SHAPED: dict[str, Any] = {
    "metadata": {"labels": {"team": "orders"}, "annotations": {"example.com/owner": "orders"}},
    "spec": {"env": [{"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "orders-api", "key": "token"}}},
                     {"name": "MODE", "value": "batch"}],
             "envFrom": [{"configMapRef": {"name": "orders-settings"}, "prefix": "ORDERS_"}],
             "volumes": [{"name": "certs", "secret": {"secretName": "orders-certs"}},
                         {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}],
             "volumeMounts": [{"name": "certs", "mountPath": "/var/run/certs", "readOnly": True},
                              {"name": "scratch", "mountPath": "/scratch"}],
             "serviceAccountName": "orders-handlers", "imagePullSecrets": [{"name": "regcred"}],
             "nodeSelector": {"pool": "cpu"},
             "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "xp", "effect": "NoSchedule"}],
             "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                 "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                     "matchLabels": {"app.kubernetes.io/instance": "shaped-autoscaled"}}}}]}},
             "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                            "whenUnsatisfiable": "ScheduleAnyway"}],
             "priorityClassName": "batch"}}


def operator_organisms() -> list[dict[str, Any]]:
    """Organisms covering every workload shape the operator builds (Redis modes, persistence,
    workers, non-Redis backends)."""
    specs = {
        "dedicated-workers": {"backend": {"type": "redis", "redis": {"mode": "dedicated"}},
                              "workers": {"replicas": 2, "processes": 2}},
        "dedicated-persistent": {"backend": {"type": "redis", "redis": {
            "mode": "dedicated", "dedicated": {"persistence": {"enabled": True, "size": "2Gi"}}}}},
        "shared": {"backend": {"type": "redis", "redis": {"mode": "shared"}}, "workers": {"replicas": 1}},
        "external": {"backend": {"type": "redis", "redis": {"mode": "external", "external": {
            "url": "rediss://redis.example:6380/0", "passwordSecretRef": {"name": "redis-pw"}}}}},
        "memory": {"backend": {"type": "memory"}},
        "manager": {"backend": {"type": "manager"}},
        # Shaped pods, two pumps (RollingUpdate, a budget), autoscaled workers (an HPA here).
        "shaped-autoscaled": {"pump": {"replicas": 2, "template": SHAPED},
                              "workers": {"autoscaling": {"minReplicas": 0, "maxReplicas": 5}, "template": SHAPED,
                                          "disruptionBudget": {"maxUnavailable": "50%"}},
                              "backend": {"redis": {"dedicated": {"template": {"spec": {
                                  "nodeSelector": {"pool": "redis"}, "priorityClassName": "platform"}}}}}},
    }
    return [{"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
             "metadata": {"name": name, "namespace": "team-a", "uid": f"uid-{name}", "generation": 1},
             # spec.config (with at least one listener) is required by the CRD and the operator's model.
             "spec": {"config": {"listeners": [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]},
                      **spec}} for name, spec in specs.items()]


def operator_workloads(pod_user_ids: str = "fixed") -> list[dict[str, Any]]:
    """Every object the operator's pure builders produce for operator_organisms()."""
    desired = pytest.importorskip("xml_pipeline_operator.desired",
                                  reason="the operator's pure builders are not there yet")
    from xml_pipeline_operator.apply import prune
    from xml_pipeline_operator.model import parse_organism
    from xml_pipeline_operator.settings import OperatorSettings

    settings = OperatorSettings(shared_redis_url="redis://shared-redis.xp.svc:6379",
                                shared_redis_password="not-used-by-builders", pod_user_ids=pod_user_ids)
    objects: list[dict[str, Any]] = []
    for body in operator_organisms():
        state = desired.build(parse_organism(body, settings), settings)
        objects += [state.config_map, *(prune(o) for o in state.workloads)]
    return objects
