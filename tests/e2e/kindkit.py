"""Helpers of the end-to-end test: where things are, whether Docker is usable, and `Cluster`, thin
helpers over kubectl and helm for a kind cluster."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKDIR = ROOT / ".e2e"
CLUSTER_NAME = "xml-pipeline-e2e"
IMAGE_REPOSITORY = "ghcr.io/xml-pipeline/xml-pipeline"
IMAGE_TAG = "0.0.0-e2e"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
REDIS_IMAGE = "redis:7.2.5-alpine"
RELEASE, NAMESPACE = "xml-pipeline", "xml-pipeline-system"
# pytest-kind's default kind (v0.17) starts Kubernetes 1.25; the CRD's CEL rules want a newer one.
KIND_VERSION = os.environ.get("XP_E2E_KIND_VERSION", "v0.29.0")
#: The Kubernetes node image kind v0.29.0 starts (named explicitly, so it can be checked for first).
KIND_NODE_IMAGE = os.environ.get("XP_E2E_NODE_IMAGE", "kindest/node:v1.33.1")
KIND_URL = f"https://github.com/kubernetes-sigs/kind/releases/download/{KIND_VERSION}/kind-linux-amd64"


def docker_unavailable() -> str | None:
    """Why Docker cannot be used here, or None when the engine answers."""
    docker = shutil.which("docker")
    if docker is None:
        return "no `docker` command on PATH"
    try:
        result = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"Docker engine not reachable (`docker info`: {reason})"
    return None


def base_image() -> str:
    """The Dockerfile's base image (its PYTHON_IMAGE build argument's default)."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert match is not None, "Dockerfile: ARG PYTHON_IMAGE=<image> not found"
    return match.group(1)


def kind_unavailable(kind_path: Path) -> str | None:
    """Why a kind cluster cannot run here, or None. Needs a Docker engine, the kind binary (or its
    download), and the images: the Kubernetes node image, the Dockerfile's base, Redis — each on
    this machine already or pullable from a registry."""
    reason = docker_unavailable()
    if reason:
        return reason
    if not kind_path.exists():
        import requests
        try:
            requests.head(KIND_URL, timeout=15, allow_redirects=True).raise_for_status()
        except requests.RequestException as e:
            return f"kind cannot run here: the kind binary is not in {kind_path.parent} and cannot be downloaded ({e})"
    for image in (KIND_NODE_IMAGE, base_image(), REDIS_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=60).returncode == 0:
            continue
        try:
            pulled = subprocess.run(["docker", "pull", image], capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return f"kind cannot run here: `docker pull {image}` did not finish within 300 s (no registry reachable?)"
        if pulled.returncode != 0:
            why = (pulled.stderr.strip().splitlines() or ["unknown error"])[-1]
            what = "Kubernetes node image" if image == KIND_NODE_IMAGE else "image"
            return (f"kind cannot run here: the {what} {image} is not on this machine and no image registry "
                    f"is reachable to pull it (`docker pull`: {why})")
    return None


def tool(name: str) -> str:
    """helm/kubectl from PATH (`make e2e` puts .tools/bin first) or .tools/bin."""
    found = shutil.which(name) or str(ROOT / ".tools" / "bin" / name)
    if not os.access(found, os.X_OK):
        pytest.fail(f"{name} not found: run `make tools` (tools/get-helm.sh .tools/bin)")
    return found


@dataclass
class Cluster:
    """A kind cluster with the chart installed; thin helpers over kubectl and helm."""

    kind: Any  # pytest_kind.KindCluster
    kubectl_bin: str
    helm_bin: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kind.kubeconfig_path)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.kubectl_bin, *args], input=input, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def helm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.helm_bin, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def wait_until(self, what: str, probe: Any, timeout: float = 180, every: float = 2) -> Any:
        """Poll probe() until it returns something truthy (that value is returned)."""
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def diagnostics(self) -> str:
        """What to look at when something failed (printed by the test on failure)."""
        parts = []
        for args in (("get", "organisms,deploy,sts,svc,pods", "-A", "-o", "wide"),
                     ("describe", "organisms", "-A"),
                     ("logs", "-n", NAMESPACE, f"deploy/{RELEASE}-operator", "--tail", "200"),
                     ("get", "events", "-A", "--sort-by", ".lastTimestamp")):
            r = self.kubectl(*args, check=False)
            parts.append(f"$ kubectl {' '.join(args)}\n{r.stdout}{r.stderr}")
        return "\n".join(parts)
