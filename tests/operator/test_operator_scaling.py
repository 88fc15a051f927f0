"""Pure builders: the KEDA objects against KEDA's own CRD schemas, the scaler's coordinates and
credentials per Redis mode, disruption budgets that never block a drain, and the merge rules of
pod shaping."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from xml_pipeline_operator import desired
from xml_pipeline_operator.apply import diff, prune
from xml_pipeline_operator.desired import scaling
from xml_pipeline_operator.model import SpecError, parse_organism
from xml_pipeline_operator.settings import OperatorSettings

KEDA = Path(__file__).parent / "keda"
SETTINGS = OperatorSettings(default_image="img:test", shared_redis_url="redis://shared.platform.svc:6379/2")
LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]


def make(spec: dict[str, Any], name: str = "orders") -> Any:
    body = {"metadata": {"name": name, "namespace": "shop", "uid": "u-1", "generation": 1},
            "spec": {"config": {"listeners": LISTENERS}, **spec}}
    return parse_organism(body, SETTINGS)


def keda_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((KEDA / f"keda.sh_{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return dict(version["schema"]["openAPIV3Schema"])


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields are errors (as the API server's strict field validation reports them)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if isinstance(schema.get("items"), dict):
        out["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    return out


def errors(obj: dict[str, Any], plural: str) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(keda_schema(plural)))
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(prune(obj))]


AUTOSCALED = {"workers": {"processes": 3, "autoscaling": {"minReplicas": 0, "maxReplicas": 6, "tasksPerReplica": 10,
                                                         "cooldownSeconds": 120, "pollingSeconds": 5}}}
EXTERNAL = {"backend": {"redis": {"mode": "external", "external": {
    "url": "rediss://redis.example:6380/3", "passwordSecretRef": {"name": "ext-pw", "key": "pw"},
    "usernameSecretRef": {"name": "ext-user"}}}}}


@pytest.mark.parametrize("mode", ["dedicated", "shared", "external"])
def test_keda_objects_validate_against_kedas_crds(mode: str) -> None:
    spec = {**AUTOSCALED, **(EXTERNAL if mode == "external" else {"backend": {"redis": {"mode": mode}}})}
    state = desired.build(make(spec), SETTINGS, keda=True)
    so = next(o for o in state.workloads if o["kind"] == "ScaledObject")
    ta = next(o for o in state.workloads if o["kind"] == "TriggerAuthentication")
    assert errors(so, "scaledobjects") == []
    assert errors(ta, "triggerauthentications") == []
    assert not [o for o in state.workloads if o["kind"] == "HorizontalPodAutoscaler"]
    assert ("HorizontalPodAutoscaler", "orders-worker") in state.absent
    assert state.create_only[("Deployment", "orders-worker")] == (("spec", "replicas"),)


def test_the_keda_validation_catches_a_broken_object() -> None:
    so = scaling.scaled_object(make(AUTOSCALED), "redis://r:6379/0")
    so["spec"]["minReplicaCount"] = "zero"
    so["spec"]["triggers"][0]["metadata"]["stream"] = 5
    so["spec"]["scaleTargetRef"]["nmae"] = "typo"
    found = errors(so, "scaledobjects")
    assert len(found) == 3, found


def test_trigger_coordinates_per_mode() -> None:
    dedicated = scaling.trigger_metadata(make(AUTOSCALED), "redis://orders-redis.shop.svc:6379/0")
    assert dedicated[0] == {"address": "orders-redis.shop.svc:6379", "stream": "xp:shop.orders:tasks",
                            "databaseIndex": "0", "enableTLS": "false", "streamLength": "10"}
    assert dedicated[1]["consumerGroup"] == "workers" and dedicated[1]["pendingEntriesCount"] == "3"
    external = make({**AUTOSCALED, **EXTERNAL})
    backlog, _ = scaling.trigger_metadata(external, external.redis.external.url)
    assert backlog["address"] == "redis.example:6380" and backlog["databaseIndex"] == "3"
    assert backlog["enableTLS"] == "true"  # rediss://
    # The scaler authenticates exactly as the worker pods do (the same Secret keys).
    assert scaling.scaler_credentials(external) == {"username": ("ext-user", "username"), "password": ("ext-pw", "pw")}
    assert scaling.scaler_credentials(make(AUTOSCALED)) == {"username": ("orders-credentials", "redis-username"),
                                                             "password": ("orders-credentials", "redis-password")}
    so = scaling.scaled_object(make(AUTOSCALED), "redis://r:6379/0")
    assert so["spec"]["cooldownPeriod"] == 120 and so["spec"]["pollingInterval"] == 5
    assert "password" not in yaml.safe_dump(so).lower().replace("redis-password", "")  # no secret values, ever


def test_dedicated_redis_admits_kedas_operator_only_when_keda_scales() -> None:
    def peers(state: Any) -> list[Any]:
        (policy,) = [o for o in state.workloads if o["kind"] == "NetworkPolicy"]
        return [rule["from"] for rule in policy["spec"]["ingress"]]
    # pump/workers, redis-client pods, client pods (docs/clients.md), and KEDA only when it scales.
    assert len(peers(desired.build(make(AUTOSCALED), SETTINGS, keda=True))) == 4
    assert len(peers(desired.build(make(AUTOSCALED), SETTINGS, keda=False))) == 3
    assert len(peers(desired.build(make({"workers": {}}), SETTINGS, keda=True))) == 3


def test_hpa_never_below_one_replica() -> None:
    state = desired.build(make(AUTOSCALED), SETTINGS, keda=False)
    (hpa,) = [o for o in state.workloads if o["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 6
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120


@pytest.mark.parametrize("spec, budgets", [
    ({"workers": {"replicas": 1}}, {"orders-worker": 1}),  # maxUnavailable 1 over one pod: a drain evicts it
    ({"workers": {"replicas": 0}}, {"orders-worker": 1}),
    ({"workers": {"disruptionBudget": {"enabled": False}}}, {}),
    ({"workers": {"disruptionBudget": {"maxUnavailable": "25%"}}}, {"orders-worker": "25%"}),
    ({"pump": {"replicas": 1}}, {}),  # one pump: no budget
    ({"pump": {"replicas": 3, "disruptionBudget": {"maxUnavailable": 2}}}, {"orders-pump": 2}),
    ({**AUTOSCALED}, {"orders-worker": 1}),  # minReplicas 0: harmless (it selects no pod)
])
def test_budgets_never_block_a_drain(spec: dict[str, Any], budgets: dict[str, Any]) -> None:
    state = desired.build(make(spec), SETTINGS)
    found = {o["metadata"]["name"]: o["spec"] for o in state.workloads if o["kind"] == "PodDisruptionBudget"}
    assert {n: s["maxUnavailable"] for n, s in found.items()} == budgets
    for s in found.values():
        assert "minAvailable" not in s and s["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    for name in {"orders-worker", "orders-pump"} - set(budgets):
        assert ("PodDisruptionBudget", name) in state.absent_after_change


def test_two_pumps_need_the_redis_backend() -> None:
    with pytest.raises(SpecError) as err:
        make({"backend": {"type": "manager"}, "pump": {"replicas": 2}})
    assert err.value.field == "spec.pump.replicas" and "consumer group" in str(err.value)


@pytest.mark.parametrize("template, field", [
    ({"spec": {"env": [{"name": "XP_ROLE", "value": "pump"}]}}, "spec.workers.template.spec.env[0].name"),
    ({"spec": {"envFrom": [{"secretRef": {"name": "s"}, "prefix": "XP_"}]}}, "spec.workers.template.spec.envFrom[0].prefix"),
    ({"spec": {"volumes": [{"name": "tmp", "emptyDir": {}}]}}, "spec.workers.template.spec.volumes[0].name"),
    ({"spec": {"volumes": [{"name": "v", "emptyDir": {}}],
               "volumeMounts": [{"name": "v", "mountPath": "/etc/xml-pipeline/extra"}]}},
     "spec.workers.template.spec.volumeMounts[0].mountPath"),
    ({"spec": {"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/etc"}]}},
     "spec.workers.template.spec.volumeMounts[0].mountPath"),  # above the config mount: would hide it
    ({"spec": {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}}, "spec.workers.template.spec.volumeMounts[0].name"),
    ({"metadata": {"annotations": {"xml-pipeline.dev/config-hash": "x"}}},
     "spec.workers.template.metadata.annotations.xml-pipeline.dev/config-hash"),
    ({"spec": {"containers": []}}, "spec.workers.template.spec.containers"),
    ({"spec": {"env": [{"name": "A", "value": 1}]}}, "spec.workers.template.spec.env[0].value"),
])
def test_shape_refusals_name_the_field(template: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        make({"workers": {"template": template}})
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_shape_merge_rules() -> None:
    shape = {"metadata": {"labels": {"team": "a"}}, "spec": {"env": [{"name": "B", "value": "1"}],
                                                           "tolerations": [{"key": "k", "operator": "Exists"}]}}
    org = make({"workers": {"template": shape}})
    (worker,) = [o for o in desired.build(org, SETTINGS).workloads if o["metadata"]["name"] == "orders-worker"
                 and o["kind"] == "Deployment"]
    pod = worker["spec"]["template"]
    env = [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert env[:-1] == [e["name"] for e in desired.workloads.xp_env(org, "worker", "redis://x:6379/0")] and env[-1] == "B"
    assert pod["metadata"]["labels"]["team"] == "a" and pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    # Unset subset fields are None in the desired state: "must be absent", pruned from a create.
    assert pod["spec"]["nodeSelector"] is None and "nodeSelector" not in prune(pod)["spec"]
    # Shaping does not change the config hash: env of the user changes the template, which rolls anyway.
    assert desired.build(org, SETTINGS).config_hash == desired.build(make({"workers": {}}), SETTINGS).config_hash


def test_diff_none_means_absent() -> None:
    assert diff({"a": None}, {}) is None
    assert diff({"a": None}, {"a": []}) is None
    assert diff({"a": None}, {"a": [1]}) == {"a": None}
    assert diff({"a": []}, {}) is None  # the API server leaves empty lists out: not a difference
    assert diff({"l": [{"x": 1, "y": None}]}, {"l": []}) == {"l": [{"x": 1}]}


@pytest.mark.parametrize("env, name, allowed", [
    ({"XPO_AUTOSCALER": "vpa"}, "XPO_AUTOSCALER", "auto"),
    ({"XPO_PEERING": "Not_A_Name"}, "XPO_PEERING", "DNS label"),
    ({"XPO_PEERING_LIFETIME": "1"}, "XPO_PEERING_LIFETIME", "2..600"),
])
def test_new_settings_refuse_bad_values_naming_the_variable(env: dict[str, str], name: str, allowed: str) -> None:
    from xml_pipeline.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        OperatorSettings.from_env(env)
    assert str(err.value).startswith(name) and allowed in str(err.value)
    ok = OperatorSettings.from_env({"XPO_AUTOSCALER": "hpa", "XPO_PEERING": "xpo", "XPO_PEERING_LIFETIME": "30"})
    assert (ok.autoscaler, ok.peering, ok.peering_lifetime) == ("hpa", "xpo", 30)


def test_peering_settings_reach_kopf() -> None:
    import kopf

    from xml_pipeline_operator.handlers import apply_peering
    ks = kopf.OperatorSettings()
    apply_peering(ks, OperatorSettings(peering="xpo", peering_lifetime=12))
    assert (ks.peering.standalone, ks.peering.mandatory, ks.peering.name, ks.peering.lifetime) == (False, True, "xpo", 12)
    priority = ks.peering.priority
    assert priority > 0
    apply_peering(ks, OperatorSettings(peering="xpo", peering_lifetime=12))  # the startup handler: same priority
    assert ks.peering.priority == priority
    standalone = kopf.OperatorSettings()
    apply_peering(standalone, OperatorSettings())
    assert standalone.peering.standalone is True
