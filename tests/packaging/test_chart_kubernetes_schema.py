"""Every object the chart renders (all scenarios), the CRD, manifests/ and the objects the operator
builds are valid against the Kubernetes 1.30 and 1.35 schemas (`kubernetes-validate --strict`:
unknown fields are errors). Custom resources other than ours (ServiceMonitor) can only warn."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chartkit import CRD, ROOT, operator_workloads

VERSIONS = ("1.30.0", "1.35.0")
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def _validate(files: list[Path]) -> tuple[int, list[str]]:
    """One kubernetes-validate run over all files and both versions (it loads schemas per object, so
    batching saves the interpreter start-ups)."""
    cmd = [str(KUBERNETES_VALIDATE), "--strict", "--quiet"]
    for v in VERSIONS:
        cmd += ["-k", v]
    result = subprocess.run([*cmd, *map(str, files)], capture_output=True, text=True, timeout=120)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def _dump(path: Path, objects: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def test_rendered_objects_are_valid(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    # Scenarios share most objects: validate each distinct object once.
    distinct = {json.dumps(o, sort_keys=True): o for objects in rendered.values() for o in objects}
    assert len(distinct) > 20
    files = [_dump(tmp_path / "rendered.yaml", list(distinct.values())),
             CRD, ROOT / "manifests" / "xml-pipeline-operator.yaml"]
    rc, lines = _validate(files)
    errors = [ln for ln in lines if not ln.startswith("WARN")]
    assert rc == 0 and not errors, "\n".join(lines)
    # Only the Prometheus Operator's kinds and kopf's peering objects lack a schema; everything else was really validated.
    unknown = {m.group(1) for ln in lines if (m := re.search(r"schema for kind (\w+)", ln))}
    assert unknown <= {"ServiceMonitor", "PodMonitor", "ClusterKopfPeering", "KopfPeering", "Certificate", "Issuer"}, lines


def test_an_invalid_object_is_caught(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The validator is strict for real: a misspelt field in the operator Deployment fails."""
    deploy = next(o for o in rendered["defaults"] if o["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deploy))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    rc, lines = _validate([_dump(tmp_path / "broken.yaml", [broken])])
    assert rc != 0
    assert any("livenesProbe" in ln for ln in lines), lines


def test_operator_built_objects_are_valid(tmp_path: Path) -> None:
    objects = operator_workloads()
    rc, lines = _validate([_dump(tmp_path / "operator.yaml", objects)])
    assert rc == 0 and not lines, "\n".join(lines)
