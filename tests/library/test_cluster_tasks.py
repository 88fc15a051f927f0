"""The tasks stream split into buckets on a Redis Cluster (message_bus/streams.py, "Task buckets"):
where the buckets land, how the dispatcher deals tasks out, what a dead consumer's release and the
inspection helpers do across buckets. Real local cluster (3 masters + 3 replicas)."""
from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot as redis_key_slot
from redis_cluster import LocalCluster

from xml_pipeline import contract
from xml_pipeline.memory import BackendConfig, create_backend
from xml_pipeline.memory.keys import CLUSTER_SLOTS, ClusterKeys, RedisKeys, key_slot
from xml_pipeline.message_bus.dispatcher import RedisDispatcher
from xml_pipeline.message_bus.streams import (WORKER_GROUP, Streams, dead_letters, stream_info,
                                              task_bucket_count)
from xml_pipeline.message_bus.worker import CHAINED_PER_BUCKET, DistributedWorker, release_consumer
from xml_pipeline.message_bus.worker_task import WORKER_DIED, WorkerTask
from xml_pipeline.organism import parse_organism

pytestmark = pytest.mark.cluster

N = contract.CLUSTER_TASKS_BUCKETS
SIGNING_KEY = "cluster-tasks-signing-key-0123456789"


@pytest.fixture
def backend(shared_cluster: LocalCluster) -> Iterator[Any]:
    b = create_backend(BackendConfig(backend_type="redis", redis_url=shared_cluster.url,
                                     redis_prefix=f"ct{secrets.token_hex(4)}:", redis_ttl=600,
                                     signing_key=SIGNING_KEY))
    yield b
    s = Streams(b)
    b.client.delete(*s.task_streams, *s.dlqs, s.wake)
    b.close()


def _task(i: int, reply_to: str) -> WorkerTask:
    return WorkerTask(f"task-{i}", "work", "h:work", f"p{i}", f"m{i}", reply_to=reply_to)


def test_bucket_keys_are_a_pure_function_of_the_prefix_spread_over_the_slot_space() -> None:
    keys = ClusterKeys("xp:team.orders:")
    buckets = keys.task_buckets()
    assert len(buckets) == N == 16
    assert buckets == ClusterKeys("xp:team.orders:").task_buckets()  # every process computes the same
    for n, (tasks, dlq) in enumerate(buckets):
        assert tasks.startswith("xp:team.orders:tasks:{") and dlq.startswith("xp:team.orders:dlq:{")
        slot = key_slot(tasks)
        assert slot == redis_key_slot(tasks.encode()) == key_slot(dlq)  # a bucket and its dlq share a slot
        assert n * CLUSTER_SLOTS // N <= slot < (n + 1) * CLUSTER_SLOTS // N
    assert keys.task_buckets(1) == ((keys.key("tasks"), keys.key("dlq")),)  # one bucket: the organism's slot
    assert {key_slot(t) for t, _ in keys.task_buckets(3)} != {key_slot(keys.key("tasks"))}
    for bad in (0, -1, CLUSTER_SLOTS + 1, 2.0, True):
        with pytest.raises(ValueError, match="task bucket count"):
            keys.task_buckets(bad)  # type: ignore[arg-type]


def test_off_a_cluster_the_tasks_stream_stays_one_key(redis_server: Any) -> None:
    b = create_backend(BackendConfig(backend_type="redis", redis_url=redis_server.url, redis_prefix="one:",
                                     signing_key=SIGNING_KEY))
    s = Streams(b)
    assert task_bucket_count(b) == 1 and not s.sharded
    assert s.task_streams == ("one:tasks",) and s.dlqs == ("one:dlq",) and s.tasks == "one:tasks"
    assert RedisKeys("one:").key("tasks") == s.tasks
    with pytest.raises(ValueError, match="need a Redis Cluster"):
        Streams(b, buckets=4)
    b.close()


def test_the_buckets_land_on_every_master(backend: Any, shared_cluster: LocalCluster) -> None:
    s = Streams(backend)
    assert s.sharded and len(s.task_streams) == N
    owners = [shared_cluster.owner_of(shared_cluster.key_slot(k)).port for k in s.task_streams]
    assert len(set(owners)) == shared_cluster.master_count == 3, owners
    assert len({shared_cluster.key_slot(k) for k in s.task_streams}) == N


async def test_the_dispatcher_deals_tasks_of_many_threads_over_every_bucket(backend: Any) -> None:
    dispatcher = RedisDispatcher(backend, deadline=None)
    await dispatcher.start()
    s = dispatcher.streams
    runs = [asyncio.ensure_future(dispatcher.run(_task(i, ""))) for i in range(5 * N)]
    try:
        for _ in range(200):
            if sum(backend.client.xlen(k) for k in s.task_streams) == 5 * N:
                break
            await asyncio.sleep(0.02)
        per_bucket = [backend.client.xlen(k) for k in s.task_streams]
        assert per_bucket == [5] * N  # round robin: one loop iteration's tasks in every bucket
        info = stream_info(backend)
        assert info["tasks"] == {"length": 5 * N, "pending": 0, "buckets": N}
        assert info["dlq"] == {"length": 0, "buckets": N}
        assert "16 Redis streams" in dispatcher.describe()
    finally:
        await dispatcher.close()
    results = await asyncio.gather(*runs)
    assert {r.error_type for r in results} == {WORKER_DIED}  # no worker: close() answers every task


