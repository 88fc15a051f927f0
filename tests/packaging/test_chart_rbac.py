"""The chart's RBAC is exactly RULES of operator/xml_pipeline_operator/rbac.py: no wildcard, nothing
the operator does not use, in both the cluster-wide and the namespaced mode."""
from __future__ import annotations

from typing import Any

from chartkit import NAMESPACE, find, one
from xml_pipeline_operator.rbac import PEERING_RULES, RULES, WEBHOOK_RULES

OPERATOR_SA = {"kind": "ServiceAccount", "name": "xml-pipeline-operator", "namespace": NAMESPACE}
CLUSTER_SCOPED = {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}


def _rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("apiGroups", "resources", "verbs")} for r in role["rules"]]


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def _operator_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The (Cluster)Roles bound to the operator's ServiceAccount."""
    roles = []
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        if OPERATOR_SA in binding["subjects"]:
            ref = binding["roleRef"]
            candidates = [o for o in objects if o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"]
                          and o["metadata"].get("namespace") == binding["metadata"].get("namespace")]
            assert len(candidates) == 1, f"binding {binding['metadata']} refers to a missing role"
            roles.append(candidates[0])
    return roles


def test_cluster_wide_rules_are_exactly_rbac_py(rendered: dict[str, list[dict[str, Any]]]) -> None:
    roles = _operator_roles(rendered["defaults"])
    assert [r["kind"] for r in roles] == ["ClusterRole"]
    assert _rules(roles[0]) == RULES


