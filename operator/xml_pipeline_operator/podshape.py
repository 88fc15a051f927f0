"""Pod shaping: the subset of a PodTemplate a user may set on the pump, worker and dedicated-Redis pods.

`spec.pump.template`, `spec.workers.template` and `spec.backend.redis.dedicated.template`:

    metadata: {labels, annotations}
    spec: {env, envFrom, volumeMounts,                       # of the pod's one container
           volumes, serviceAccountName, imagePullSecrets, nodeSelector, tolerations, affinity,
           topologySpreadConstraints, priorityClassName}

Merge rules (docs/operator.md, "Shaping the pods"):
- The operator's own fields win, and a spec that tries to set one is refused naming the field:
  env names of the contract (XP_* in pump/worker pods, REDIS_PASSWORD/REDISCLI_AUTH in Redis pods),
  the operator's volumes and mount paths (the config mount, /tmp, /data), labels under
  app.kubernetes.io/ and xml-pipeline.dev/, annotations under xml-pipeline.dev/.
- User env follows the operator's env, user volumes and mounts follow the operator's, user labels
  and annotations are added to the operator's.
- Volume sources are limited to those the Pod Security "restricted" profile admits.
- Security contexts, probes, the image, the command and automountServiceAccountToken are not in the
  subset: they cannot be shaped.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xml_pipeline.contract import CONFIG_DIR

PodRole = Literal["pump", "worker", "redis"]

METADATA_KEYS = ("labels", "annotations")
SPEC_KEYS = ("env", "envFrom", "volumeMounts", "volumes", "serviceAccountName", "imagePullSecrets",
             "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName")
#: Volume sources the Pod Security "restricted" profile admits.
VOLUME_SOURCES = ("configMap", "secret", "emptyDir", "projected", "downwardAPI", "persistentVolumeClaim",
                  "csi", "ephemeral")
#: Label/annotation prefixes of the operator's contract.
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "xml-pipeline.dev/")
RESERVED_ANNOTATION_PREFIXES = ("xml-pipeline.dev/",)
MAX_ITEMS = 64

#: Per role: reserved env names/prefixes, volume names, and mount paths (a user mount may not be at or
#: under them, nor above them).
_RESERVED: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "pump": (("XP_",), ("config", "tmp"), (CONFIG_DIR, "/tmp")),
    "worker": (("XP_",), ("config", "tmp"), (CONFIG_DIR, "/tmp")),
    "redis": (("REDIS_PASSWORD", "REDISCLI_AUTH"), ("data", "tmp"), ("/data", "/tmp")),
}
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class PodShape:
    """A validated template subset; empty by default (the operator's pod unchanged)."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    env: list[dict[str, Any]] = field(default_factory=list)
    env_from: list[dict[str, Any]] = field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    service_account_name: str | None = None
    image_pull_secrets: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] = field(default_factory=list)
    priority_class_name: str | None = None


EMPTY = PodShape()


class ShapeError(ValueError):
    """(field, problem, allowed): turned into model.SpecError by the caller."""

    def __init__(self, field_path: str, problem: str, allowed: str) -> None:
        super().__init__(field_path, problem, allowed)
        self.field, self.problem, self.allowed = field_path, problem, allowed


