"""manifests/ is the chart rendered with its defaults, cannot drift from it, and applies with
`kubectl apply -k manifests/` or `kubectl apply -f manifests/crds/ -f manifests/`."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chartkit import CRD, NAMESPACE, ROOT, load_docs

MANIFESTS = ROOT / "manifests"
TOOL = ROOT / "tools" / "render-manifests.py"


def _render(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), "--helm", helm, *args],
                          capture_output=True, text=True, timeout=60)


def test_manifests_are_up_to_date(helm: str) -> None:
    result = _render(helm, "--check")
    assert result.returncode == 0, result.stderr


def test_check_notices_drift(helm: str, tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    assert _render(helm, "--out", str(out)).returncode == 0
    assert _render(helm, "--check", "--out", str(out)).returncode == 0
    target = out / "xml-pipeline-operator.yaml"
    target.write_text(target.read_text().replace("replicas: 1", "replicas: 2"))
    result = _render(helm, "--check", "--out", str(out))
    assert result.returncode == 1 and "xml-pipeline-operator.yaml" in result.stderr


def test_crd_copy_is_identical() -> None:
    assert (MANIFESTS / "crds" / CRD.name).read_bytes() == CRD.read_bytes()


def test_same_objects_as_the_chart_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = load_docs((MANIFESTS / "xml-pipeline-operator.yaml").read_text())
    namespace, rest = objects[0], objects[1:]
    assert rest == rendered["defaults"]
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == NAMESPACE
    # The namespace is created first, and enforces the Pod Security level every pod in it meets.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [o for o in rest if o["kind"] in ("Deployment", "ServiceAccount")]
    assert namespaced and all(o["metadata"]["namespace"] == NAMESPACE for o in namespaced)


def test_kustomize_builds_crd_and_operator(kubectl: str, tmp_path: Path) -> None:
    """`kubectl kustomize` (what `kubectl apply -k` builds) works offline on a copy without the
    hand-written examples, and yields exactly the CRD plus the operator's objects."""
    copy = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("examples"))
    result = subprocess.run([kubectl, "kustomize", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = load_docs(result.stdout)
    expected = [yaml.safe_load(CRD.read_text()), *load_docs((MANIFESTS / "xml-pipeline-operator.yaml").read_text())]

    def key(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(map(key, built)) == sorted(map(key, expected))
    by_key = {key(o): o for o in built}
    for obj in expected:
        assert by_key[key(obj)] == obj, key(obj)


def test_kubectl_apply_f_skips_the_kustomization() -> None:
    """kubectl apply -f DIR reads only *.yaml, *.yml and *.json: the kustomize file must not be one
    of those, or kubectl would send it to the API server as an object."""
    assert (MANIFESTS / "Kustomization").is_file()
    assert not list(MANIFESTS.glob("kustomization.*"))
    top_level = sorted(p.name for p in MANIFESTS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert top_level == ["xml-pipeline-operator.yaml"]
