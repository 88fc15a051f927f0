"""Two real operator processes in an active/standby pair (kopf peering) against kmock: only the
active one writes; SIGKILL it and the standby takes over once the dead one's keep-alive expired."""
from __future__ import annotations

import asyncio

import signal
import sys
import time
from pathlib import Path
from typing import Any

import kmock
import yaml

from operator_harness import DEPLOYMENTS, eventually, get_obj, org_path, organism
from kmock_cluster import Cluster
from test_operator_process import free_port, operator_env

PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
LIFETIME = 4  # seconds: the takeover bound under test (XPO_PEERING_LIFETIME)
SPEC = {"config": {"listeners": [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]}}


def kubeconfig_for(k8s: Cluster, tmp: Path, who: str) -> Path:
    """One kubeconfig per process, each with its own token: kmock sees who sent a request."""
    path = tmp / f"kubeconfig-{who}.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(k8s.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": f"token-{who}"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
    }))
    return path


def writers(k8s: Cluster, start: int = 0) -> dict[str, int]:
    """Writes to the Organism's objects (not the peering object, which both keep alive), by token."""
    out: dict[str, int] = {}
    for r in k8s.history[start:]:
        if r.method.value in ("POST", "PATCH", "PUT", "DELETE") and "kopf.dev" not in r.url.path \
                and not r.url.path.endswith("/events"):
            who = r.headers.get("Authorization", "").removeprefix("Bearer token-")
            if who:  # the test's own requests carry no token
                out[who] = out.get(who, 0) + 1
    return out


async def test_only_the_active_operator_writes_and_the_standby_takes_over(k8s: Cluster, tmp_path: Path) -> None:
    k8s.resources[PEERINGS] = kmock.ResourceInfo(kind="ClusterKopfPeering", singular="clusterkopfpeering",
                                                 namespaced=False, verbs={"get", "list", "watch", "patch", "create"})
    resp = await k8s.post("/apis/kopf.dev/v1/clusterkopfpeerings",
                          json={"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "xpo"}})
    assert resp.status == 201, await resp.text()

    procs: dict[str, asyncio.subprocess.Process] = {}
    logs: dict[str, Path] = {}
    for who in ("a", "b"):
        logs[who] = tmp_path / f"{who}.log"
        env = operator_env(kubeconfig_for(k8s, tmp_path, who), XPO_PEERING="xpo", XPO_PEERING_LIFETIME=str(LIFETIME),
                           XPO_HEALTH_PORT=str(free_port()), XPO_RESYNC_SECONDS="0", POD_ID=f"operator-{who}")
        env.pop("KUBECONFIG_DEFAULT", None)
        with logs[who].open("wb") as log:
            procs[who] = await asyncio.create_subprocess_exec(sys.executable, "-m", "xml_pipeline_operator", env=env,
                                                              stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        def peers() -> dict[str, Any] | None:
            try:
                obj = k8s.objects[PEERINGS, None, "xpo"]
            except KeyError:
                return None
            status = obj.raw.get("status") or {}
            return status if {"operator-a", "operator-b"} <= set(status) else None
        status = await eventually(peers, timeout=60, interval=0.1)
        active = "a" if status["operator-a"]["priority"] > status["operator-b"]["priority"] else "b"
        standby = "b" if active == "a" else "a"

        assert (await k8s.post(org_path(), json=organism("first", SPEC))).status == 201
        await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "first-pump"), timeout=60)
        await asyncio.sleep(1.0)  # a standby that (wrongly) acted would have written by now too
        assert set(writers(k8s)) == {active}, writers(k8s)

        # The active one dies without a goodbye (no SIGTERM: its keep-alive stays until it expires).
        procs[active].send_signal(signal.SIGKILL)
        await procs[active].wait()
        killed_at, start = time.monotonic(), len(k8s.history)
        assert (await k8s.post(org_path(), json=organism("second", SPEC))).status == 201
        await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "second-pump"), timeout=LIFETIME * 3 + 30, interval=0.1)
        took = time.monotonic() - killed_at
        assert set(writers(k8s, start)) == {standby}
        # Reported, not asserted (timing): the bound is the lifetime plus kopf's re-check.
        print(f"standby took over {took:.1f} s after the active operator was killed (lifetime {LIFETIME} s)")
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=30)
                except asyncio.TimeoutError:
                    proc.kill()

