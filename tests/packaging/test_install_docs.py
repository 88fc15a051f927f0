"""docs/install.md and the chart README only mention values, objects and files that exist, and the
example Organisms are valid against the CRD's schema."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chartkit import CHART, ROOT, one

DOCS = [ROOT / "docs" / "install.md", CHART / "README.md"]
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def _has_path(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_set_flag_names_a_real_value(doc: Path) -> None:
    keys = re.findall(r"--set '?([A-Za-z][\w.]*)=", doc.read_text())
    assert keys, "the doc shows --set examples"
    assert not [k for k in keys if not _has_path(VALUES, k)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_mentioned_exist(doc: Path) -> None:
    text = doc.read_text()
    paths = set(re.findall(r"\b((?:charts|manifests|docs|tools|tests|operator)/[\w./-]*[\w/])", text))
    missing = [p for p in paths if not (ROOT / p).exists() and not p.startswith(("docs/multi", "docs/operator"))]
    assert not missing, missing


def test_object_names_in_install_doc_match_the_chart(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = (ROOT / "docs" / "install.md").read_text()
    deploy = one(rendered["defaults"], "Deployment")["metadata"]["name"]
    sts = one(rendered["shared-deploy"], "StatefulSet")
    secret = one(rendered["shared-deploy"], "Secret")["metadata"]["name"]
    pvc = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{sts['metadata']['name']}-0"
    for name in (f"deployment/{deploy}", f"deploy/{deploy}", secret, pvc):
        assert name in text, name


def test_example_organisms_match_the_crd_schema(crd: dict[str, Any]) -> None:
    """Structural schema only (jsonschema); the CEL rules are the operator tests' business."""
    assert EXAMPLES, "manifests/examples/ has example Organisms"
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    modes = set()
    for path in EXAMPLES:
        for obj in yaml.safe_load_all(path.read_text()):
            if not obj or obj.get("kind") != "Organism":
                continue
            jsonschema.validate(obj, schema)
            modes.add(obj["spec"].get("backend", {}).get("redis", {}).get("mode", "dedicated"))
    assert {"dedicated", "shared", "external"} <= modes
