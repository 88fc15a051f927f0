"""Fixtures of the end-to-end test: the project's image built with Docker, a kind cluster (through
pytest-kind) with the image loaded, and the chart installed with the real Helm.

Everything here needs a reachable Docker engine, the kind binary and the images (the Kubernetes node
image, the Dockerfile's base, Redis) on the machine or pullable; without them the tests skip saying which.
Files (kind binary, kubeconfig) go to .e2e/ at the repository root (git-ignored).
Set XP_E2E_KEEP=1 to keep the cluster after the run (`kind delete cluster --name xml-pipeline-e2e`).
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import chdir
from pathlib import Path

import pytest

from kindkit import (CLUSTER_NAME, IMAGE, IMAGE_TAG, KIND_NODE_IMAGE, KIND_VERSION, NAMESPACE, REDIS_IMAGE, RELEASE, ROOT,
                     WORKDIR, Cluster, kind_unavailable, tool)


@pytest.fixture(scope="session")
def docker_image() -> str:
    reason = kind_unavailable(WORKDIR / f"kind-{KIND_VERSION}")
    if reason:
        pytest.skip(reason)
    subprocess.run(["docker", "build", "-t", IMAGE, str(ROOT)], check=True, timeout=1200)
    return IMAGE


@pytest.fixture(scope="session")
def cluster(docker_image: str) -> Iterator[Cluster]:
    import pytest_kind.cluster as kind_module

    kind_module.KIND_VERSION = KIND_VERSION  # read when the KindCluster is created
    WORKDIR.mkdir(exist_ok=True)
    kubectl_bin, helm_bin = tool("kubectl"), tool("helm")
    with chdir(WORKDIR):  # pytest-kind creates ./.pytest-kind/<name>/: keep it out of the tree
        kind = kind_module.KindCluster(
            CLUSTER_NAME,
            kubeconfig=WORKDIR / "kubeconfig",
            image=KIND_NODE_IMAGE,
            kind_path=WORKDIR / f"kind-{KIND_VERSION}",
            kubectl_path=Path(kubectl_bin),
        )
        kind.create()
    try:
        kind.load_docker_image(docker_image)
        kind.load_docker_image(REDIS_IMAGE)
        c = Cluster(kind, kubectl_bin, helm_bin)
        c.helm("install", RELEASE, str(ROOT / "charts" / "xml-pipeline-operator"),
               "--namespace", NAMESPACE, "--create-namespace",
               "--set", f"image.tag={IMAGE_TAG}",
               "--set", "sharedRedis.mode=deploy",
               "--set", "logLevel=DEBUG",
               "--wait", "--timeout", "300s")
        yield c
    finally:
        if os.environ.get("XP_E2E_KEEP") != "1":
            kind.delete()
