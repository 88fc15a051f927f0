"""The building blocks of spec validation: SpecError, field helpers, resources and quantities.

Every check of an Organism spec raises a `SpecError` naming the field path and the allowed values; the
handlers turn it into Ready=False with a reason derived from the field (`InvalidBackendRedisTtl`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, cast

from xml_pipeline.errors import ConfigError

from .podshape import ShapeError

_QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?\Z", re.ASCII)
SIZE = re.compile(r"^(\d+(\.\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?\Z", re.ASCII)
#: Upper bounds of quantities (the CRD's CEL rules say the same).
MAX_QUANTITY: dict[str, Decimal] = {"cpu": Decimal(1024), "memory": Decimal(4 * 1024 ** 4)}
MAX_STORAGE = Decimal(64 * 1024 ** 4)


class SpecError(ConfigError):
    """A spec value the operator cannot honour. `reason` is a CamelCase condition reason."""

    def __init__(self, field: str, problem: str, allowed: str | tuple[str, ...] | list[str] | None = None,
                 *, reason: str | None = None) -> None:
        super().__init__(field, problem, allowed)
        self.reason = reason or reason_for(field)


def reason_for(field_path: str) -> str:
    """'spec.backend.redis.ttl' -> 'InvalidBackendRedisTtl' (condition reasons are CamelCase)."""
    path = re.sub(r"\[\d+\]", "", field_path)
    parts = [p for p in re.split(r"[._\-\[\]]", path) if p]
    if parts and parts[0] == "spec":
        parts = parts[1:]
    return "Invalid" + "".join(p[:1].upper() + p[1:] for p in parts) if parts else "InvalidSpec"


@dataclass(frozen=True)
class Resources:
    """Container resources, as the Kubernetes API spells them (quantities as strings)."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)

    def to_k8s(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if self.requests:
            out["requests"] = dict(self.requests)
        if self.limits:
            out["limits"] = dict(self.limits)
        return out


DEFAULT_APP_RESOURCES = Resources(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"})
DEFAULT_REDIS_RESOURCES = Resources(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"})


def parse_resources(raw: Any, path: str, default: Resources) -> Resources:
    """Explicit resources replace the defaults as a whole (mixing them could put requests above limits)."""
    if raw is None:
        return default
    res = mapping(raw, path)
    known(res, path, ("requests", "limits"))
    parsed: dict[str, dict[str, str]] = {}
    for section in ("requests", "limits"):
        values = mapping(res.get(section) or {}, f"{path}.{section}")
        known(values, f"{path}.{section}", ("cpu", "memory"))
        out: dict[str, str] = {}
        for key, value in values.items():
            text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
            if not isinstance(text, str) or not _QUANTITY.match(text) or quantity(text) < 0:
                raise SpecError(f"{path}.{section}.{key}", f"{value!r} is not a quantity",
                                "e.g. 250m or 1 (cpu), 256Mi or 1Gi (memory)")
            if quantity(text) > MAX_QUANTITY[key]:
                raise SpecError(f"{path}.{section}.{key}", f"{value!r} is above the maximum",
                                "at most 1024 (cpu) or 4Ti (memory)")
            out[key] = text
        parsed[section] = out
    for key, request in parsed["requests"].items():
        limit = parsed["limits"].get(key)
        if limit is not None and quantity(request) > quantity(limit):
            raise SpecError(f"{path}.requests.{key}", f"{request} is above the limit {limit}",
                            f"at most limits.{key} ({limit})")
    return Resources(requests=parsed["requests"], limits=parsed["limits"])


def quantity(text: str) -> Decimal:
    from kubernetes.utils.quantity import parse_quantity
    return cast(Decimal, parse_quantity(text))


def shaped(parse: Any, raw: Any, path: str, *args: Any) -> Any:
    """Call a parser of podshape.py / scaling.py, turning its ShapeError into a SpecError."""
    try:
        return parse(raw, path, *args)
    except ShapeError as e:
        raise SpecError(e.field, e.problem, e.allowed) from None


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be a mapping, got {type(value).__name__}", "a mapping of fields")
    return value


def known(value: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    for key in value:
        if key not in allowed:
            raise SpecError(f"{path}.{key}", "is not a known field", allowed)


def integer(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {value!r}", f"{low}..{high}")
    if not low <= value <= high:
        raise SpecError(path, f"{value} is out of range", f"{low}..{high}")
    return value

