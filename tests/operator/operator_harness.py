"""Fixtures for the operator tests: kmock as the Kubernetes API, the real kopf operator in-process.

The operator runs in the test's own event loop (kopf.spawn_tasks + run_tasks), which also serves
kmock; its handlers are synchronous and run in kopf's thread pool, so nothing blocks the loop.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kopf
import kubernetes
import pytest
import yaml

from kmock_cluster import Cluster
from xml_pipeline_operator import handlers
from xml_pipeline_operator.kube import Kube
from xml_pipeline_operator.reconcile import Reconciler
from xml_pipeline_operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts" / "xml-pipeline-operator" / "crds" / "organisms.xml-pipeline.dev.yaml"
EXAMPLES = ROOT / "manifests" / "examples"
ORGANISMS = "xml-pipeline.dev/v1alpha1/organisms"
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}

#: Settings for tests: fast retries, no periodic resync unless a test asks for one.
TEST_SETTINGS = OperatorSettings(default_image="ghcr.io/xml-pipeline/xml-pipeline:test", resync_seconds=0,
                                 retry_base_seconds=0.2, retry_max_seconds=1.0,
                                 shared_redis_url="redis://shared-redis.platform.svc:6379/0")


# --------------------------------------------------------------------------------------- the cluster
def register_resources(cluster: kmock.KubernetesEmulator) -> None:
    # Built-in resources must be discoverable: kopf waits for v1/namespaces, v1/events, CRDs.
    cluster.resources.load_bundled()
    # "Install" the CRD: kmock has no CRD controller, so register the resource for discovery.
    cluster.resources[ORGANISMS] = kmock.ResourceInfo(
        kind="Organism", singular="organism", namespaced=True, shortnames={"org"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        subresources={"status"},
    )


@pytest.fixture
async def k8s() -> AsyncIterator[Cluster]:
    # strict=False: tests inject faults on purpose; unexpected errors are asserted where they matter.
    async with Cluster(strict=False) as cluster, kmock.Server(cluster):
        register_resources(cluster)
        yield cluster


@pytest.fixture
def kubeconfig(k8s: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway kubeconfig pointing at kmock, used by kopf's login and by the operator's client."""
    path = tmp_path / "kubeconfig.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(path))
    # kubernetes.config reads $KUBECONFIG once at import: patch the module default instead.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield path
    kubernetes.client.Configuration.set_default(None)  # don't leak the kmock URL into other tests


# -------------------------------------------------------------------------------------- the operator
@dataclasses.dataclass
class RunningOperator:
    reconciler: Reconciler
    stop: Callable[[], Any]

    @property
    def kube(self) -> Kube:
        return self.reconciler.kube


@pytest.fixture
async def start_operator(kubeconfig: Path) -> AsyncIterator[Callable[..., Any]]:
    """start_operator(settings=None, admin=None) -> RunningOperator; stopped at teardown if still running."""
    running: list[Callable[[], Any]] = []

    async def start(settings: OperatorSettings | None = None, admin: Any = None) -> RunningOperator:
        settings = settings or TEST_SETTINGS
        registry = kopf.OperatorRegistry()
        reconciler = handlers.register(registry, settings, admin=admin)
        stop_flag, ready_flag = asyncio.Event(), asyncio.Event()
        # kopf cancels every task of the loop it was not told to ignore when it exits -- including
        # pytest-asyncio's and kmock's server tasks. The set is mutable: extended at stop time.
        ignored = set(asyncio.all_tasks())
        kopf_settings = kopf.OperatorSettings()
        kopf_settings.networking.error_backoffs = (0.05, 0.1, 0.2)  # kopf's own API retries, fast in tests
        tasks = await kopf.spawn_tasks(
            registry=registry, settings=kopf_settings, standalone=True,
            clusterwide=settings.clusterwide, namespaces=list(settings.namespaces),
            stop_flag=stop_flag, ready_flag=ready_flag,
        )
        runner = asyncio.create_task(kopf.run_tasks(tasks, ignored=ignored))
        ignored.add(runner)
        await asyncio.wait_for(ready_flag.wait(), timeout=15)
        stopped = False

        async def stop() -> None:
            nonlocal stopped
            if stopped:
                return
            stopped = True
            ignored.add(asyncio.current_task())  # type: ignore[arg-type]
            ignored.update(t for t in asyncio.all_tasks()  # kmock's keep-alive connection handlers
                           if "RequestHandler" in getattr(t.get_coro(), "__qualname__", ""))
            stop_flag.set()
            await asyncio.wait_for(runner, timeout=20)

        running.append(stop)
        return RunningOperator(reconciler=reconciler, stop=stop)

    yield start
    for stop in reversed(running):
        await stop()


# ------------------------------------------------------------------------------------------- helpers
def get_obj(k8s: Cluster, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
    try:
        obj = k8s.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if obj.deleted else copy.deepcopy(obj.raw)


def live_names(k8s: Cluster, resource: str, namespace: str = "default") -> list[str]:
    """Names of the existing objects of a resource ('apps/v1/deployments') in a namespace."""
    wanted = kmock.resource(resource)
    return sorted(name for (res, ns, name), obj in k8s.objects.items()
                  if res == wanted and ns == namespace and not obj.deleted)


async def eventually(fn: Callable[[], Any], timeout: float = 15.0, interval: float = 0.02) -> Any:
    """Poll until fn() (or the awaitable it returns) is truthy: a hang detector, not a timing assertion."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = fn()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {getattr(fn, '__name__', fn)}")
        await asyncio.sleep(interval)


async def quiet(k8s: Cluster, settle: float = 0.5, timeout: float = 15.0) -> None:
    """Wait until no API request arrived for `settle` seconds (the operator is idle)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    count, since = len(k8s.history), loop.time()
    while loop.time() - since < settle:
        await asyncio.sleep(0.05)
        now = len(k8s.history)
        if now != count:
            count, since = now, loop.time()
        if loop.time() > deadline:
            raise AssertionError("the operator never went idle")


def writes(k8s: Cluster, start: int = 0) -> list[str]:
    """'METHOD path' of every write request since request number `start`."""
    return [f"{r.method.value} {r.url.path}" for r in k8s.history[start:] if r.method.value in WRITE_METHODS]


def organism(name: str, spec: dict[str, Any] | None = None, namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec or {}}


def org_path(name: str = "", namespace: str = "default") -> str:
    base = f"/apis/xml-pipeline.dev/v1alpha1/namespaces/{namespace}/organisms"
    return f"{base}/{name}" if name else base


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return c
    return None
