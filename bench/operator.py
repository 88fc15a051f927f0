"""Operator benchmark: N Organisms on kmock, the real `xml-pipeline-operator` process.

    .venv/bin/python bench/operator.py [--organisms 200] [--mode dedicated|autoscaled|external|memory] [--resync 4]

`autoscaled`: dedicated Redis, shaped worker pods and spec.workers.autoscaling, with KEDA's API served
(a ScaledObject + TriggerAuthentication per Organism; the operator never writes the worker replicas).

kmock (the Kubernetes API emulator of the tests) runs in this process; the operator runs as its own
process, exactly as `python -m xml_pipeline_operator` would in a pod, so its peak RSS is its own.

Measured:
  * time from the first Organism POST until every Organism has all its objects (Secret, ConfigMap,
    Deployments, Service) -- and until every status is written;
  * API requests the operator made per Organism while creating them (reads / writes, kopf's own
    watch and patch traffic included, Kubernetes Events included);
  * an idle resync, twice: a restarted operator resuming every Organism, and one periodic resync
    round (XPO_RESYNC_SECONDS): requests per Organism, and writes (must be 0);
  * the operator process's peak RSS (VmHWM, what getrusage's ru_maxrss reports for it).

kmock is single-threaded Python in the same event loop as this script, so on a real API server the
time figure would be lower; the request counts do not depend on that.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))
from kmock_cluster import Cluster  # noqa: E402  (the tests' API-server emulator)

ORGANISMS = "xml-pipeline.dev/v1alpha1/organisms"
LISTENERS = [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"},
             {"name": "primes", "handler": "xml_pipeline.examples.cpu:count_primes", "cpu_bound": True}]
SPECS: dict[str, dict[str, Any]] = {
    "dedicated": {"config": {"listeners": LISTENERS}, "workers": {"replicas": 2}},
    "external": {"config": {"listeners": LISTENERS}, "workers": {"replicas": 2}, "backend": {"redis": {
        "mode": "external", "external": {"url": "rediss://redis.example:6380/0",
                                         "passwordSecretRef": {"name": "ext-auth"}}}}},
    "memory": {"config": {"listeners": LISTENERS[:1]}, "backend": {"type": "memory"}},
    "autoscaled": {"config": {"listeners": LISTENERS}, "workers": {
        "autoscaling": {"minReplicas": 0, "maxReplicas": 10},
        "template": {"metadata": {"labels": {"team": "bench"}},
                     "spec": {"env": [{"name": "MODE", "value": "bench"}], "nodeSelector": {"pool": "cpu"}}}}},
}
EXPECTED = {  # objects per Organism: (resource, name suffix)
    "dedicated": [("v1/secrets", "credentials"), ("v1/configmaps", "config"), ("v1/services", "redis"),
                  ("apps/v1/deployments", "redis"), ("apps/v1/deployments", "pump"), ("apps/v1/deployments", "worker")],
    "external": [("v1/secrets", "credentials"), ("v1/configmaps", "config"), ("apps/v1/deployments", "pump"),
                 ("apps/v1/deployments", "worker")],
    "memory": [("v1/secrets", "credentials"), ("v1/configmaps", "config"), ("apps/v1/deployments", "pump")],
    "autoscaled": [("v1/secrets", "credentials"), ("v1/configmaps", "config"), ("v1/services", "redis"),
                   ("apps/v1/deployments", "redis"), ("apps/v1/deployments", "pump"), ("apps/v1/deployments", "worker"),
                   ("policy/v1/poddisruptionbudgets", "worker"), ("keda.sh/v1alpha1/scaledobjects", "worker"),
                   ("keda.sh/v1alpha1/triggerauthentications", "worker")],
}
WRITES = {"POST", "PATCH", "PUT", "DELETE"}


def register(cluster: kmock.KubernetesEmulator) -> None:
    cluster.resources.load_bundled()
    cluster.resources[ORGANISMS] = kmock.ResourceInfo(
        kind="Organism", singular="organism", namespaced=True, shortnames={"org"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"}, subresources={"status"})
    for plural, kind in (("scaledobjects", "ScaledObject"), ("triggerauthentications", "TriggerAuthentication")):
        cluster.resources[f"keda.sh/v1alpha1/{plural}"] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True,
            verbs={"create", "delete", "get", "list", "patch", "update", "watch"})


def exists(cluster: Cluster, res: str, name: str) -> bool:
    try:
        return not cluster.objects[res, "default", name].deleted
    except KeyError:
        return False


def operator_requests(cluster: Cluster, start: int) -> list[kmock.Request]:
    # The bench's own requests carry kmock's client User-Agent; everything else is the operator's.
    return [r for r in cluster.history[start:] if not r.headers.get("User-Agent", "").startswith("kmock")]


def organism_gets(cluster: Cluster, start: int) -> list[kmock.Request]:
    return [r for r in cluster.history[start:] if r.method.value == "GET" and "/organisms/" in r.url.path]


def tally(requests: list[kmock.Request]) -> tuple[int, int, Counter[str]]:
    reads = sum(1 for r in requests if r.method.value not in WRITES)
    writes = [r for r in requests if r.method.value in WRITES]
    kinds: Counter[str] = Counter()
    for r in writes:
        parts = r.url.path.rstrip("/").split("/")
        plural = parts[-1] if parts[-1] in ("status",) or r.method.value == "POST" else parts[-2]
        kinds[f"{r.method.value} {'organisms/status' if plural == 'status' else plural}"] += 1
    return reads, len(writes), kinds


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout}s waiting for {getattr(predicate, '__name__', predicate)}")
        await asyncio.sleep(interval)
    return time.monotonic() - t0


async def wait_quiet(cluster: Cluster, settle: float = 1.0, timeout: float = 300) -> None:
    count, since, t0 = len(cluster.history), time.monotonic(), time.monotonic()
    while time.monotonic() - since < settle:
        await asyncio.sleep(0.1)
        if len(cluster.history) != count:
            count, since = len(cluster.history), time.monotonic()
        if time.monotonic() - t0 > timeout:
            raise SystemExit("the operator never went idle")


class OperatorProcess:
    def __init__(self, kubeconfig: Path, resync: float) -> None:
        self.kubeconfig, self.resync = kubeconfig, resync
        self.proc: asyncio.subprocess.Process | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("XPO_", "KUBERNETES_SERVICE"))}
        env.update(KUBECONFIG=str(self.kubeconfig), XPO_HEALTH_PORT=str(self.port), XPO_LOG_LEVEL="WARNING",
                   XPO_RESYNC_SECONDS=str(int(self.resync)))
        self.proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "xml_pipeline_operator", env=env,
                                                         stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise SystemExit("the operator did not become healthy")

    async def stop(self) -> int:
        assert self.proc is not None
        hwm = vm_hwm_kib(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout=60)
        if self.proc.returncode != 0:
            raise SystemExit(f"operator exited {self.proc.returncode}: {err.decode()[-2000:]}")
        return hwm


async def bench(n: int, mode: str, resync: float) -> None:
    spec = SPECS[mode]
    async with Cluster(strict=False) as cluster, kmock.Server(cluster):
        register(cluster)
        if mode == "external":
            cluster.objects["v1/secrets", "default", "ext-auth"] = {
                "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ext-auth", "namespace": "default"},
                "data": {"password": "cHc="}}
        tmp = Path(tempfile.mkdtemp(prefix="xpo-bench-"))
        kubeconfig = tmp / "kubeconfig.yaml"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.url).rstrip("/")}}],
            "users": [{"name": "kmock", "user": {"token": "bench"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }))

        # --- create -----------------------------------------------------------------------------
        op = OperatorProcess(kubeconfig, resync=0)
        await op.start()
        start = len(cluster.history)
        t0 = time.monotonic()
        base = "/apis/xml-pipeline.dev/v1alpha1/namespaces/default/organisms"
        names = [f"org-{i:04d}" for i in range(n)]
        for name in names:
            body = {"apiVersion": "xml-pipeline.dev/v1alpha1", "kind": "Organism",
                    "metadata": {"name": name}, "spec": spec}
            resp = await cluster.post(base, json=body)
            assert resp.status == 201, await resp.text()
        posted = time.monotonic() - t0

        def all_objects() -> bool:
            return all(exists(cluster, res, f"{name}-{suffix}") for name in names for res, suffix in EXPECTED[mode])

        def all_status() -> bool:
            return all((cluster.objects[ORGANISMS, "default", name].raw.get("status") or {}).get("redis")
                       or mode == "memory" and (cluster.objects[ORGANISMS, "default", name].raw.get("status") or {})
                       for name in names)

        await wait_until(all_objects, timeout=600)
        t_objects = time.monotonic() - t0
        await wait_until(all_status, timeout=600)
        t_status = time.monotonic() - t0
        await wait_quiet(cluster)
        create_reads, create_writes, create_kinds = tally(operator_requests(cluster, start))
        hwm_create = await op.stop()

        # --- idle resync 1: a restarted operator resumes every Organism --------------------------
        start = len(cluster.history)
        op = OperatorProcess(kubeconfig, resync=0)
        await op.start()
        await wait_until(lambda: len(organism_gets(cluster, start)) >= n, timeout=600)
        await wait_quiet(cluster)
        resume_reads, resume_writes, _ = tally(operator_requests(cluster, start))
        await op.stop()

        # --- idle resync 2: periodic timers (staggered per Organism, so measure one full round:
        # the requests between the n-th and the 2n-th read of an Organism after the resume) -------
        start = len(cluster.history)
        op = OperatorProcess(kubeconfig, resync=resync)
        await op.start()
        await wait_until(lambda: len(organism_gets(cluster, start)) >= 3 * n, timeout=600)
        hwm_idle = await op.stop()
        gets = organism_gets(cluster, start)
        lo, hi = cluster.history.index(gets[n]), cluster.history.index(gets[2 * n])
        round_requests = [r for r in cluster.history[lo:hi] if not r.headers.get("User-Agent", "").startswith("kmock")]
        timer_reads, timer_writes, _ = tally(round_requests)
        _, all_idle_writes, _ = tally(operator_requests(cluster, start))
        timer_writes += all_idle_writes

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"Operator benchmark: {n} Organisms, mode {mode}, kmock 0.8 in the bench process, operator as a process")
    print(f"  all objects present            {t_objects:7.2f} s   ({n / t_objects:6.1f} Organisms/s; POSTs took {posted:.2f} s)")
    print(f"  all statuses written           {t_status:7.2f} s")
    print(f"  create: requests per Organism  {(create_reads + create_writes) / n:7.1f}   "
          f"(reads {create_reads / n:.1f}, writes {create_writes / n:.1f})")
    print("          writes by kind        " + ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(create_kinds.items())))
    print(f"  resume after restart / Org.    {(resume_reads + resume_writes) / n:7.1f}   (writes {resume_writes})")
    print(f"  periodic resync round / Org.   {(timer_reads + timer_writes) / n:7.1f}   (writes in 3 rounds: {timer_writes})")
    print(f"  operator peak RSS              {hwm_create / 1024:7.1f} MiB while creating, "
          f"{hwm_idle / 1024:.1f} MiB in a restarted operator after 2 resync rounds")
    print(f"  (bench process incl. kmock:    {own / 1024:7.1f} MiB)")
    if resume_writes or timer_writes:
        raise SystemExit("idle resync made writes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organisms", type=int, default=200)
    parser.add_argument("--mode", choices=sorted(SPECS), default="dedicated")
    parser.add_argument("--resync", type=float, default=4.0, help="XPO_RESYNC_SECONDS of the idle run")
    args = parser.parse_args()
    asyncio.run(bench(args.organisms, args.mode, args.resync))


if __name__ == "__main__":
    main()