async def test_a_dead_consumers_tasks_in_several_buckets_are_requeued_in_their_buckets(backend: Any) -> None:
    dispatcher = RedisDispatcher(backend, deadline=None)
    await dispatcher.start()
    s = dispatcher.streams
    runs = [asyncio.ensure_future(dispatcher.run(_task(i, ""))) for i in range(N)]
    try:
        for _ in range(200):
            if sum(backend.client.xlen(k) for k in s.task_streams) == N:
                break
            await asyncio.sleep(0.02)
        held = s.task_streams[:5]
        for stream in held:  # a worker that took one task from each of five buckets, then died
            assert backend.client.xreadgroup(WORKER_GROUP, "ghost", {stream: ">"}, count=1)
        assert stream_info(backend)["tasks"]["pending"] == 5
        requeued, dead = release_consumer(backend, "ghost", max_attempts=3)
        assert (requeued, dead) == (5, 0)
        assert stream_info(backend)["tasks"] == {"length": N, "pending": 0, "buckets": N}
        for stream in s.task_streams:
            (entry,) = backend.client.xrange(stream)
            assert entry[1][b"failures"] == (b"1" if stream in held else b"0")  # back in its own bucket
            consumers = backend.client.xinfo_consumers(stream, WORKER_GROUP)
            assert all(c["name"] != b"ghost" and c["name"] != "ghost" for c in consumers)
    finally:
        await dispatcher.close()
    await asyncio.gather(*runs)


def test_dead_letters_of_every_bucket_newest_first(backend: Any) -> None:
    s = Streams(backend)
    ids = []
    for i, n in enumerate((3, 11, 0, 7)):
        ids.append(backend.client.xadd(s.dlqs[n], {"task_id": f"t{i}", "error": "boom"}).decode())
        time.sleep(0.003)  # entry ids of different masters are ordered by their millisecond only
    rows = dead_letters(backend)
    assert [r["task_id"] for r in rows] == ["t3", "t2", "t1", "t0"]
    assert rows[0]["_stream"] == s.dlqs[7] and rows[0]["_id"] == ids[3]
    assert [r["task_id"] for r in dead_letters(backend, count=2)] == ["t3", "t2"]
    assert stream_info(backend)["dlq"] == {"length": 4, "buckets": N}


def test_a_worker_chains_at_most_a_few_tasks_of_one_bucket_before_the_next_bucket(backend: Any) -> None:
    """A bucket that keeps having tasks does not hold a worker: the next task of the same bucket is
    read along with an acknowledgement CHAINED_PER_BUCKET times in a row at most, then the worker
    reads on from the next bucket, where a lone task waits."""
    org = parse_organism("organism: {name: fair}\nlisteners:\n  - {name: work, handler: "
                         "'xml_pipeline.examples.cpu:burn', cpu_bound: true}\n", environ={})
    s = Streams(backend)
    s.ensure_task_groups()
    for i in range(12):
        backend.client.xadd(s.task_streams[0], {"n": str(i)})
    backend.client.xadd(s.task_streams[3], {"n": "lone"})
    worker = DistributedWorker(backend, org, name="fair-worker")
    worker._cursor, worker._next_claim = 0, time.monotonic() + 600  # noqa: SLF001 - no reclaim due
    order = []
    for _ in range(13):
        queued = worker._queue  # noqa: SLF001 - the task read along with the last acknowledgement
        entry = queued.popleft() if queued else worker._read_one()  # noqa: SLF001
        assert entry is not None
        order.append(entry[0])
        worker._ack(entry[0], entry[1], chain=True)  # noqa: SLF001
    assert order.index(3) == CHAINED_PER_BUCKET + 1, order  # four chained after the first, then on
    assert sorted(order) == [0] * 12 + [3]
    assert sum(backend.client.xlen(k) for k in s.task_streams) == 0  # every one acknowledged and deleted


async def test_the_pump_rings_the_doorbell_and_an_idle_worker_takes_the_task_it_names(backend: Any) -> None:
    """An idle worker waits on the doorbell, not on one bucket: the pump rings a bell per bucket that
    got tasks, each bell wakes one idle worker (a consumer group), which takes its task from that
    bucket without looking at every bucket; no bell within SHARDED_IDLE_BLOCK_MS: look everywhere."""
    org = parse_organism("organism: {name: bell}\nlisteners:\n  - {name: work, handler: "
                         "'xml_pipeline.examples.cpu:burn', cpu_bound: true}\n", environ={})
    worker = DistributedWorker(backend, org, name="idle-worker")
    s = worker.streams
    assert s.wake is not None and s.wake.startswith(backend.keys.prefix + "tasks:{")
    dispatcher = RedisDispatcher(backend, deadline=None)
    await dispatcher.start()
    first = dispatcher._next_bucket  # noqa: SLF001 - where the round robin starts
    runs = [asyncio.ensure_future(dispatcher.run(_task(i, ""))) for i in range(3)]
    try:
        for _ in range(200):
            if backend.client.xlen(s.wake) == 3:
                break
            await asyncio.sleep(0.02)
        named = [int(bell[b"b"]) for _, bell in backend.client.xrange(s.wake)]
        assert named == sorted((first + i) % N for i in range(3))
        for bucket in named:
            worker._look = False  # noqa: SLF001 - idle: straight to the doorbell
            entry = worker._read_one()  # noqa: SLF001
            assert entry is not None and entry[0] == bucket  # the bell's bucket, nothing else looked at
            worker._ack(entry[0], entry[1])  # noqa: SLF001
            assert worker._look  # noqa: SLF001 - served: look at every bucket next
        worker._look = False  # noqa: SLF001
        assert worker._read_one() is None and worker._look  # noqa: SLF001 - no bell: look everywhere next
        assert sum(backend.client.xlen(k) for k in s.task_streams) == 0
        worker._leave()  # noqa: SLF001
        assert backend.client.xinfo_consumers(s.wake, WORKER_GROUP) == []
    finally:
        await dispatcher.close()
    await asyncio.gather(*runs)