# ------------------------------------------------------------------------------------------ parsing
def parse(raw: Any, path: str, role: PodRole) -> PodShape:
    """Validate `<path>` (a template subset) for a pod of `role`. Raises ShapeError naming the field."""
    if raw is None:
        return EMPTY
    t = as_mapping(raw, path)
    only_known(t, path, ("metadata", "spec"))
    meta = as_mapping(t.get("metadata") or {}, f"{path}.metadata")
    only_known(meta, f"{path}.metadata", METADATA_KEYS)
    spec = as_mapping(t.get("spec") or {}, f"{path}.spec")
    only_known(spec, f"{path}.spec", SPEC_KEYS)
    env_names, volume_names, mount_paths = _RESERVED[role]

    labels = _strings(meta.get("labels"), f"{path}.metadata.labels")
    for key in labels:
        if key.startswith(RESERVED_LABEL_PREFIXES):
            raise ShapeError(f"{path}.metadata.labels.{key}", "is a label of the operator's contract",
                             "keys outside " + ", ".join(RESERVED_LABEL_PREFIXES))
    annotations = _strings(meta.get("annotations"), f"{path}.metadata.annotations")
    for key in annotations:
        if key.startswith(RESERVED_ANNOTATION_PREFIXES):
            raise ShapeError(f"{path}.metadata.annotations.{key}", "is an annotation of the operator",
                             "keys outside " + ", ".join(RESERVED_ANNOTATION_PREFIXES))

    sp = f"{path}.spec"
    env = _items(spec.get("env"), f"{sp}.env")
    seen: set[str] = set()
    for i, var in enumerate(env):
        only_known(var, f"{sp}.env[{i}]", ("name", "value", "valueFrom"))
        name = var.get("name")
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ShapeError(f"{sp}.env[{i}].name", f"{name!r} is not an environment variable name",
                             "letters, digits, '_', '-', '.', not starting with a digit")
        if any(name == r or (r.endswith("_") and name.startswith(r)) for r in env_names):
            raise ShapeError(f"{sp}.env[{i}].name", f"{name!r} is set by the operator",
                             "names other than " + ", ".join(r + ("*" if r.endswith("_") else "") for r in env_names))
        if name in seen:
            raise ShapeError(f"{sp}.env[{i}].name", f"{name!r} is given twice", "each name once")
        seen.add(name)
        if "value" in var and "valueFrom" in var:
            raise ShapeError(f"{sp}.env[{i}]", "has both value and valueFrom", "one of value, valueFrom")
        if "value" in var and not isinstance(var["value"], str):
            raise ShapeError(f"{sp}.env[{i}].value", f"must be a string, got {var['value']!r}", "a string (quote numbers)")
        if "valueFrom" in var:
            as_mapping(var["valueFrom"], f"{sp}.env[{i}].valueFrom")
    env_from = _items(spec.get("envFrom"), f"{sp}.envFrom")
    for i, src in enumerate(env_from):
        only_known(src, f"{sp}.envFrom[{i}]", ("prefix", "configMapRef", "secretRef"))
        if ("configMapRef" in src) == ("secretRef" in src):
            raise ShapeError(f"{sp}.envFrom[{i}]", "needs exactly one of configMapRef, secretRef",
                             "{secretRef: {name: ...}} or {configMapRef: {name: ...}}")
        prefix = src.get("prefix", "")
        if not isinstance(prefix, str) or any(prefix.startswith(r) for r in env_names if r.endswith("_")):
            raise ShapeError(f"{sp}.envFrom[{i}].prefix", f"{prefix!r} would name variables the operator sets",
                             "a prefix other than " + ", ".join(r for r in env_names if r.endswith("_")))

    volumes = _items(spec.get("volumes"), f"{sp}.volumes")
    names: set[str] = set()
    for i, vol in enumerate(volumes):
        name = vol.get("name")
        if not isinstance(name, str) or len(name) > 63 or not _DNS_1123_LABEL.match(name):
            raise ShapeError(f"{sp}.volumes[{i}].name", f"{name!r} is not a volume name", "a DNS label")
        if name in volume_names:
            raise ShapeError(f"{sp}.volumes[{i}].name", f"{name!r} is a volume of the operator",
                             "names other than " + ", ".join(volume_names))
        if name in names:
            raise ShapeError(f"{sp}.volumes[{i}].name", f"{name!r} is given twice", "each name once")
        names.add(name)
        sources = [k for k in vol if k != "name"]
        if len(sources) != 1 or sources[0] not in VOLUME_SOURCES:
            raise ShapeError(f"{sp}.volumes[{i}]", f"has source(s) {sources!r}",
                             "exactly one of " + ", ".join(VOLUME_SOURCES) + " (Pod Security restricted)")
    mounts = _items(spec.get("volumeMounts"), f"{sp}.volumeMounts")
    for i, mount in enumerate(mounts):
        only_known(mount, f"{sp}.volumeMounts[{i}]", ("name", "mountPath", "subPath", "readOnly"))
        if mount.get("name") not in names:
            raise ShapeError(f"{sp}.volumeMounts[{i}].name", f"{mount.get('name')!r} is not one of the template's volumes",
                             ", ".join(sorted(names)) or "add the volume to spec.volumes first")
        mpath = mount.get("mountPath")
        if not isinstance(mpath, str) or not mpath.startswith("/"):
            raise ShapeError(f"{sp}.volumeMounts[{i}].mountPath", f"{mpath!r} is not an absolute path", "e.g. /var/run/app")
        norm = mpath.rstrip("/") or "/"
        for reserved in mount_paths:
            if norm == reserved or norm.startswith(reserved + "/") or reserved.startswith(norm.rstrip("/") + "/"):
                raise ShapeError(f"{sp}.volumeMounts[{i}].mountPath", f"{mpath!r} overlaps the operator's mount {reserved}",
                                 "a path outside " + ", ".join(mount_paths))

    sa = spec.get("serviceAccountName")
    if sa is not None and (not isinstance(sa, str) or len(sa) > 253 or not _DNS_1123_SUBDOMAIN.match(sa)):
        raise ShapeError(f"{sp}.serviceAccountName", f"{sa!r} is not a ServiceAccount name", "a DNS subdomain")
    pull = _items(spec.get("imagePullSecrets"), f"{sp}.imagePullSecrets")
    for i, ref in enumerate(pull):
        only_known(ref, f"{sp}.imagePullSecrets[{i}]", ("name",))
        if not isinstance(ref.get("name"), str) or not _DNS_1123_SUBDOMAIN.match(ref["name"]):
            raise ShapeError(f"{sp}.imagePullSecrets[{i}].name", f"{ref.get('name')!r} is not a Secret name",
                             "a DNS subdomain")
    pcn = spec.get("priorityClassName")
    if pcn is not None and (not isinstance(pcn, str) or len(pcn) > 253 or not _DNS_1123_SUBDOMAIN.match(pcn)):
        raise ShapeError(f"{sp}.priorityClassName", f"{pcn!r} is not a PriorityClass name", "a DNS subdomain")
    affinity = spec.get("affinity")
    if affinity is not None:
        affinity = dict(as_mapping(affinity, f"{sp}.affinity"))
        only_known(affinity, f"{sp}.affinity", ("nodeAffinity", "podAffinity", "podAntiAffinity"))
    return PodShape(
        labels=labels, annotations=annotations, env=[dict(v) for v in env], env_from=[dict(v) for v in env_from],
        volume_mounts=[dict(m) for m in mounts], volumes=[dict(v) for v in volumes], service_account_name=sa,
        image_pull_secrets=[dict(p) for p in pull],
        node_selector=_strings(spec.get("nodeSelector"), f"{sp}.nodeSelector"),
        tolerations=[dict(t) for t in _items(spec.get("tolerations"), f"{sp}.tolerations")],
        affinity=affinity,
        topology_spread_constraints=[dict(c) for c in _items(spec.get("topologySpreadConstraints"),
                                                             f"{sp}.topologySpreadConstraints")],
        priority_class_name=pcn,
    )


