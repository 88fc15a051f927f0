"""KEDA on an organism whose Redis is a cluster, where the tasks stream is split into buckets
(message_bus/streams.py, "Task buckets"): a trigger pair per bucket and a scaling modifier that adds
them up. Checked against KEDA's CRD schema, against the names the library uses, and on a real local
cluster: the figures the triggers read there, put through the formula as KEDA evaluates it, give the
replicas the two triggers give on one stream."""
from __future__ import annotations

import ast
import asyncio
import math
import operator
import secrets
from typing import Any

import pytest
from test_operator_scaling import AUTOSCALED, errors, make

from xml_pipeline import contract
from xml_pipeline.memory import BackendConfig, create_backend
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.streams import WORKER_GROUP, Streams
from xml_pipeline.message_bus.worker_task import WorkerTask
from xml_pipeline_operator.desired import scaling

N = contract.CLUSTER_TASKS_BUCKETS


def cluster_spec(addresses: list[str], prefix: str = "xp:shop.orders:") -> dict[str, Any]:
    return {**AUTOSCALED, "backend": {"redis": {"mode": "external", "prefix": prefix, "external": {
        "mode": "cluster", "addresses": addresses, "passwordSecretRef": {"name": "ext-pw", "key": "pw"}}}}}


_OPS = {ast.Add: operator.add, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(formula: str, values: dict[str, float]) -> float:
    """The formula as KEDA's expression language evaluates it: trigger names are the triggers'
    metric values; +, *, / and max(a, b) (all the formula uses; anything else fails the test)."""
    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return float(_OPS[type(node.op)](ev(node.left), ev(node.right)))
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return float(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "max":
            return max(ev(a) for a in node.args)
        raise AssertionError(f"the formula uses {ast.dump(node)[:80]}")
    return ev(ast.parse(formula, mode="eval"))


def test_a_cluster_organism_gets_a_trigger_pair_per_bucket_and_a_formula_that_adds_them() -> None:
    org = make(cluster_spec(["r0:6379", "r1:6379"]))
    url = org.redis.external.url
    assert url == "redis+cluster://r0:6379,r1:6379"
    so = scaling.scaled_object(org, url)
    assert errors(so, "scaledobjects") == []
    triggers = so["spec"]["triggers"]
    assert len(triggers) == 2 * N
    assert {t["type"] for t in triggers} == {"redis-cluster-streams"}
    streams = [t["metadata"]["stream"] for t in triggers[::2]]
    assert tuple(streams) == scaling.tasks_streams(org, url)
    assert [t["metadata"]["stream"] for t in triggers[1::2]] == streams
    assert len(set(streams)) == N and all(s.startswith("xp:shop.orders:tasks:{") for s in streams)
    assert [t["name"] for t in triggers[:4]] == ["backlog0", "running0", "backlog1", "running1"]
    assert all(t["metadata"]["addresses"] == "r0:6379,r1:6379" for t in triggers)
    assert triggers[1]["metadata"]["consumerGroup"] == WORKER_GROUP
    mod = so["spec"]["advanced"]["scalingModifiers"]
    assert mod["target"] == "10" and mod["metricType"] == "AverageValue" and mod["activationTarget"] == "0"
    # Every trigger name is in the formula; one bucket's backlog of 25 alone asks for ceil(25/10) pods.
    assert all(t["name"] in mod["formula"].replace("(", " ").replace(")", " ").replace(",", " ").split()
               for t in triggers)
    values = {t["name"]: 0.0 for t in triggers} | {"backlog7": 25.0}
    assert math.ceil(evaluate(mod["formula"], values) / int(mod["target"])) == 3
    # 4 running tasks with 3 processes a pod keep 2 pods: ceil(4 * 10 / 3 / 10).
    values = {t["name"]: 0.0 for t in triggers} | {"running0": 1.0, "running9": 3.0}
    assert math.ceil(evaluate(mod["formula"], values) / int(mod["target"])) == 2
    assert evaluate(mod["formula"], {t["name"]: 0.0 for t in triggers}) == 0  # inactive: scale to min


def test_one_server_and_sentinel_keep_the_two_triggers_on_the_tasks_stream() -> None:
    so = scaling.scaled_object(make(AUTOSCALED), "redis://r:6379/0")
    assert [t["name"] for t in so["spec"]["triggers"]] == ["tasks-backlog", "tasks-running"]
    assert {t["metadata"]["stream"] for t in so["spec"]["triggers"]} == {"xp:shop.orders:tasks"}
    assert "advanced" not in so["spec"]
    sentinel = scaling.scaled_object(make(AUTOSCALED), "redis+sentinel://s:26379/m")
    assert len(sentinel["spec"]["triggers"]) == 2 and "advanced" not in sentinel["spec"]


@pytest.mark.cluster
async def test_the_formula_over_a_real_clusters_buckets_gives_the_one_stream_replicas(shared_cluster: Any) -> None:
    prefix = f"xp:shop.k{secrets.token_hex(3)}:"
    org = make(cluster_spec(shared_cluster.seeds, prefix))
    so = scaling.scaled_object(org, org.redis.external.url)
    backend: Any = create_backend(BackendConfig(backend_type="redis", redis_url=shared_cluster.url,
                                                redis_prefix=prefix, redis_ttl=300,
                                                signing_key="scaling-shard-signing-key-0123456789"))
    assert tuple(t["metadata"]["stream"] for t in so["spec"]["triggers"][::2]) == Streams(backend).task_streams
    dispatcher = RedisDispatcher(backend)
    await dispatcher.start()
    queued, running = 37, 4
    runs = [asyncio.ensure_future(dispatcher.run(WorkerTask(f"t{i}", "w", "h:w", "p", "m", reply_to="")))
            for i in range(queued)]
    client = shared_cluster.client()
    try:
        for _ in range(200):
            if sum(client.xlen(k) for k in Streams(backend).task_streams) == queued:
                break
            await asyncio.sleep(0.02)
        taken = 0
        for stream in Streams(backend).task_streams:  # four workers' tasks in hand, in four buckets
            if taken < running and client.xreadgroup(WORKER_GROUP, f"w{taken}", {stream: ">"}, count=1):
                taken += 1
        assert taken == running
        # What each trigger reads, as KEDA's redis-cluster-streams scaler does (XLEN, or XPENDING).
        values = {}
        for t in so["spec"]["triggers"]:
            m = t["metadata"]
            values[t["name"]] = (client.xpending(m["stream"], m["consumerGroup"])["pending"]
                                 if "consumerGroup" in m else client.xlen(m["stream"]))
        mod = so["spec"]["advanced"]["scalingModifiers"]
        replicas = math.ceil(evaluate(mod["formula"], values) / int(mod["target"]))
        tpr, processes = org.workers.autoscaling.tasks_per_replica, org.workers.processes
        assert sum(v for k, v in values.items() if k.startswith("backlog")) == queued
        assert replicas == max(math.ceil(queued / tpr), math.ceil(running / processes)) == 4
    finally:
        await dispatcher.close()
        await asyncio.gather(*runs)
        client.delete(*Streams(backend).task_streams)
        client.close()
        backend.close()
