"""The pump's fast path on a Redis Cluster (memory/redis_cluster_pipe.py): one RedisPipe per master,
on real local clusters (tests/redis_cluster.py).

- appends (with their temp items), takes, deletes and stream batches go through the per-node pipes
  and land on every master; the index and the data read back through the blocking backend;
- a slot moved under a steady append load (ASK while it moves, MOVED after): no error reaches the
  caller, every thread's slots are gap-free and each append is stored once; the pipe followed it;
- ASK, step by step: a slot half migrated, the appends, takes and stream batches of that slot
  still answer, and the stream batch went to the importing node through the pipe (ASKING);
- a master killed under load: the store carries on after the failover, on the promoted replica's pipe
  (of the stream batches, only the one on the wire when the master died may fail);
- pump + worker processes on a cluster run with the pipe on (its command counters grow); a worker's
  task loop sends on one connection of its own per master;
- rediss+cluster:// keeps the fast path, with the TLS settings of redis-py's cluster connections.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from redis_cluster import ClusterNode, LocalCluster
from redis_server import TLSFiles

from xml_pipeline.errors import BackendUnavailable
from xml_pipeline.memory import BackendConfig, ContextBuffer
from xml_pipeline.memory.async_store import RedisStore, open_store
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.memory.redis_cluster import RedisClusterBackend
from xml_pipeline.memory.redis_cluster_pipe import ClusterPipe

pytestmark = pytest.mark.cluster

SIGNING_KEY = "cluster-pipe-tests-signing-key-0123456789"
REPO = Path(__file__).resolve().parents[2]


def backend_on(url: str, **config: Any) -> RedisClusterBackend:
    cfg: dict[str, Any] = dict(backend_type="redis", redis_url=url, redis_prefix=f"cp{secrets.token_hex(4)}:",
                               redis_ttl=600, signing_key=SIGNING_KEY, socket_timeout=1.0, connect_timeout=0.5)
    cfg.update(config)
    backend = RedisBackend(BackendConfig(**cfg))
    assert isinstance(backend, RedisClusterBackend)
    return backend


def pipe_of(store: Any) -> ClusterPipe:
    assert isinstance(store, RedisStore) and isinstance(store.pipe, ClusterPipe)
    return store.pipe


def pipe_rig(url: str, **config: Any) -> tuple[RedisClusterBackend, RedisStore, ContextBuffer, ClusterPipe]:
    """A cluster backend, its store (with the cluster pipe) and a ContextBuffer on it; close_rig ends it."""
    backend = backend_on(url, **config)
    store = open_store(backend)
    return backend, store, ContextBuffer(backend), pipe_of(store)


def close_rig(backend: RedisClusterBackend, store: Any) -> None:
    store.close()
    backend.buffer_clear()
    backend.close()


def ids_in_slot(slot: int, n: int) -> list[str]:
    """`n` ids whose hash tag falls in `slot` (thread ids and temp ids are their keys' hash tags)."""
    out: list[str] = []
    while len(out) < n:
        candidate = secrets.token_hex(5)
        if key_slot(candidate.encode()) == slot:
            out.append(candidate)
    return out


def other_master(cluster: LocalCluster, slot: int) -> ClusterNode:
    owner = cluster.owner_of(slot)
    return next(m for m in cluster.masters() if m is not owner)


async def test_the_pipe_sends_to_every_master(shared_cluster: LocalCluster) -> None:
    backend, store, buffer, pipe = pipe_rig(shared_cluster.url)
    threads = [secrets.token_hex(6) for _ in range(30)]
    try:
        items = {t: [(secrets.token_hex(6), backend.signer.sign(t.encode()))] for t in threads}
        for r in range(3):
            slots = await asyncio.gather(*(store.append(buffer, buffer.prepare(t, f"m{r}", "console", "echo",
                                                                              append_id=f"{t}-{r}"),
                                                        items[t] if r == 0 else ()) for t in threads))
            assert [s.metadata.slot_index for s in slots] == [r] * len(threads)
        # Every master got commands through its own pipe, several per write (group commit).
        masters = {m.address for m in shared_cluster.masters()}
        sent = pipe.node_commands()
        assert masters <= set(sent) and all(sent[m] > 0 for m in masters), sent
        assert pipe.writes < pipe.commands
        assert store.fallbacks == 0
        # What the pipe wrote, the blocking backend reads: slots, the index, the temp items.
        assert {t: buffer.thread_len(t) for t in threads} == {t: 3 for t in threads}
        assert set(threads) <= set(backend.buffer_list_threads())
        assert [s.payload for s in buffer.get_thread_slots(threads[0])] == ["m0", "m1", "m2"]
        first, second = items[threads[0]][0], items[threads[1]][0]
        assert await store.take(first[0], second[0]) == first[1]
        assert backend.temp_get_many([first[0], second[0]]) == [None, None]
        keys = [items[t][0][0] for t in threads[2:12]]
        assert await store.delete(*keys, "never-written") == 10
        assert backend.temp_get_many(keys) == [None] * 10
        # A stream batch (MULTI of XADDs, as the dispatcher submits) on its slot's master.
        stream = backend.key("tasks")
        replies = await store.execute([("MULTI",), ("XADD", stream, "*", "f", "1"), ("XADD", stream, "*", "f", "2"),
                                       ("EXEC",)], what="submit")
        assert replies[:3] == [b"OK", b"QUEUED", b"QUEUED"] and len(replies[3]) == 2
        read = await store.read([("XREAD", "COUNT", 10, "STREAMS", stream, "0-0")], what="read")
        assert [fields for _, fields in read[0][0][1]] == [[b"f", b"1"], [b"f", b"2"]]
        assert store.fallbacks == 0
    finally:
        backend.client.delete(backend.key("tasks"))
        close_rig(backend, store)


async def test_a_slot_moved_under_append_load(shared_cluster: LocalCluster) -> None:
    backend, store, buffer, pipe = pipe_rig(shared_cluster.url)
    slot = secrets.randbelow(16384)
    moving = ids_in_slot(slot, 3)
    threads = moving + [secrets.token_hex(6) for _ in range(3)]
    target = other_master(shared_cluster, slot)
    moved = asyncio.Event()
    written: dict[str, list[str]] = {t: [] for t in threads}

    async def appender(thread: str, who: int) -> None:
        n, after = 0, 0
        while after < 10:  # keep going until 10 appends each after the slot has moved
            payload = f"{who}-{n}"
            temp = ids_in_slot(slot, 1)[0] if n % 5 == 0 else secrets.token_hex(5)
            await store.append(buffer, buffer.prepare(thread, payload, "console", "echo",
                                                      append_id=f"{thread}-{payload}"),
                               [(temp, payload.encode())])
            written[thread].append(payload)
            assert await store.take(temp) == payload.encode()
            n += 1
            after += moved.is_set()

    async def move() -> None:
        await asyncio.sleep(0.2)  # the load is on
        await asyncio.to_thread(shared_cluster.migrate_slot, slot, target)
        moved.set()

    try:
        await asyncio.gather(move(), *(appender(t, w) for t in threads for w in range(2)))
        assert shared_cluster.owner_of(slot) is target
        for t in threads:
            got = buffer.get_thread_slots(t)
            assert [s.metadata.slot_index for s in got] == list(range(len(got)))  # gap-free
            payloads = [s.payload for s in got]
            assert sorted(payloads) == sorted(written[t])  # each append stored once, none lost
            for w in range(2):  # and each writer's appends in the order it made them
                mine = [p for p in payloads if p.startswith(f"{w}-")]
                assert mine == [p for p in written[t] if p.startswith(f"{w}-")]
        # The pipe met the move (a MOVED at least) and kept carrying the load to the new owner.
        assert pipe.redirects >= 1
        assert pipe.node_commands().get(target.address, 0) > 0
    finally:
        close_rig(backend, store)


async def test_ask_while_a_slot_is_half_moved(shared_cluster: LocalCluster) -> None:
    backend, store, buffer, pipe = pipe_rig(shared_cluster.url)
    slot = secrets.randbelow(16384)
    thread, temp, other = ids_in_slot(slot, 3)
    stream = f"{backend.prefix}s:{{{thread}}}"
    source, target = shared_cluster.owner_of(slot), other_master(shared_cluster, slot)
    try:
        await store.append(buffer, buffer.prepare(thread, "before", "console", "echo", append_id="b0"))
        await store.append(buffer, buffer.prepare(thread, "before2", "console", "echo", append_id="b1"),
                           [(temp, b"v")])
        await store.execute([("XADD", stream, "*", "n", "0")], what="xadd")
        # Open the slot's move and move every key it has now: the source answers ASK for them.
        src, tgt = source.client(), target.client()
        tgt.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert len(keys) >= 3
        src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        redirects = pipe.redirects
        replies = await store.execute([("MULTI",), ("XADD", stream, "*", "n", "1"), ("EXEC",)], what="submit")
        assert replies[0] == b"OK" and isinstance(replies[2], list) and len(replies[2]) == 1
        assert pipe.redirects > redirects  # the ASK was met, and the batch sent to the target with ASKING
        asking = target.client(single_connection_client=True)
        asking.execute_command("ASKING")
        assert asking.xlen(stream) == 2
        asking.close()
        # A take and a delete of the slot: the pipe hands them to the backend, which follows the ASK.
        assert await store.take(temp) == b"v"
        assert await store.delete(other) == 0
        # An append: its script names a key the slot does not hold (the thread's registry entry),
        # so both nodes answer TRYAGAIN until the move ends; the backend waits that out.
        during = asyncio.ensure_future(store.append(buffer, buffer.prepare(thread, "during", "console", "echo",
                                                                           append_id="d")))
        await asyncio.sleep(0.3)
        assert not during.done()
        for m in shared_cluster.masters():
            m.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        assert (await during).metadata.slot_index == 2
        # Moved for good: one MOVED, then the pipe goes to the new owner directly.
        slot3 = await store.append(buffer, buffer.prepare(thread, "after", "console", "echo", append_id="a"))
        assert slot3.metadata.slot_index == 3
        sent = pipe.node_commands().get(target.address, 0)
        await store.execute([("XADD", stream, "*", "n", "2")], what="xadd")
        assert pipe.node_commands()[target.address] > sent and tgt.xlen(stream) == 3
        assert [s.payload for s in buffer.get_thread_slots(thread)] == ["before", "before2", "during", "after"]
    finally:
        backend.client.delete(stream)
        close_rig(backend, store)


def _wait_replicated(master: ClusterNode) -> None:
    """Every write the master took so far is on its replica (WAIT), so killing it loses none."""
    assert int(master.client().execute_command("WAIT", 1, 5000)) >= 1


async def test_a_killed_master_and_the_store_carries_on(redis_cluster: LocalCluster) -> None:
    backend = backend_on(redis_cluster.url)
    store = open_store(backend)
    buffer = ContextBuffer(backend)
    pipe = pipe_of(store)
    slot = secrets.randbelow(16384)
    victim = redis_cluster.owner_of(slot)
    threads = ids_in_slot(slot, 2) + [secrets.token_hex(6) for _ in range(4)]
    failed_over = asyncio.Event()
    after: dict[str, list[str]] = {t: [] for t in threads}
    promoted: list[ClusterNode] = []

    async def appender(thread: str) -> None:
        n = 0
        while len(after[thread]) < 10:
            payload = f"p{n}"
            temp = secrets.token_hex(5)
            done = failed_over.is_set()
            await store.append(buffer, buffer.prepare(thread, payload, "console", "echo",
                                                      append_id=f"{thread}-{payload}"), [(temp, b"x")])
            assert await store.take(temp) in (b"x", None)  # None: a take in flight when the master died
            if done:
                after[thread].append(payload)
            n += 1

    stream = f"{backend.prefix}s:{{{threads[0]}}}"  # on the victim too
    submitted: list[int] = []
    lost: list[Exception] = []

    async def submitter() -> None:
        """One MULTI of an XADD at a time, as the dispatcher submits: only the batch on the wire
        when the master dies may fail; one whose master cannot be reached waits for the new one."""
        n, after = 0, 0
        while after < 10:
            done = failed_over.is_set()
            try:
                replies = await store.execute([("MULTI",), ("XADD", stream, "*", "n", n), ("EXEC",)], what="submit")
                assert isinstance(replies[2], list), replies
                submitted.append(n)
                after += done
            except BackendUnavailable as e:
                assert not done, e
                lost.append(e)
            n += 1

    async def kill() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(_wait_replicated, victim)
        promoted.append(await asyncio.to_thread(redis_cluster.kill_master_and_wait_failover, victim))
        failed_over.set()

    try:
        await asyncio.gather(kill(), submitter(), *(appender(t) for t in threads))
        assert len(lost) <= 1, lost
        on_stream = {int(fields[b"n"]) for _, fields in backend.client.xrange(stream)}
        assert set(submitted[-10:]) <= on_stream
        for t in threads:
            payloads = [s.payload for s in buffer.get_thread_slots(t)]
            assert len(payloads) == len(set(payloads))  # nothing stored twice
            assert set(after[t]) <= set(payloads)  # everything after the failover stored
        # The pipes asked for a fresh slot map and carry the slot's load on the promoted replica.
        assert pipe.refreshes >= 1
        assert pipe.node_commands().get(promoted[0].address, 0) > 0
    finally:
        store.close()
        backend.close()


async def test_pump_and_worker_processes_on_a_cluster_use_the_pipe(shared_cluster: LocalCluster,
                                                                   tmp_path: Path) -> None:
    from xml_pipeline.memory import create_backend
    from xml_pipeline.message_bus.dispatcher import RedisDispatcher
    from xml_pipeline.message_bus.message import Message
    from xml_pipeline.message_bus.stream_pump import StreamPump
    from xml_pipeline.organism import load_organism

    prefix = f"cpw{secrets.token_hex(4)}:"
    path = tmp_path / "organism.yaml"
    path.write_text(f"""organism: {{name: clusterpipe}}
backend: {{type: redis, redis_url: "{shared_cluster.url}", redis_prefix: "{prefix}", redis_ttl: 300}}
process_pool: {{workers: 1, claim_idle_seconds: 1.0, heartbeat_seconds: 0.2, drain_seconds: 5}}
listeners:
  - {{name: primes, handler: "xml_pipeline.examples.cpu:count_primes", cpu_bound: true}}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XP_")}
    env.update(PYTHONPATH=str(REPO / "library"), XP_SIGNING_KEY=SIGNING_KEY, PYTHONUNBUFFERED="1")
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "xml_pipeline.cli", "worker", "--config", str(path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    org = load_organism(path, environ={"XP_SIGNING_KEY": SIGNING_KEY})
    backend = create_backend(org.backend)
    dispatcher = RedisDispatcher(backend)
    try:
        async with StreamPump(org, backend, dispatcher=dispatcher) as pump:
            pipe = pump.pipe
            assert isinstance(pipe, ClusterPipe) and dispatcher.store is pump.store  # one store, one set of pipes
            outs = await asyncio.gather(*(pump.request(Message("console", "primes", f'<count below="{n}"/>'),
                                                       timeout=60) for n in (10, 100, 1000, 10, 100)))
            assert [o.payload for (o,) in outs] == [
                '<primes below="10" count="4"/>', '<primes below="100" count="25"/>',
                '<primes below="1000" count="168"/>', '<primes below="10" count="4"/>',
                '<primes below="100" count="25"/>']
            # Appends, the worker inputs, the task submits, the result reads and the takes went
            # through the per-node pipes: none through the io threads.
            assert pipe.commands >= 5 * 4 and pump.stats.redis_fallbacks == 0
            read_pipe = getattr(pump.store, "_read_pipe")
            assert isinstance(read_pipe, ClusterPipe) and read_pipe.commands > 0
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        log.close()
        backend.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-2000:]


def test_a_workers_own_connections_one_per_master(shared_cluster: LocalCluster) -> None:
    """use_direct_connection on a cluster (what a worker's task loop calls): its batches and slot
    reads go through a DirectConnection per master; other threads keep the pools; a moved slot is
    followed (the MOVED is a retried connection error, with the slot map refreshed)."""
    backend = backend_on(shared_cluster.url, socket_timeout=5.0)
    try:
        backend.use_direct_connection()
        nodes = getattr(backend, "_nodes")
        assert nodes is not None
        # Twelve threads, four on each master (random ids could all miss one).
        per_master: dict[int, list[str]] = {}
        while sum(len(v) for v in per_master.values()) < 12:
            t = secrets.token_hex(6)
            owned = per_master.setdefault(shared_cluster.owner_of(key_slot(backend.keys.buffer(t).encode())).port, [])
            if len(owned) < 4:
                owned.append(t)
        blobs = {t: secrets.token_bytes(40_000 if i % 2 else 100)
                 for i, t in enumerate(t for ids in per_master.values() for t in ids)}
        for t, blob in blobs.items():
            backend.buffer_append(t, blob)
        assert {t: backend.buffer_get_slot(t, 0) for t in blobs} == blobs
        stream = backend.key("tasks")
        replies = backend.send_commands([("MULTI",), ("XADD", stream, "*", "f", "1"), ("EXEC",)])
        assert replies[:2] == [b"OK", b"QUEUED"] and len(replies[2]) == 1
        # One round trip per read and batch (more only if a busy machine made one time out and retry).
        mine = nodes.round_trips
        assert mine >= len(blobs) + 1 and len(getattr(nodes, "_conns")) == 3
        # Another thread: the pool, not this thread's connections.
        first = next(iter(blobs))
        other: list[Any] = []
        worker = threading.Thread(target=lambda: other.append(backend.buffer_get_slot(first, 0)))
        worker.start()
        worker.join()
        assert other == [blobs[first]] and nodes.round_trips == mine
        # The thread's slot moves: the next read meets MOVED, and the retry reads from the new owner.
        slot = key_slot(first.encode())
        target = other_master(shared_cluster, slot)
        shared_cluster.migrate_slot(slot, target)
        assert backend.buffer_get_slot(first, 0) == blobs[first]
        assert f"{target.host}:{target.port}" in getattr(nodes, "_conns")
    finally:
        backend.buffer_clear()
        backend.client.delete(backend.key("tasks"))
        backend.close()


def test_rediss_cluster_keeps_the_fast_path(tls_files: TLSFiles) -> None:
    """rediss+cluster://: the per-node pipes verify every node as redis-py's cluster connections do
    (the certificate against backend.redis_ca_cert, the host name). Nothing connects here; the
    real TLS cluster is test_the_pipe_over_a_tls_cluster's."""
    backend = backend_on("rediss+cluster://127.0.0.1:1", redis_ca_cert=str(tls_files.ca))
    kw = backend.connection_kwargs()
    assert kw["tls"] is True and kw["ssl_cert_reqs"] == "required" and kw["ssl_check_hostname"] is True
    assert kw["ssl_ca_certs"] == str(tls_files.ca)
    assert backend.node_pipes_capable()
    store = open_store(backend)
    node = getattr(pipe_of(store), "_pipe_at")("127.0.0.1", 1)
    context = getattr(node, "_tls")
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    store.close()
    backend.close()
    # With redis_wait_replicas the pooled path alone sends WAIT: no pipes.
    assert not backend_on("redis+cluster://127.0.0.1:1", redis_wait_replicas=1).node_pipes_capable()


async def test_the_pipe_over_a_tls_cluster(tls_cluster: LocalCluster, tls_files: TLSFiles) -> None:
    """A TLS-only cluster (every link TLS, conftest `tls_cluster`): the per-node pipes speak TLS,
    verifying each master against backend.redis_ca_cert."""
    cluster = tls_cluster
    backend, store, buffer, pipe = pipe_rig(cluster.url, redis_ca_cert=str(tls_files.ca), socket_timeout=2.0,
                                            connect_timeout=1.0)
    threads = [secrets.token_hex(6) for _ in range(12)]
    try:
        for r in range(2):
            await asyncio.gather(*(store.append(buffer, buffer.prepare(t, f"m{r}", "console", "echo",
                                                                      append_id=f"{t}-{r}")) for t in threads))
        assert all(buffer.thread_len(t) == 2 for t in threads)
        assert len(pipe.node_commands()) == 3 and store.fallbacks == 0
        tls_pipe = next(iter(getattr(pipe, "_pipes").values()))
        context = getattr(tls_pipe, "_tls")
        assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    finally:
        close_rig(backend, store)
