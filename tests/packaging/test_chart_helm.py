"""The chart with the real Helm binaries: lint, render every documented combination, and what each
combination must produce."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartkit import CHART, NAMESPACE, RELEASE, SCENARIOS, env_of, find, helm_template, load_docs, one

FULLNAME = "xml-pipeline-operator"
REDIS = f"{FULLNAME}-shared-redis"


@pytest.mark.parametrize("which", ["helm", "helm3"])
def test_lint_strict(helm_bins: dict[str, str], which: str, tmp_path: Path) -> None:
    """`helm lint --strict` (warnings are errors) with Helm 4 and Helm 3, defaults and the biggest
    combination of values."""
    for values in ({}, SCENARIOS["everything"], SCENARIOS["shared-existing"]):
        vf = tmp_path / "values.yaml"
        vf.write_text(yaml.safe_dump(values))
        result = subprocess.run([helm_bins[which], "lint", "--strict", str(CHART), "-f", str(vf)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


def _without_random(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The generated shared-Redis password differs on every render; blank it for comparison."""
    out = []
    for o in objects:
        if o["kind"] == "Secret" and o["metadata"]["name"] == REDIS:
            o = {**o, "data": {k: "<random>" for k in o["data"]}}
        out.append(o)
    return out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm3_renders_the_same_objects(helm_bins: dict[str, str], rendered: dict[str, list[dict[str, Any]]],
                                        scenario: str, tmp_path: Path) -> None:
    """Users on Helm 3 get exactly what Helm 4 users get."""
    result = helm_template(helm_bins["helm3"], SCENARIOS[scenario], tmp_path)
    assert result.returncode == 0, result.stderr
    # Helm 3 sorts a MutatingWebhookConfiguration among the kinds it does not know (after the
    # Deployment); Helm 4 before it. The objects must be the same, in either order.
    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]
    assert sorted(_without_random(load_docs(result.stdout)), key=key) == sorted(_without_random(rendered[scenario]),
                                                                                 key=key)


