"""values.yaml, values.schema.json and the chart README agree; bad values are rejected by the schema
(with Helm 4 and Helm 3) with an error naming the key."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartkit import CHART, ROOT, helm_template

SCHEMA: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
VALUES: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())

# Object nodes of the schema that are maps or Kubernetes types on purpose (validated by
# kubernetes-validate on the rendered objects instead), each with its reason.
FREE_FORM = {
    "#/properties/global": "Helm's global values, set by parent charts",
    "#/definitions/stringMap": "labels/annotations/nodeSelector: any key, string values",
    "#/definitions/affinity/properties/nodeAffinity": "a Kubernetes type",
    "#/definitions/affinity/properties/podAffinity": "a Kubernetes type",
    "#/definitions/affinity/properties/podAntiAffinity": "a Kubernetes type",
}

# (values, the key the error must name). Each is wrong in exactly one place.
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCount": 0}, "replicaCount"),  # at least one operator
    ({"replicaCount": "2"}, "replicaCount"),  # wrong type
    ({"peering": {"lifetime": 30}}, "lifetime"),  # typo of lifetimeSeconds
    ({"autoscaler": "vpa"}, "autoscaler"),  # not in the enum
    ({"sharedRedis": {"mod": "deploy"}}, "mod"),  # typo of a nested key
    ({"sharedRedis": {"deploy": {"networkPolicy": {"extraFrom": [{"podSelecter": {}}]}}}}, "podSelecter"),
    ({"sharedRedis": {"mode": "on"}}, "mode"),  # not in the enum
    ({"sharedRedis": {"mode": "existing", "existing": {
        "url": "redis://admin:hunter2@redis:6379", "existingSecret": "s"}}}, "url"),  # credentials in URL
    ({"sharedRedis": {"mode": "existing", "existing": {"existingSecret": "s"}}}, "url"),  # missing URL
    ({"sharedRedis": {"mode": "existing", "existing": {"url": "redis://r:6379"}}}, "existingSecret"),
    ({"organismDefaults": {"ttl": 10}}, "ttl"),  # below the CRD's minimum TTL
    ({"organismDefaults": {"ttl": "1d"}}, "ttl"),  # wrong type
    ({"healthPort": 80}, "healthPort"),  # privileged port: the operator has no capabilities
    ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),  # not a namespace name
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"resources": {"limits": {"gpu": 1}}}, "gpu"),  # only cpu and memory
    ({"tolerations": [{"key": "k", "operator": "Maybe"}]}, "operator"),
    ({"logLevel": "verbose"}, "logLevel"),
    ({"metrics": {"serviceMonitor": {"interval": "30 seconds"}}}, "interval"),
    ({"sharedRedis": {"deploy": {"persistence": {"size": "lots"}}}}, "size"),
    ({"rbac": {"create": "yes"}}, "create"),
]


@pytest.mark.parametrize("which", ["helm", "helm3"])
def test_bad_values_are_rejected_naming_the_key(helm_bins: dict[str, str], which: str, tmp_path: Path) -> None:
    failures = []
    for values, key in BAD_VALUES:
        result = helm_template(helm_bins[which], values, tmp_path)
        if result.returncode == 0:
            failures.append(f"{values}: accepted")
        elif key not in result.stderr:
            failures.append(f"{values}: error does not name {key!r}: {result.stderr.strip()}")
    assert not failures, "\n".join(failures)


def test_schema_rejects_through_helm_not_only_in_templates(helm: str, tmp_path: Path) -> None:
    """The errors above come from the schema (Helm's own message), not from a template `required`."""
    result = helm_template(helm, {"sharedRedis": {"mode": "on"}}, tmp_path)
    assert "values don't meet the specifications of the schema" in result.stderr


def _object_nodes(node: Any, pointer: str = "#") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append((pointer, node))
        for key, child in node.items():
            found.extend(_object_nodes(child, f"{pointer}/{key}"))
    elif isinstance(node, list):
        for i, child in enumerate(node):
            found.extend(_object_nodes(child, f"{pointer}/{i}"))
    return found


def test_every_object_level_is_closed() -> None:
    """additionalProperties: false at every object level, except the listed maps/Kubernetes types."""
    nodes = _object_nodes(SCHEMA)
    assert len(nodes) > 20
    open_nodes = [p for p, n in nodes if n.get("additionalProperties") is not False and p not in FREE_FORM]
    assert not open_nodes, f"schema objects without additionalProperties: false: {open_nodes}"
    assert SCHEMA["definitions"]["stringMap"]["additionalProperties"] == {"type": "string"}


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_schema_and_values_have_the_same_keys() -> None:
    """At every level where values.yaml spells out keys, the schema has exactly those keys: nothing
    undocumented in the schema, nothing in values.yaml the schema forgot."""
    mismatches = []

    def walk(values: dict[str, Any], schema: dict[str, Any], path: str) -> None:
        schema = _resolve(schema)
        keys = set(schema.get("properties", {})) - ({"global"} if not path else set())
        if keys != set(values):
            mismatches.append(f"{path or '<root>'}: schema-only {sorted(keys - set(values))}, "
                              f"values-only {sorted(set(values) - keys)}")
        for key, value in values.items():
            if isinstance(value, dict) and value and key in schema.get("properties", {}):
                walk(value, schema["properties"][key], f"{path}.{key}".lstrip("."))

    walk(VALUES, SCHEMA, "")
    assert not mismatches, "\n".join(mismatches)


def _chart_readme_module() -> Any:
    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "tools" / "chart-readme.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_readme"] = module
    spec.loader.exec_module(module)
    return module


def test_readme_is_up_to_date_and_every_value_documented() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "chart-readme.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    readme = (CHART / "README.md").read_text()
    tool = _chart_readme_module()
    values = tool.collect(VALUES, tool.parse_docs((CHART / "values.yaml").read_text()))
    assert len(values) > 50
    for v in values:
        assert f"| `{v.path}` |" in readme
        assert len(v.doc) > 5, f"{v.path}: doc too short"


def test_readme_tool_refuses_an_undocumented_key() -> None:
    tool = _chart_readme_module()
    text = "# -- Documented.\na: 1\n# a plain comment is not a doc\nb:\n  # -- Nested doc.\n  c: 2\n"
    docs = tool.parse_docs(text)
    assert docs == {"a": "Documented.", "b.c": "Nested doc."}
    with pytest.raises(tool.UndocumentedError, match="'b'"):
        tool.collect(yaml.safe_load(text), docs)
