"""Typed Organism spec: parsing and validation.

The CRD's schema and CEL rules reject bad specs at the API server, but a spec can still slip past
(the CRD applied without its schema, an older CRD version, `--validate=false` tooling, a bug in a
rule). So everything the schema promises is checked again here, and more (requests above limits,
unknown keys). Every error is a `SpecError` naming the field path and the allowed values; the
handlers turn it into Ready=False with a reason derived from the field (`InvalidBackendRedisTtl`).

This module holds the Organism and its pods' parts; spec.backend.redis is redis_spec.py, the shared
field helpers are spec_fields.py (their public names are re-exported here).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import yaml
from xml_pipeline.contract import default_prefix
from xml_pipeline.errors import ConfigError
from xml_pipeline.organism import parse_organism as parse_library_organism

from .podshape import EMPTY as EMPTY_SHAPE
from .podshape import PodShape
from .podshape import parse as parse_shape
from .redis_spec import (
    DELETION_POLICIES,
    EXTERNAL_MODES,
    REDIS_MODES,
    ExternalRedis,
    Persistence,
    RedisMode,
    RedisSpec,
    SecretKeyRef,
    parse_redis,
    reserved_prefix_problem,
)
from .scaling import Autoscaling, DisruptionBudget, parse_autoscaling, parse_budget
from .settings import OperatorSettings
from .spec_fields import (
    DEFAULT_APP_RESOURCES,
    DEFAULT_REDIS_RESOURCES,
    Resources,
    SpecError,
    integer,
    known,
    mapping,
    parse_resources,
    reason_for,
    shaped,
)

__all__ = [
    "BACKEND_TYPES", "DEFAULT_APP_RESOURCES", "DEFAULT_REDIS_RESOURCES", "DELETION_POLICIES", "EXTERNAL_MODES",
    "REDIS_MODES", "BackendType", "ExternalRedis", "Organism", "Persistence", "PumpSpec", "RedisMode", "RedisSpec",
    "Resources", "SecretKeyRef", "SpecError", "WorkersSpec", "check_prefix_unchanged", "default_prefix",
    "parse_organism", "reason_for", "reserved_prefix_problem",
]

BackendType = Literal["memory", "manager", "redis"]
BACKEND_TYPES: tuple[str, ...] = ("memory", "manager", "redis")
MAX_NAME_LEN = 40  # leaves room for "-credentials", "-redis-0" and pod-name hashes within 63
MAX_WORKER_REPLICAS = 100
MAX_PUMP_REPLICAS = 10
MAX_PROCESSES = 64
MAX_CONFIG_BYTES = 512 * 1024  # a ConfigMap holds at most 1 MiB; keep well below
#: Keys of spec.config: organism.yaml minus `backend` (which the operator writes).
CONFIG_KEYS = ("organism", "process_pool", "listeners")

# \Z, not $: '$' also matches before a trailing newline. re.ASCII: \d would take other digits.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?\Z")
#: An image reference, [registry[:port]/]path[:tag][@sha256:digest] (the CRD's pattern): no
#: whitespace and no shell metacharacters.
_IMAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*"
                    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?\Z")


# --------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class WorkersSpec:
    replicas: int
    processes: int
    resources: Resources = DEFAULT_APP_RESOURCES
    shape: PodShape = EMPTY_SHAPE
    #: None: the operator owns the replica count (spec.workers.replicas).
    autoscaling: Autoscaling | None = None
    budget: DisruptionBudget = DisruptionBudget()


@dataclass(frozen=True)
class PumpSpec:
    replicas: int = 1
    shape: PodShape = EMPTY_SHAPE
    budget: DisruptionBudget = DisruptionBudget()


@dataclass(frozen=True)
class Organism:
    """One Organism, validated, with every default resolved."""

    name: str
    namespace: str
    uid: str
    generation: int
    image: str
    #: organism.yaml body without a backend section (the operator writes that one and organism.name).
    config: dict[str, Any]
    backend_type: BackendType
    redis: RedisSpec | None  # None unless backend_type == "redis"
    pump_resources: Resources
    workers: WorkersSpec | None  # None: no worker Deployment
    pump: PumpSpec = PumpSpec()

    @property
    def owner_reference(self) -> dict[str, Any]:
        from . import API_VERSION, KIND
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}



# ------------------------------------------------------------------------------------------ parsing
def parse_organism(body: Mapping[str, Any], settings: OperatorSettings) -> Organism:
    """Validate an Organism object (as the API returns it) and resolve its defaults.

    Raises SpecError naming the first offending field.
    """
    meta = body.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > MAX_NAME_LEN or not _DNS_1035.match(name):
        raise SpecError("metadata.name",
                        f"{name!r} is not a DNS-1035 label of at most {MAX_NAME_LEN} characters "
                        "(it prefixes the names of Services and workloads)",
                        "lowercase letters, digits and '-', starting with a letter, e.g. 'orders'")
    namespace = str(meta.get("namespace") or "default")
    spec = body.get("spec")
    if spec is None:
        spec = {}
    spec = mapping(spec, "spec")
    known(spec, "spec", ("image", "config", "backend", "pump", "workers"))

    image = spec.get("image", settings.default_image)
    if not isinstance(image, str) or not image or len(image) > 512 or any(c.isspace() for c in image) or (
            "image" in spec and not _IMAGE.match(image)):
        raise SpecError("spec.image", f"{image!r} is not an image reference",
                        "[registry[:port]/]path[:tag][@sha256:digest], e.g. ghcr.io/xml-pipeline/xml-pipeline:0.1.0 "
                        "(no whitespace or shell metacharacters, at most 512 characters)")

    config = _parse_config(spec.get("config"), name)

    backend = mapping(spec.get("backend", {}), "spec.backend")
    known(backend, "spec.backend", ("type", "redis"))
    backend_type = backend.get("type", "redis")
    if backend_type not in BACKEND_TYPES:
        raise SpecError("spec.backend.type", f"unknown backend type {backend_type!r}", BACKEND_TYPES)

    redis: RedisSpec | None = None
    raw_redis = backend.get("redis")
    if backend_type == "redis":
        redis = parse_redis(mapping(raw_redis if raw_redis is not None else {}, "spec.backend.redis"),
                             namespace, name, settings)
    elif raw_redis is not None:
        mapping(raw_redis, "spec.backend.redis")  # kept for a later switch back; must still be a mapping

    pump = mapping(spec.get("pump", {}), "spec.pump")
    known(pump, "spec.pump", ("resources", "replicas", "template", "disruptionBudget"))
    pump_resources = parse_resources(pump.get("resources"), "spec.pump.resources", DEFAULT_APP_RESOURCES)
    pump_replicas = integer(pump.get("replicas", 1), "spec.pump.replicas", 1, MAX_PUMP_REPLICAS)
    if pump_replicas > 1 and backend_type != "redis":
        raise SpecError("spec.pump.replicas", f"more than one pump needs the redis backend (spec.backend.type "
                        f"is {backend_type!r}): pumps share their ingress through a Redis consumer group",
                        "1, or set spec.backend.type: redis")
    pump_spec = PumpSpec(replicas=pump_replicas, shape=shaped(parse_shape, pump.get("template"), "spec.pump.template", "pump"),
                         budget=shaped(parse_budget, pump.get("disruptionBudget"), "spec.pump.disruptionBudget"))

    workers: WorkersSpec | None = None
    if "workers" in spec and spec["workers"] is not None:
        if backend_type != "redis":
            raise SpecError("spec.workers",
                            f"worker pods need the redis backend (spec.backend.type is {backend_type!r})",
                            "remove spec.workers, or set spec.backend.type: redis")
        w = mapping(spec["workers"], "spec.workers")
        known(w, "spec.workers", ("replicas", "processes", "resources", "template", "autoscaling",
                                   "disruptionBudget"))
        replicas = integer(w.get("replicas", 1), "spec.workers.replicas", 0, MAX_WORKER_REPLICAS)
        pool = config.get("process_pool") or {}
        processes = integer(w.get("processes", pool.get("workers", 1)),
                         "spec.workers.processes" if "processes" in w else "spec.config.process_pool.workers",
                         1, MAX_PROCESSES)
        workers = WorkersSpec(replicas=replicas, processes=processes,
                              resources=parse_resources(w.get("resources"), "spec.workers.resources",
                                                         DEFAULT_APP_RESOURCES),
                              shape=shaped(parse_shape, w.get("template"), "spec.workers.template", "worker"),
                              autoscaling=shaped(parse_autoscaling, w.get("autoscaling"), "spec.workers.autoscaling"),
                              budget=shaped(parse_budget, w.get("disruptionBudget"), "spec.workers.disruptionBudget"))

    return Organism(
        name=name, namespace=namespace, uid=str(meta.get("uid") or ""),
        generation=int(meta.get("generation") or 0), image=image, config=config,
        backend_type=cast(BackendType, backend_type), redis=redis,
        pump_resources=pump_resources, workers=workers, pump=pump_spec,
    )


def check_prefix_unchanged(org: Organism, recorded: str | None) -> None:
    """Refuse a prefix change: the organism's live keys are under the recorded prefix."""
    if org.redis is None or not recorded or org.redis.prefix == recorded:
        return
    raise SpecError("spec.backend.redis.prefix",
                    f"cannot change from {recorded!r} to {org.redis.prefix!r}: the organism's keys live "
                    "under the recorded prefix (status.redis.prefix)",
                    f"{recorded!r} (revert the change), or create a new Organism for a new prefix",
                    reason="PrefixImmutable")



