"""Validate objects against the Organism CRD locally, the way the API server would.

Order as in the API server: structural defaulting, OpenAPI schema validation (strict field
validation: unknown fields are errors, as with `kubectl apply`'s default --validate=strict), then the
CEL rules (`x-kubernetes-validations`), including transition rules against the old object.
jsonschema does the schema part; cel-python (`celpy`) evaluates the CEL rules.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

X_KEYS = ("x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
          "x-kubernetes-list-type", "x-kubernetes-list-map-keys")


def load_crd(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def openapi_schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return version["schema"]["openAPIV3Schema"]


def to_jsonschema(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 structural schema -> JSON schema with strict (unknown fields rejected) objects."""
    out = {k: v for k, v in schema.items() if k not in X_KEYS}
    if "properties" in schema:
        out["properties"] = {k: to_jsonschema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = to_jsonschema(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(schema["additionalProperties"])
    if schema.get("x-kubernetes-list-type") == "map":
        out["uniqueKeys"] = schema["x-kubernetes-list-map-keys"]  # checked by _unique_keys below
    return out


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting: a missing property with a `default` gets it; recurse into present ones."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


@dataclass(frozen=True)
class Violation:
    path: str
    message: str


def schema_errors(obj: dict[str, Any], schema: dict[str, Any]) -> list[Violation]:
    js = to_jsonschema(schema)
    validator = jsonschema.Draft202012Validator(js)
    out = [Violation(".".join(str(p) for p in e.absolute_path), e.message) for e in validator.iter_errors(obj)]
    out += _unique_keys(obj, js, "")
    return out


def _unique_keys(value: Any, js: dict[str, Any], path: str) -> list[Violation]:
    out: list[Violation] = []
    if isinstance(value, dict):
        for key, sub in (js.get("properties") or {}).items():
            if key in value:
                out += _unique_keys(value[key], sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        keys = js.get("uniqueKeys")
        if keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                out.append(Violation(path, f"Duplicate value: items must be unique by {keys}"))
        for i, item in enumerate(value):
            out += _unique_keys(item, js.get("items") or {}, f"{path}[{i}]")
    return out


# ------------------------------------------------------------------------------------------------ CEL
def _to_cel_value(value: Any, schema: dict[str, Any]) -> Any:
    """JSON -> CEL value typed by the schema (`number` is always a double in Kubernetes CEL)."""
    if schema.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _to_cel_value(v, props.get(k, {})) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cel_value(v, schema.get("items") or {}) for v in value]
    return value


def _nodes(value: Any, old: Any, schema: dict[str, Any], path: str) -> Iterator[tuple[str, Any, Any, dict[str, Any]]]:
    """(path, value, old value or None, schema) for every node of `value` that has CEL rules below."""
    yield path, value, old, schema
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                old_sub = old.get(key) if isinstance(old, dict) else None
                yield from _nodes(value[key], old_sub, sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            # Items of non-map lists are not correlatable with the old list: no oldSelf for them.
            yield from _nodes(item, None, schema["items"], f"{path}[{i}]")


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _quantity(text: Any) -> Any:
    from kubernetes.utils.quantity import parse_quantity
    return parse_quantity(str(text))


def _is_quantity(text: Any) -> Any:
    try:
        _quantity(text)
    except ValueError:
        return celpy.celtypes.BoolType(False)
    return celpy.celtypes.BoolType(True)


#: The Kubernetes CEL quantity library (in CRD rules since 1.28) that the rules use: quantity(),
#: isQuantity() and the comparisons, on the same parser the operator's model uses.
_FUNCTIONS: dict[str, Any] = {
    "quantity": _quantity,
    "isQuantity": _is_quantity,
    "isGreaterThan": lambda a, b: celpy.celtypes.BoolType(a > b),
    "isLessThan": lambda a, b: celpy.celtypes.BoolType(a < b),
    "compareTo": lambda a, b: celpy.celtypes.IntType((a > b) - (a < b)),
}


def _program(rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)
    return _PROGRAMS[rule]


def cel_errors(obj: dict[str, Any], schema: dict[str, Any], old: dict[str, Any] | None = None) -> list[Violation]:
    """Evaluate every x-kubernetes-validations rule; transition rules (oldSelf) only on updates where
    the node existed before, as the API server does."""
    out: list[Violation] = []
    for path, value, old_value, node_schema in _nodes(obj, old, schema, ""):
        for rule in node_schema.get("x-kubernetes-validations") or []:
            transition = "oldSelf" in rule["rule"]
            if transition and old_value is None:
                continue
            activation = {"self": celpy.json_to_cel(_to_cel_value(value, node_schema))}
            if transition:
                activation["oldSelf"] = celpy.json_to_cel(_to_cel_value(old_value, node_schema))
            result = _program(rule["rule"]).evaluate(activation)
            if isinstance(result, Exception):
                raise result
            if not bool(result):
                out.append(Violation(path, rule.get("message") or rule["rule"]))
    return out


def validate(obj: dict[str, Any], crd: dict[str, Any], old: dict[str, Any] | None = None) -> list[Violation]:
    """All violations of `obj` (after defaulting), schema first; CEL only runs on schema-valid objects,
    like the API server (rules may assume the schema holds)."""
    schema = openapi_schema(crd)
    obj = apply_defaults(copy.deepcopy(obj), schema)
    if old is not None:
        old = apply_defaults(copy.deepcopy(old), schema)
    errors = schema_errors(obj, schema)
    if errors:
        return errors
    return cel_errors(obj, schema, old)


def iter_rules(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule
    for key, sub in (schema.get("properties") or {}).items():
        yield from iter_rules(sub, f"{path}.{key}" if path else key)
    if "items" in schema:
        yield from iter_rules(schema["items"], f"{path}[]")