# ------------------------------------------------------------------------------------------ merging
def apply_shape(template: dict[str, Any], shape: PodShape) -> dict[str, Any]:
    """The operator's pod template with `shape` merged in (the operator's fields first, and kept).

    Every field of the subset is written, empty when the shape leaves it out: the subset is owned by
    the Organism, so a hand edit of one of these fields on the Deployment is reverted on the next
    reconcile (None means "must be absent": apply.diff removes it only when the live object has it).
    """
    meta, spec = template["metadata"], template["spec"]
    meta["labels"] = {**shape.labels, **meta.get("labels", {})}
    meta["annotations"] = {**shape.annotations, **meta.get("annotations", {})}
    container = spec["containers"][0]
    container["env"] = list(container.get("env", [])) + [dict(v) for v in shape.env]
    container["envFrom"] = [dict(v) for v in shape.env_from] or None
    container["volumeMounts"] = list(container.get("volumeMounts", [])) + [dict(m) for m in shape.volume_mounts]
    spec["volumes"] = list(spec.get("volumes", [])) + [dict(v) for v in shape.volumes]
    spec["serviceAccountName"] = shape.service_account_name
    spec["imagePullSecrets"] = [dict(p) for p in shape.image_pull_secrets] or None
    spec["nodeSelector"] = dict(shape.node_selector) or None
    spec["tolerations"] = [dict(t) for t in shape.tolerations] or None
    spec["affinity"] = dict(shape.affinity) if shape.affinity else None
    spec["topologySpreadConstraints"] = [dict(c) for c in shape.topology_spread_constraints] or None
    spec["priorityClassName"] = shape.priority_class_name
    return template


# ------------------------------------------------------------------------------------------ helpers
def as_mapping(value: Any, path: str) -> Mapping[str, Any]:
    """`value` if it is a mapping, else a ShapeError naming `path` (also used by scaling.py)."""
    if not isinstance(value, Mapping):
        raise ShapeError(path, f"must be a mapping, got {type(value).__name__}", "a mapping of fields")
    return value


def only_known(value: Mapping[str, Any], path: str, allowed: tuple[str, ...],
               why: str = "is not a known field (or not in the shapeable subset)") -> None:
    for key in value:
        if key not in allowed:
            raise ShapeError(f"{path}.{key}", why, ", ".join(allowed))


def _strings(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    m = as_mapping(value, path)
    for k, v in m.items():
        if not isinstance(k, str) or not k or len(k) > 317:
            raise ShapeError(path, f"key {k!r} is not a label/annotation key", "prefix/name, e.g. team.example.com/owner")
        if not isinstance(v, str):
            raise ShapeError(f"{path}.{k}", f"must be a string, got {v!r}", "a string (quote numbers and booleans)")
    return dict(m)


def _items(value: Any, path: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ShapeError(path, f"must be a list, got {type(value).__name__}", "a list of mappings")
    if len(value) > MAX_ITEMS:
        raise ShapeError(path, f"has {len(value)} items", f"at most {MAX_ITEMS}")
    return [as_mapping(v, f"{path}[{i}]") for i, v in enumerate(value)]
