"""Helpers of the packaging tests: where things are, the scenarios of values, running helm."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "metrics-service": {"metrics": {"service": {"enabled": True}}},
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