def _parse_config(raw: Any, name: str) -> dict[str, Any]:
    """spec.config, checked by the library's own organism.yaml validator (the one the pods run), so
    a listener typo is reported on the Organism instead of crash-looping the pods."""
    if raw is None:
        raise SpecError("spec.config", "is required: an organism needs at least one listener",
                        "{listeners: [{name: greeter, handler: 'package.module:function'}]}")
    config = dict(mapping(raw, "spec.config"))
    if "backend" in config:
        raise SpecError("spec.config.backend", "is not allowed: the operator writes organism.yaml's backend "
                        "section from spec.backend", "move these settings to spec.backend")
    known(config, "spec.config", CONFIG_KEYS)
    about = config.get("organism")
    if about is not None:
        known(mapping(about, "spec.config.organism"), "spec.config.organism", ("description",))
    pool = config.get("process_pool")
    if pool is not None and "workers" in mapping(pool, "spec.config.process_pool"):
        integer(pool["workers"], "spec.config.process_pool.workers", 1, MAX_PROCESSES)
    try:
        size = len(json.dumps(config))
    except (TypeError, ValueError):
        raise SpecError("spec.config", "is not plain data (JSON-serialisable)", "mappings, lists, "
                        "strings, numbers, booleans") from None
    if size > MAX_CONFIG_BYTES:
        raise SpecError("spec.config", f"is {size} bytes, the maximum is {MAX_CONFIG_BYTES}",
                        "a smaller organism.yaml")
    doc = {"organism": {"name": name, **(about or {})}, **{k: v for k, v in config.items() if k != "organism"}}
    try:
        parse_library_organism(yaml.safe_dump(doc), environ={}, resolve_handlers=False)
    except ConfigError as e:
        raise SpecError(f"spec.config.{e.field}", e.problem, e.allowed) from None
    return config


