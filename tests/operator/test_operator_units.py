"""Unit tests: settings from the environment, the model's extra checks, diffing, status conditions."""
from __future__ import annotations

from typing import Any

import pytest

from xml_pipeline.errors import ConfigError
from xml_pipeline_operator import apply, model, status as st
from xml_pipeline_operator.desired import build
from xml_pipeline_operator.settings import OperatorSettings

LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]


def body(spec: dict[str, Any], name: str = "orders", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "shop", "uid": "u", "generation": 2},
            "spec": {"config": {"listeners": LISTENERS}, **spec}, "status": status}


# -------------------------------------------------------------------------------------------- settings
def test_settings_from_environment() -> None:
    s = OperatorSettings.from_env({
        "XPO_NAMESPACES": "team-a, team-b,team-a", "XPO_DEFAULT_IMAGE": "reg.example/xp:9",
        "XPO_DEFAULT_TTL": "3600", "XPO_REDIS_IMAGE": "redis:7.2.5-alpine",
        "XPO_SHARED_REDIS_URL": "rediss://shared.platform.svc:6380/0", "XPO_SHARED_REDIS_USERNAME": "admin",
        "XPO_SHARED_REDIS_PASSWORD": " s3cret ", "XPO_HEALTH_PORT": "9090", "XPO_LOG_LEVEL": "debug",
        "XPO_RESYNC_SECONDS": "0", "XPO_PROBE_EXTERNAL_REDIS": "False", "XPO_POD_USER_IDS": "platform"})
    assert s.namespaces == ("team-a", "team-b") and not s.clusterwide
    assert s.probe_external_redis is False and s.pod_user_ids == "platform"
    assert (s.default_image, s.default_ttl, s.health_port, s.log_level, s.resync_seconds) == (
        "reg.example/xp:9", 3600, 9090, "DEBUG", 0.0)
    assert s.shared_redis_password == " s3cret "  # verbatim
    assert "s3cret" not in repr(s)


def test_settings_defaults() -> None:
    s = OperatorSettings.from_env({})
    assert s.clusterwide and s.default_ttl == 86400 and s.health_port == 8080
    assert s.redis_image == "redis:7.2.5-alpine" and s.shared_redis_url is None
    assert s.default_image.startswith("ghcr.io/xml-pipeline/xml-pipeline:")
    assert s.probe_external_redis is True and s.pod_user_ids == "fixed"