def _operator(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"][0]


def test_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    assert sorted(o["kind"] for o in objects) == [
        "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"]
    for o in objects:
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == NAMESPACE, o["metadata"]
    deploy = one(objects, "Deployment", FULLNAME)
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    c = pod["containers"][0]
    assert c["command"] == ["xml-pipeline-operator"]
    assert c["image"] == "ghcr.io/xml-pipeline/xml-pipeline:0.1.0"  # the chart's appVersion
    assert env_of(c) == {
        "XPO_NAMESPACES": "",
        "XPO_DEFAULT_IMAGE": "ghcr.io/xml-pipeline/xml-pipeline:0.1.0",
        "XPO_DEFAULT_TTL": "86400",
        "XPO_REDIS_IMAGE": "redis:7.2.5-alpine",
        "XPO_HEALTH_PORT": "8080",
        "XPO_LOG_LEVEL": "INFO",
        "XPO_PROBE_EXTERNAL_REDIS": "true",
        "XPO_POD_USER_IDS": "fixed",
        "XPO_AUTOSCALER": "auto",
        "HOME": "/tmp",
    }
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"]["limits"]["memory"] == "256Mi"
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"]
    # Labels every object carries.
    for o in objects:
        labels = o["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "xml-pipeline"


def test_namespaced_mode(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["namespaced"]
    assert env_of(_operator(objects))["XPO_NAMESPACES"] == "team-a,team-b"
    roles = find(objects, "Role")
    bindings = find(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # No cluster-wide write access: the only ClusterRole bound to the operator is read-only discovery.
    binding = one(objects, "ClusterRoleBinding")
    role = one(objects, "ClusterRole", binding["roleRef"]["name"])
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"list", "watch"}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {"namespaces", "customresourcedefinitions"}


def test_shared_redis_off_gives_operator_no_shared_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario in ("defaults", "namespaced", "service-monitor"):
        env = env_of(_operator(rendered[scenario]))
        assert not [k for k in env if k.startswith("XPO_SHARED_REDIS")], scenario
        assert not find(rendered[scenario], "StatefulSet")


def test_shared_redis_deploy(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["shared-deploy"]
    secret = one(objects, "Secret", REDIS)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(secret["data"]) == {"password"}
    service = one(objects, "Service", REDIS)
    assert service["spec"]["ports"][0]["port"] == 6379
    sts = one(objects, "StatefulSet", REDIS)
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == REDIS
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    pod = sts["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    redis = pod["containers"][0]
    # The password reaches Redis only through secretKeyRef, never in the command line or a ConfigMap.
    assert env_of(redis)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": REDIS, "key": "password"}}
    assert "requirepass $REDIS_PASSWORD" in redis["args"][0]
    assert "appendonly yes" in redis["args"][0]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    env = env_of(_operator(objects))
    assert env["XPO_SHARED_REDIS_URL"] == f"redis://{REDIS}.{NAMESPACE}.svc:6379"
    assert env["XPO_SHARED_REDIS_USERNAME"] == "default"
    assert env["XPO_SHARED_REDIS_PASSWORD"] == {"secretKeyRef": {"name": REDIS, "key": "password"}}


def test_shared_redis_password_is_generated_per_install(helm: str, tmp_path: Path) -> None:
    """Without a cluster to look the Secret up in, every render generates a new random password
    (on a real upgrade, `lookup` returns the existing one and it is kept)."""
    passwords = set()
    for _ in range(2):
        result = helm_template(helm, SCENARIOS["shared-deploy"], tmp_path)
        assert result.returncode == 0, result.stderr
        passwords.add(one(load_docs(result.stdout), "Secret", REDIS)["data"]["password"])
    assert len(passwords) == 2
    assert all(len(p) >= 40 for p in passwords)  # base64 of 32 random characters


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In expressions: all the chart uses)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(expr["operator"] == "In" and labels.get(expr["key"]) in expr["values"]
               for expr in selector.get("matchExpressions", []))


def test_shared_redis_admits_only_the_operator_and_organism_pods(helm: str, rendered: dict[str, list[dict[str, Any]]],
                                                                 tmp_path: Path) -> None:
    from chartkit import operator_workloads

    objects = rendered["shared-deploy"]
    policy = one(objects, "NetworkPolicy", REDIS)["spec"]
    sts_pod = one(objects, "StatefulSet", REDIS)["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"], sts_pod) and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]

    def admitted(pod_labels: dict[str, str]) -> bool:
        # Organisms live in any namespace: every peer that names pods of other namespaces says so.
        return any(_selects(peer["podSelector"], pod_labels) for peer in rule["from"])

    assert admitted(one(objects, "Deployment", FULLNAME)["spec"]["template"]["metadata"]["labels"])
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
            for o in operator_workloads() if o["kind"] in ("Deployment", "StatefulSet")}
    assert admitted(pods["shared-pump"]) and admitted(pods["shared-worker"])
    assert not admitted(pods["dedicated-workers-redis"]) and not admitted(sts_pod) and not admitted({"app": "x"})
    organism_peer = next(p for p in rule["from"] if "namespaceSelector" in p)
    assert organism_peer["namespaceSelector"] == {}

    extra = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    values = {"sharedRedis": {"mode": "deploy", "deploy": {"networkPolicy": {"extraFrom": [extra]}}}}
    result = helm_template(helm, values, tmp_path)
    assert result.returncode == 0, result.stderr
    assert one(load_docs(result.stdout), "NetworkPolicy", REDIS)["spec"]["ingress"][0]["from"][-1] == extra
    values = {"sharedRedis": {"mode": "deploy", "deploy": {"networkPolicy": {"enabled": False}}}}
    result = helm_template(helm, values, tmp_path)
    assert result.returncode == 0, result.stderr
    assert not find(load_docs(result.stdout), "NetworkPolicy")


def test_shared_redis_deploy_without_persistence(rendered: dict[str, list[dict[str, Any]]]) -> None:
    sts = one(rendered["shared-deploy-ephemeral"], "StatefulSet", REDIS)
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]
    assert "appendonly no" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_shared_redis_existing(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["shared-existing"]
    assert not find(objects, "StatefulSet") and not find(objects, "Secret")
    env = env_of(_operator(objects))
    assert env["XPO_SHARED_REDIS_URL"] == "rediss://redis.platform.svc:6380/0"
    assert env["XPO_SHARED_REDIS_USERNAME"] == "xp-admin"
    assert env["XPO_SHARED_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "redis-admin", "key": "admin-password"}}


def test_shared_redis_existing_with_a_ca(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pod = one(rendered["shared-existing-ca"], "Deployment", FULLNAME)["spec"]["template"]["spec"]
    env = env_of(pod["containers"][0])
    assert env["XPO_SHARED_REDIS_CA_FILE"] == "/etc/xml-pipeline-operator/shared-redis-ca/ca.crt"
    assert {"name": "shared-redis-ca", "secret": {"secretName": "redis-ca", "items": [
        {"key": "root.pem", "path": "ca.crt"}]}} in pod["volumes"]
    assert {"name": "shared-redis-ca", "mountPath": "/etc/xml-pipeline-operator/shared-redis-ca",
            "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "XPO_SHARED_REDIS_CA_FILE" not in env_of(_operator(rendered["shared-existing"]))


def test_service_monitor(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["service-monitor"]
    sm = one(objects, "ServiceMonitor")
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s",
                                        "scrapeTimeout": "10s"}]
    assert service["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http",
                                         "protocol": "TCP"}]
    deploy = one(objects, "Deployment", FULLNAME)
    assert service["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    # The metrics Service alone, without the Prometheus Operator.
    assert one(rendered["metrics-service"], "Service", f"{FULLNAME}-metrics")
    assert not find(rendered["metrics-service"], "ServiceMonitor")


def test_pod_monitor_scrapes_every_pump(helm: str, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The PodMonitor selects the pump pods the operator builds (not workers, not Redis) on the port
    their container names "metrics", in every namespace, or the watched ones."""
    from chartkit import operator_workloads

    pm = one(rendered["service-monitor"], "PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prom"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint == {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    selected = [o for o in operator_workloads() if o["kind"] in ("Deployment", "StatefulSet")
                and pm["spec"]["selector"]["matchLabels"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
    assert selected and {o["metadata"]["name"].rsplit("-", 1)[1] for o in selected} == {"pump"}
    for o in selected:
        ports = o["spec"]["template"]["spec"]["containers"][0]["ports"]
        assert any(p["name"] == endpoint["port"] for p in ports)
    values = {"watchNamespaces": ["team-a"], "metrics": {"podMonitor": {"enabled": True}}}
    result = helm_template(helm, values, tmp_path)
    assert result.returncode == 0, result.stderr
    assert one(load_docs(result.stdout), "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not find(rendered["defaults"], "PodMonitor")


def test_everything(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["everything"]
    deploy = one(objects, "Deployment", FULLNAME)
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/xml-pipeline/xml-pipeline@sha256:" + "a" * 64
    env = env_of(c)
    assert env["XPO_DEFAULT_IMAGE"] == "registry.example/xp:1.2.3"
    assert env["XPO_DEFAULT_TTL"] == "3600"
    assert env["XPO_HEALTH_PORT"] == "9090" and c["ports"][0]["containerPort"] == 9090
    assert env["XPO_LOG_LEVEL"] == "DEBUG"
    assert env["XPO_PROBE_EXTERNAL_REDIS"] == "false"
    assert pod["serviceAccountName"] == "xp-operator"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "infra"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert deploy["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "platform"}
    assert deploy["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    sts = one(objects, "StatefulSet", REDIS)
    assert sts["spec"]["template"]["spec"]["nodeSelector"] == {"disk": "ssd"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    assert "maxmemory 1gb" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert one(objects, "ServiceAccount")["metadata"]["annotations"] == {"a": "b"}


def test_no_rbac_and_existing_service_account(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["no-rbac"]
    assert sorted(o["kind"] for o in objects) == ["Deployment"]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "operator-sa"


def test_notes_say_what_to_do_next(helm: str, tmp_path: Path) -> None:
    """NOTES.txt (printed by install) names the next commands, and the namespaced mode's namespace."""
    result = subprocess.run(
        [helm, "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE,
         "--set", "watchNamespaces={team-a}", "--set", "sharedRedis.mode=deploy"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{FULLNAME}" in notes
    assert "kubectl apply -n team-a" in notes
    assert "kubectl get organisms" in notes
    assert f"statefulset/{REDIS}" in notes
    assert "does not update the Organism CRD" in notes


def test_replica_count_two_runs_active_standby_through_kopf_peering(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["peering"]
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    assert env["XPO_PEERING"] == "xml-pipeline-operator" and env["XPO_PEERING_LIFETIME"] == "30"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert one(objects, "ClusterKopfPeering", "xml-pipeline-operator")
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"} == {
        "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}
    namespaced = rendered["peering-namespaced"]
    assert sorted(o["metadata"]["namespace"] for o in namespaced if o["kind"] == "KopfPeering") == ["team-a", "team-b"]
    assert not [o for o in namespaced if o["kind"] == "ClusterKopfPeering"]
    # One replica: standalone, no peering objects.
    assert not [o for o in rendered["defaults"] if o["kind"] in ("ClusterKopfPeering", "KopfPeering")]
    assert "XPO_PEERING" not in env_of(one(rendered["defaults"], "Deployment")["spec"]["template"]["spec"]["containers"][0])
