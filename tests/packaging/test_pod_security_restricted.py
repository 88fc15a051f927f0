"""Pod Security "restricted" (+ read-only root filesystem) for every pod the chart renders and every
pod the operator builds; and the checker itself catches each kind of violation."""
from __future__ import annotations

import copy
from typing import Any

import pytest

import podsecurity
from chartkit import SCENARIOS, operator_workloads

GOOD_POD: dict[str, Any] = {
    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{
        "name": "app", "image": "x",
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }],
    "volumes": [{"name": "tmp", "emptyDir": {}}],
}


def _mutated(path: str, value: Any) -> dict[str, Any]:
    pod = copy.deepcopy(GOOD_POD)
    target: Any = pod
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    if value is None:
        target.pop(parts[-1], None)
    else:
        target[parts[-1]] = value
    return pod


# (mutation of GOOD_POD, words the finding must contain)
BAD = [
    (("hostNetwork", True), "hostNetwork"),
    (("hostPID", True), "hostPID"),
    (("volumes", [{"name": "h", "hostPath": {"path": "/"}}]), "hostPath"),
    (("volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}]), "not allowed"),
    (("securityContext.runAsNonRoot", None), "runAsNonRoot"),
    (("securityContext.runAsUser", 0), "runAsUser"),
    (("securityContext.seccompProfile", {"type": "Unconfined"}), "seccompProfile"),
    (("securityContext.seccompProfile", None), "seccompProfile"),
    (("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), "sysctl"),
    (("containers.0.securityContext.privileged", True), "privileged"),
    (("containers.0.securityContext.allowPrivilegeEscalation", None), "allowPrivilegeEscalation"),
    (("containers.0.securityContext.capabilities", {"drop": ["NET_RAW"]}), "drop must include ALL"),
    (("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["SYS_ADMIN"]}), "SYS_ADMIN"),
    (("containers.0.securityContext.readOnlyRootFilesystem", None), "readOnlyRootFilesystem"),
    (("containers.0.securityContext.runAsNonRoot", False), "runAsNonRoot"),
    (("containers.0.securityContext.seLinuxOptions", {"type": "spc_t"}), "seLinux"),
    (("containers.0.securityContext.procMount", "Unmasked"), "procMount"),
    (("containers.0.ports", [{"containerPort": 80, "hostPort": 80}]), "hostPort"),
]


def test_checker_accepts_a_restricted_pod() -> None:
    assert podsecurity.violations(GOOD_POD) == []
    # NET_BIND_SERVICE is the one capability restricted allows to add.
    ok = _mutated("containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})
    assert podsecurity.violations(ok) == []


@pytest.mark.parametrize(("mutation", "words"), BAD, ids=[m[0][0] + "=" + str(m[0][1])[:20] for m in BAD])
def test_checker_finds_each_violation(mutation: tuple[str, Any], words: str) -> None:
    found = podsecurity.violations(_mutated(*mutation))
    assert found and any(words in f for f in found), found


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_chart_pod_is_restricted(rendered: dict[str, list[dict[str, Any]]], scenario: str) -> None:
    objects = rendered[scenario]
    pods = [label for o in objects for label, _ in podsecurity.pod_specs(o)]
    assert pods, "no pod templates found"
    assert podsecurity.check_objects(objects) == {}


def test_chart_pod_templates_are_all_seen(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Guard against the check silently looking at nothing: the operator and the shared Redis."""
    seen = {label for objs in rendered.values() for o in objs for label, _ in podsecurity.pod_specs(o)}
    assert seen == {"Deployment/xml-pipeline-operator", "StatefulSet/xml-pipeline-operator-shared-redis"}


@pytest.mark.parametrize("pod_user_ids", ["fixed", "platform"])
def test_every_operator_pod_is_restricted(pod_user_ids: str) -> None:
    objects = operator_workloads(pod_user_ids)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    # All shapes are covered: pump and worker Deployments, Redis as Deployment and as StatefulSet.
    assert ("Deployment", "dedicated-workers-worker") in kinds
    assert ("Deployment", "dedicated-workers-redis") in kinds
    assert ("StatefulSet", "dedicated-persistent-redis") in kinds
    pods = [label for o in objects for label, _ in podsecurity.pod_specs(o)]
    assert len(pods) >= 9
    assert podsecurity.check_objects(objects) == {}


def _user_ids(objects: list[dict[str, Any]]) -> set[str]:
    """Which of runAsUser / runAsGroup / fsGroup any pod or container of `objects` sets."""
    found = set()
    for o in objects:
        for _label, pod in podsecurity.pod_specs(o):
            for sc in [pod.get("securityContext") or {}, *((c.get("securityContext") or {}) for c in pod["containers"])]:
                found |= {k for k in ("runAsUser", "runAsGroup", "fsGroup") if k in sc}
                assert sc.get("runAsNonRoot") is True  # kept either way
    return found


def test_platform_user_ids_leave_the_ids_to_the_platform(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """podUserIds / XPO_POD_USER_IDS `platform` (OpenShift): no pod sets a user id, every pod is still
    restricted; `fixed` sets them everywhere."""
    assert _user_ids(rendered["platform-user-ids"]) == set()
    assert _user_ids(rendered["shared-deploy"]) == {"runAsUser", "runAsGroup", "fsGroup"}
    assert _user_ids(operator_workloads("platform")) == set()
    assert _user_ids(operator_workloads("fixed")) == {"runAsUser", "runAsGroup", "fsGroup"}
