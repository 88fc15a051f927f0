"""The exact Kubernetes API permissions the operator uses (least privilege, no wildcards).

The chart's ClusterRole is generated from / checked against `RULES` by a test, so this list is the
single source of truth. Every verb here is one the operator (or kopf on its behalf) really calls;
the comment on each rule says who calls it and why.
"""
from __future__ import annotations

from typing import Final, TypedDict


class PolicyRule(TypedDict):
    """Shaped like a Kubernetes rbac.authorization.k8s.io/v1 PolicyRule."""

    apiGroups: list[str]
    resources: list[str]
    verbs: list[str]


RULES: Final[list[PolicyRule]] = [
    # kopf lists and watches Organisms, patches them (finalizer, progress annotations, status);
    # the Deployment-status handler GETs an Organism before refreshing its conditions.
    {"apiGroups": ["xml-pipeline.dev"], "resources": ["organisms"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["xml-pipeline.dev"], "resources": ["organisms/status"],
     "verbs": ["get", "patch"]},
    # Owned objects carry blockOwnerDeletion=true; with the OwnerReferencesPermissionEnforcement
    # admission plugin that needs `update` on the owner's finalizers subresource.
    {"apiGroups": ["xml-pipeline.dev"], "resources": ["organisms/finalizers"],
     "verbs": ["update"]},
    # The organism.yaml ConfigMap and the credentials Secret: read, create, patch drifted fields.
    # They always exist while the Organism does (garbage-collected through ownerReferences), so the
    # operator never deletes them. Secrets are fetched one by one (GET): no list/watch, so the operator
    # cannot enumerate the cluster's Secrets.
    {"apiGroups": [""], "resources": ["configmaps", "secrets"],
     "verbs": ["get", "create", "patch"]},
    # The dedicated Redis Service: deleted when the Organism switches away from dedicated mode.
    {"apiGroups": [""], "resources": ["services"],
     "verbs": ["get", "create", "patch", "delete"]},
    # Pump, worker and dedicated-Redis workloads. list/watch: kopf watches their status to refresh the
    # Organism's conditions. delete: workers removed when the backend is no longer redis, the Redis
    # Deployment/StatefulSet swapped when persistence is toggled or the mode changes.
    {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets"],
     "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    # The dedicated Redis's NetworkPolicy (only the organism's pods may connect): deleted with the
    # Service when the Organism switches away from dedicated mode.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "create", "patch", "delete"]},
    # Disruption budgets of the workers (and of the pump when it has several replicas): deleted when
    # switched off or no longer applicable (the pump back at one replica).
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"],
     "verbs": ["get", "create", "patch", "delete"]},
    # spec.workers.autoscaling without KEDA: a CPU HorizontalPodAutoscaler; deleted when autoscaling is
    # switched off or KEDA takes over.
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"],
     "verbs": ["get", "create", "patch", "delete"]},
    # spec.workers.autoscaling with KEDA: the ScaledObject and the TriggerAuthentication naming the
    # organism's Secret (KEDA reads the Secret itself; the operator never hands it a password).
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects", "triggerauthentications"],
     "verbs": ["get", "create", "patch", "delete"]},
    # kopf posts Kubernetes Events (core/v1 only) for handler outcomes and our provisioning steps.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # kopf's namespace observer (only when XPO_NAMESPACES lists namespaces: it notices watched
    # namespaces created after start) and its CRD observer (notices the Organism CRD being installed
    # or upgraded after the operator started). Read-only.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["list", "watch"]},
]

#: Only with operator peering (the chart's replicaCount > 1): kopf lists and watches its peering
#: object and patches its own keep-alive into it. ClusterKopfPeering when the operator watches the
#: whole cluster, KopfPeering in each watched namespace otherwise.
PEERING_RULES: Final[list[PolicyRule]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["list", "watch", "patch"]},
]

#: Only with the client-pod webhook in self-signed mode (chart value webhook.enabled, certManager off):
#: the operator writes its certificate's CA into the chart's MutatingWebhookConfiguration
#: (webhook.publish_ca). The chart restricts both verbs to that one object by resourceNames.
WEBHOOK_RULES: Final[list[PolicyRule]] = [
    {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
     "verbs": ["get", "patch"]},
]