@pytest.mark.parametrize("env, field", [
    ({"XPO_NAMESPACES": "Team_A"}, "XPO_NAMESPACES"),
    ({"XPO_DEFAULT_TTL": "5"}, "XPO_DEFAULT_TTL"),
    ({"XPO_DEFAULT_TTL": "a day"}, "XPO_DEFAULT_TTL"),
    ({"XPO_HEALTH_PORT": "70000"}, "XPO_HEALTH_PORT"),
    ({"XPO_LOG_LEVEL": "chatty"}, "XPO_LOG_LEVEL"),
    ({"XPO_PROBE_EXTERNAL_REDIS": "maybe"}, "XPO_PROBE_EXTERNAL_REDIS"),
    ({"XPO_POD_USER_IDS": "openshift"}, "XPO_POD_USER_IDS"),
    ({"XPO_SHARED_REDIS_URL": "redis://admin:hunter2@shared:6379"}, "XPO_SHARED_REDIS_URL"),
    ({"XPO_SHARED_REDIS_URL": "http://shared:6379"}, "XPO_SHARED_REDIS_URL"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        OperatorSettings.from_env(env)
    assert err.value.field == field and err.value.allowed
    assert "hunter2" not in str(err.value)


def test_retry_backoff_doubles_and_is_capped() -> None:
    s = OperatorSettings(retry_base_seconds=1, retry_max_seconds=10)
    assert [s.retry_delay(n) for n in range(6)] == [1, 2, 4, 8, 10, 10]


# ------------------------------------------------------------------------------------------------ model
def test_shared_mode_without_a_shared_redis_is_refused() -> None:
    with pytest.raises(model.SpecError) as err:
        model.parse_organism(body({"backend": {"redis": {"mode": "shared"}}}), OperatorSettings())
    assert err.value.reason == "SharedRedisNotConfigured" and err.value.field == "spec.backend.redis.mode"


def test_prefix_change_is_refused_with_prefix_immutable() -> None:
    org = model.parse_organism(body({"backend": {"redis": {"prefix": "xp:new:"}}}), OperatorSettings())
    model.check_prefix_unchanged(org, None)
    model.check_prefix_unchanged(org, "xp:new:")
    with pytest.raises(model.SpecError) as err:
        model.check_prefix_unchanged(org, "xp:shop.orders:")
    assert err.value.reason == "PrefixImmutable" and "'xp:shop.orders:'" in str(err.value)


def test_defaults_resolved_by_the_model() -> None:
    s = OperatorSettings(default_ttl=4242, default_image="img:1")
    org = model.parse_organism(body({}), s)
    assert org.backend_type == "redis" and org.image == "img:1" and org.workers is None
    assert org.redis == model.RedisSpec(mode="dedicated", prefix="xp:shop.orders:", ttl=4242)


@pytest.mark.parametrize("path, expected", [
    ("spec.backend.redis.ttl", "InvalidBackendRedisTtl"),
    ("spec.config.listeners[3].handler", "InvalidConfigListenersHandler"),
    ("metadata.name", "InvalidMetadataName"),
    ("spec.pump.resources.requests.memory", "InvalidPumpResourcesRequestsMemory"),
])
def test_condition_reasons_name_the_field(path: str, expected: str) -> None:
    assert model.reason_for(path) == expected


# -------------------------------------------------------------------------------------------- diffing
def test_diff_ignores_what_the_server_adds() -> None:
    desired = {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}}
    actual = {"spec": {"replicas": 1, "revisionHistoryLimit": 10, "template": {"spec": {
        "dnsPolicy": "ClusterFirst", "containers": [{"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent"}]}}},
        "status": {"readyReplicas": 1}}
    assert apply.diff(desired, actual) is None


def test_diff_patches_only_what_differs_and_lists_whole() -> None:
    desired = {"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 3, "list": [{"n": 1}, {"n": 2}]}}
    actual = {"metadata": {"labels": {"a": "1", "other": "x"}}, "spec": {"replicas": 2, "list": [{"n": 1}, {"n": 3}]}}
    assert apply.diff(desired, actual) == {"spec": {"replicas": 3, "list": [{"n": 1}, {"n": 2}]}}
    assert apply.diff({"a": {"b": "c"}}, {}) == {"a": {"b": "c"}}
    assert apply.diff({"a": True}, {"a": 1}) == {"a": True}


def test_quantities_compare_by_value() -> None:
    desired = {"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": 1}}}
    actual = {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1"}}}
    assert apply.diff(desired, actual) is None
    assert apply.diff(desired, {"resources": {"requests": {"cpu": "600m", "memory": "1Gi"}, "limits": {"cpu": "1"}}})


def test_ownership_is_by_uid() -> None:
    assert apply.owned_by({"metadata": {"ownerReferences": [{"uid": "u"}]}}, "u")
    assert not apply.owned_by({"metadata": {"ownerReferences": [{"uid": "v"}]}}, "u")
    assert not apply.owned_by({"metadata": {}}, "u")


# --------------------------------------------------------------------------------------------- status
def _status(org_spec: dict[str, Any], previous: dict[str, Any], pump_ready: int, now: str) -> dict[str, Any]:
    s = OperatorSettings()
    org = model.parse_organism(body(org_spec), s)
    want = build(org, s)
    pump = st.WorkloadState("orders-pump", 1, pump_ready, pump_ready, True)
    redis = st.WorkloadState("orders-redis", 1, 1, 1, True)
    return st.build_status(previous=previous, generation=2, now=now, org=org, desired=want,
                           redis=st.redis_condition_local(org, redis), pump=st.pump_condition(pump),
                           workers=st.workers_condition(org, None), blocked=None, failed=False, workers_state=None)


def test_status_conditions_phase_and_redis() -> None:
    status = _status({}, {}, 1, "T1")
    assert status["phase"] == "Ready" and status["observedGeneration"] == 2
    assert [(c["type"], c["status"], c["reason"]) for c in status["conditions"]] == [
        ("RedisReady", "True", "RedisAvailable"), ("PumpReady", "True", "PumpAvailable"),
        ("WorkersReady", "True", "NoWorkers"), ("Ready", "True", "OrganismReady")]
    assert status["redis"] == {"mode": "dedicated", "endpoint": "redis://orders-redis.shop.svc:6379/0",
                               "prefix": "xp:shop.orders:", "ttl": 86400, "secretName": "orders-credentials",
                               "topology": "standalone"}


def test_last_transition_time_moves_only_on_a_status_change() -> None:
    first = _status({}, {}, 1, "T1")
    same = _status({}, first, 1, "T2")
    assert st.status_patch(first, same) is None  # idle: nothing to write
    degraded = _status({}, same, 0, "T3")
    assert degraded["phase"] == "Degraded"
    times = {c["type"]: c["lastTransitionTime"] for c in degraded["conditions"]}
    assert times == {"RedisReady": "T1", "PumpReady": "T3", "WorkersReady": "T1", "Ready": "T3"}
    patch = st.status_patch(same, degraded)
    assert patch is not None and set(patch) == {"phase", "conditions"}


def test_a_refused_spec_keeps_the_running_objects_conditions() -> None:
    running = _status({}, {}, 1, "T1")
    refused = st.build_status(previous=running, generation=3, now="T2", org=None, desired=None, redis=None,
                              pump=None, workers=None, failed=True, workers_state=None,
                              blocked=st.Condition("Ready", "False", "InvalidBackendRedisTtl", "spec.backend.redis.ttl: ..."))
    assert refused["phase"] == "Failed" and refused["redis"] == running["redis"]
    conds = {c["type"]: (c["status"], c["reason"]) for c in refused["conditions"]}
    assert conds == {"RedisReady": ("True", "RedisAvailable"), "PumpReady": ("True", "PumpAvailable"),
                     "WorkersReady": ("True", "NoWorkers"), "Ready": ("False", "InvalidBackendRedisTtl")}


def test_workload_state_from_a_deployment_status() -> None:
    dep = {"metadata": {"name": "d", "generation": 4}, "spec": {"replicas": 3},
           "status": {"observedGeneration": 3, "readyReplicas": 3, "updatedReplicas": 3}}
    state = st.WorkloadState.from_body(dep)
    assert not state.rolled_out and not state.available  # the controller has not seen generation 4 yet
    dep["status"]["observedGeneration"] = 4
    assert st.WorkloadState.from_body(dep).available