def test_namespaced_rules_are_rbac_py_split_by_scope(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each watched namespace gets the namespaced rules in a Role; the cluster-scoped read-only rules
    (kopf's namespace and CRD observers) sit in a ClusterRole; together they are exactly RULES."""
    objects = rendered["namespaced"]
    roles = _operator_roles(objects)
    namespaced = [r for r in roles if r["kind"] == "Role"]
    cluster = [r for r in roles if r["kind"] == "ClusterRole"]
    assert sorted(r["metadata"]["namespace"] for r in namespaced) == ["team-a", "team-b"]
    assert len(cluster) == 1
    for role in namespaced:
        assert not {(g, r) for g, r, _ in _triples(_rules(role))} & CLUSTER_SCOPED
        assert _rules(role) + _rules(cluster[0]) == RULES
    assert {(g, r) for g, r, _ in _triples(_rules(cluster[0]))} == CLUSTER_SCOPED
    assert {v for *_, v in _triples(_rules(cluster[0]))} <= {"get", "list", "watch"}


def test_peering_adds_exactly_peering_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """replicaCount > 1: the operator's roles are RULES + PEERING_RULES, in both modes; 1: no peering rights."""
    (role,) = _operator_roles(rendered["peering"])
    assert _rules(role) == RULES + PEERING_RULES
    roles = _operator_roles(rendered["peering-namespaced"])
    for ns_role in (r for r in roles if r["kind"] == "Role"):
        assert _rules(ns_role) == [r for r in RULES if (r["apiGroups"][0], r["resources"][0]) not in CLUSTER_SCOPED] \
            + PEERING_RULES
    assert not _triples(list(PEERING_RULES)) & _triples(_rules(_operator_roles(rendered["defaults"])[0]))


def test_no_wildcards_and_nothing_beyond_rules(rendered: dict[str, list[dict[str, Any]]]) -> None:
    allowed = _triples(list(RULES) + list(PEERING_RULES) + list(WEBHOOK_RULES))
    for scenario, objects in rendered.items():
        for role in find(objects, "ClusterRole") + find(objects, "Role"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                    assert not any("*" in item for item in rule.get(field, [])), \
                        f"{scenario}: {role['metadata']['name']} has a wildcard in {field}"
        for role in _operator_roles(objects):
            extra = _triples(_rules(role)) - allowed
            assert not extra, f"{scenario}: {role['metadata']['name']} grants {sorted(extra)} beyond RULES"


def test_secrets_cannot_be_listed_or_watched() -> None:
    """Least privilege as RULES states it: Secrets only by name (an operator that can list Secrets
    can read every Secret of the cluster)."""
    verbs = {v for g, r, v in _triples(list(RULES)) if (g, r) == ("", "secrets")}
    assert verbs and not verbs & {"list", "watch", "deletecollection"}


def test_organism_roles_are_aggregated_to_admin_edit_view(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["defaults"]
    view = one(objects, "ClusterRole", "xml-pipeline-operator-organisms-view")
    edit = one(objects, "ClusterRole", "xml-pipeline-operator-organisms-edit")
    label = "rbac.authorization.k8s.io/aggregate-to-{}"
    for role in ("view", "edit", "admin"):
        assert view["metadata"]["labels"][label.format(role)] == "true"
    for role in ("edit", "admin"):
        assert edit["metadata"]["labels"][label.format(role)] == "true"
    assert label.format("view") not in edit["metadata"]["labels"]  # viewers never write
    assert _triples(_rules(view)) <= {("xml-pipeline.dev", r, v) for r in ("organisms", "organisms/status")
                                       for v in ("get", "list", "watch")}
    assert {g for g, _, _ in _triples(_rules(edit))} == {"xml-pipeline.dev"}
    assert {r for _, r, _ in _triples(_rules(edit))} == {"organisms"}  # status stays the operator's
    # They are for people, not for the operator.
    assert view not in _operator_roles(objects) and edit not in _operator_roles(objects)
    assert not find(rendered["no-rbac"], "ClusterRole")


def test_webhook_adds_exactly_webhook_rules_for_one_named_object(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The client-pod webhook in self-signed mode: RULES + WEBHOOK_RULES, the latter limited by
    resourceNames to the chart's own MutatingWebhookConfiguration; with cert-manager: no extra rights."""
    objects = rendered["webhook"]
    roles = _operator_roles(objects)
    assert sorted((_rules(r) for r in roles), key=len) == [WEBHOOK_RULES, RULES]
    (extra,) = [r for r in roles if _rules(r) == WEBHOOK_RULES]
    (mwc,) = find(objects, "MutatingWebhookConfiguration")
    assert extra["rules"][0]["resourceNames"] == [mwc["metadata"]["name"]]
    assert [_rules(r) for r in _operator_roles(rendered["webhook-cert-manager"])] == [RULES]


def test_webhook_configuration_selects_only_labelled_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from xml_pipeline_operator import webhook
    assert not find(rendered["defaults"], "MutatingWebhookConfiguration")  # off by default
    for scenario in ("webhook", "webhook-cert-manager"):
        objects = rendered[scenario]
        (mwc,) = find(objects, "MutatingWebhookConfiguration")
        (hook,) = mwc["webhooks"]
        assert hook["objectSelector"] == {"matchExpressions": [{"key": webhook.CLIENT_LABEL, "operator": "Exists"}]}
        assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                                  "operations": ["CREATE"], "scope": "Namespaced"}]
        assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
        service = hook["clientConfig"]["service"]
        svc = one(objects, "Service", service["name"])
        assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
        (deploy,) = find(objects, "Deployment")
        env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["XPO_WEBHOOK_HOST"] == f"{service['name']}.{service['namespace']}.svc"
        if scenario == "webhook":
            assert env["XPO_WEBHOOK_CONFIGURATION"] == mwc["metadata"]["name"] and "XPO_WEBHOOK_CERT_DIR" not in env
        else:
            assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].endswith("-webhook")
            assert hook["namespaceSelector"] == {"matchLabels": {"xml-pipeline.dev/clients": "on"}}
            assert env["XPO_WEBHOOK_CERT_DIR"] and "XPO_WEBHOOK_CONFIGURATION" not in env
            (cert,) = find(objects, "Certificate")
            assert f"{service['name']}.{service['namespace']}.svc" in cert["spec"]["dnsNames"]
