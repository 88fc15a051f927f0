"""End to end on a real cluster (kind): the image, the chart, the operator, an Organism, a message
through the pump and a worker pod, its slots in Redis under the organism's prefix, and the cleanup.

Run with `make e2e` where Docker exists; skipped with the reason everywhere else.
"""
from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kindkit import NAMESPACE, RELEASE, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

SHARED_REDIS = f"{RELEASE}-operator-shared-redis"

# Reads the organism's Redis with the pod's own injected credentials (XP_* environment) and prints
# the prefix, then every buffer key under it with its number of slots.
LIST_SLOTS = """
import json, os, redis
r = redis.Redis.from_url(os.environ["XP_REDIS_URL"], username=os.environ.get("XP_REDIS_USERNAME") or None,
                         password=os.environ.get("XP_REDIS_PASSWORD") or None)
p = os.environ["XP_REDIS_PREFIX"]
print(json.dumps({"prefix": p, "buffers": {k.decode(): r.llen(k) for k in r.scan_iter(match=p + "buffer:*")}}))
"""


def organism(name: str, mode: str) -> dict[str, Any]:
    return {
        "apiVersion": "xml-pipeline.dev/v1alpha1",
        "kind": "Organism",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "config": {"listeners": [
                {"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"},
                {"name": "primes", "handler": "xml_pipeline.examples.cpu:count_primes", "cpu_bound": True},
            ]},
            "backend": {"type": "redis", "redis": {"mode": mode, "ttl": 3600}},
            "workers": {"replicas": 1, "processes": 1},
        },
    }


def run_organism(c: Cluster, name: str, mode: str) -> dict[str, Any]:
    """Apply, wait for Ready, send a message that needs the worker pod, check the slots in Redis."""
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(organism(name, mode)))
    c.kubectl("wait", f"organism/{name}", "-n", "default", "--for=condition=Ready", "--timeout=300s",
              timeout=320)
    status = c.json("get", "organism", name, "-n", "default")["status"]
    assert status["redis"]["prefix"] == f"xp:default.{name}:"
    assert status["redis"]["ttl"] == 3600
    assert status["phase"] == "Ready"

    # greeter (in the pump) calls primes (cpu_bound: a WorkerTask for the worker pod) and replies.
    reply = c.kubectl("exec", "-n", "default", f"deploy/{name}-pump", "--",
                      "xml-pipeline", "send", "--to", "greeter", '<greet name="Ada" lucky="1000"/>',
                      "--wait", "--timeout", "120", timeout=180).stdout
    assert "Hello, Ada!" in reply and "168" in reply, reply  # 168 primes below 1000

    slots = json.loads(c.kubectl("exec", "-n", "default", f"deploy/{name}-pump", "--",
                                 "python", "-c", LIST_SLOTS).stdout)
    assert slots["prefix"] == f"xp:default.{name}:"
    assert slots["buffers"], "no thread buffer under the organism's prefix"
    assert all(key.startswith(f"xp:default.{name}:buffer:") for key in slots["buffers"])
    assert max(slots["buffers"].values()) >= 2  # the message and its response at least
    return status


def owned_objects(c: Cluster, name: str) -> list[str]:
    return c.kubectl("get", "deploy,sts,svc,cm,secret", "-n", "default", "-l",
                     f"xml-pipeline.dev/organism={name}", "-o", "name").stdout.split()


def shared_redis_cli(c: Cluster, *args: str) -> str:
    # REDISCLI_AUTH is in the shared Redis container's environment (from the chart's Secret).
    return c.kubectl("exec", "-n", NAMESPACE, f"statefulset/{SHARED_REDIS}", "--",
                     "redis-cli", *args).stdout


def test_dedicated_organism_end_to_end(cluster: Cluster) -> None:
    name = "e2e-dedicated"
    try:
        status = run_organism(cluster, name, "dedicated")
        assert status["redis"]["mode"] == "dedicated"
        assert f"deployment.apps/{name}-redis" in owned_objects(cluster, name)
        cluster.kubectl("delete", "organism", name, "-n", "default", "--timeout=180s", timeout=200)
        cluster.wait_until(f"the objects of {name} to be garbage-collected",
                           lambda: not owned_objects(cluster, name))
    except BaseException:
        print(cluster.diagnostics())
        raise


def test_shared_organism_end_to_end(cluster: Cluster) -> None:
    """On the chart's shared Redis: its own ACL user and keys, both gone after delete."""
    name = "e2e-shared"
    try:
        users_before = set(shared_redis_cli(cluster, "ACL", "USERS").split())
        run_organism(cluster, name, "shared")
        assert set(shared_redis_cli(cluster, "ACL", "USERS").split()) - users_before, \
            "no ACL user was created for the organism"
        assert shared_redis_cli(cluster, "--scan", "--pattern", f"xp:default.{name}:*").strip()
        cluster.kubectl("delete", "organism", name, "-n", "default", "--timeout=180s", timeout=200)
        cluster.wait_until(f"the objects of {name} to be garbage-collected",
                           lambda: not owned_objects(cluster, name))
        assert not shared_redis_cli(cluster, "--scan", "--pattern", f"xp:default.{name}:*").strip()
        assert set(shared_redis_cli(cluster, "ACL", "USERS").split()) == users_before
    except BaseException:
        print(cluster.diagnostics())
        raise
