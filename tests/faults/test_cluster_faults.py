"""Faults on a real Redis Cluster and a real Sentinel set, under a steady append load.

- a resharding (slots of live threads migrated with their keys): no error reaches the caller, every
  acknowledged append is stored once at its index, indices stay gap-free;
- a master killed (SIGKILL): appends pause until its replica is promoted, then carry on; the
  acknowledged appends lost to asynchronous replication are counted (printed), and with
  `redis_wait_replicas: 1` none is lost;
- the same on Sentinel (SENTINEL FAILOVER, and SIGKILL of the master);
- a real `xml-pipeline run` (pump + worker processes) keeps answering across each fault: exactly one
  answer or error per conversation.

The pause and loss figures are printed (`-s`), not asserted as timings: docs/storage.md quotes them.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_harness import Tally, executions, redis_backend, wait_for, write_organism
from redis_cluster import LocalCluster, LocalSentinel
from test_pump_faults import _collect, _run_cli

from xml_pipeline.memory import BackendConfig, ContextBuffer
from xml_pipeline.memory.redis_backend import RedisBackend
from xml_pipeline.message_bus.message import Message

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

SIGNING_KEY = "fault-tests-signing-key-0123456789"


class AppendLoad:
    """`writers` threads appending to their own conversation threads through one ContextBuffer, as
    fast as they can, recording what each append acknowledged and how long each call took."""

    def __init__(self, backend: RedisBackend, writers: int = 6, threads_per_writer: int = 2) -> None:
        self.buffer = ContextBuffer(backend)
        self.tids = [f"load-{w}-{t}" for w in range(writers) for t in range(threads_per_writer)]
        self.acked: dict[str, list[tuple[int, str]]] = {tid: [] for tid in self.tids}
        self.errors: list[BaseException] = []
        self.max_call = 0.0
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(self.tids[w::writers],), daemon=True)
                         for w in range(writers)]

    def _run(self, tids: list[str]) -> None:
        n = 0
        while not self._stop.is_set():
            tid = tids[n % len(tids)]
            tag = f"{tid}#{n}"
            started = time.monotonic()
            try:
                slot = self.buffer.append(tid, {"tag": tag}, "load", "sink")
            except BaseException as e:  # noqa: BLE001 - every error is a failure of the test
                self.errors.append(e)
                return
            self.max_call = max(self.max_call, time.monotonic() - started)
            self.acked[tid].append((slot.index, tag))
            n += 1

    def __enter__(self) -> "AppendLoad":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(60)

    def total(self) -> int:
        return sum(len(a) for a in self.acked.values())

    def wait_more(self, n: int, timeout: float = 30) -> None:
        target = self.total() + n
        wait_for(lambda: self.total() >= target or self.errors, f"{n} more appends", timeout)

    def check(self) -> list[tuple[str, int, str]]:
        """Assert the stored threads are gap-free and hold no duplicate; return the acknowledged
        appends that are not stored at their index (lost in a failover)."""
        lost = []
        for tid, acks in self.acked.items():
            slots = self.buffer.get_thread_slots(tid)
            assert [s.index for s in slots] == list(range(len(slots))), tid
            tags = [s.payload["tag"] for s in slots]
            assert len(set(tags)) == len(tags), f"{tid}: an append was stored twice"
            lost += [(tid, i, tag) for i, tag in acks if i >= len(tags) or tags[i] != tag]
        return lost


def _backend(url: str, **config: Any) -> RedisBackend:
    config.setdefault("socket_timeout", 1.0)
    config.setdefault("connect_timeout", 0.5)
    return RedisBackend(BackendConfig(backend_type="redis", redis_url=url, redis_prefix=f"xpc{time.monotonic_ns()}:",
                                      redis_ttl=300, signing_key=SIGNING_KEY, **config))


def _slot(backend: RedisBackend, tid: str) -> int:
    return int(backend.client.keyslot(backend.keys.buffer(tid)))


def test_resharding_under_load_loses_nothing_and_surfaces_nothing(shared_cluster: LocalCluster) -> None:
    backend = _backend(shared_cluster.url)
    masters = shared_cluster.masters()
    with AppendLoad(backend) as load:
        load.wait_more(300)
        moved = 0
        # Every live thread's slot moves to the next master, one slot at a time, keys and all.
        for tid in load.tids:
            slot = _slot(backend, tid)
            owner = shared_cluster.owner_of(slot)
            target = masters[(masters.index(owner) + 1) % len(masters)]
            moved += shared_cluster.migrate_slot(slot, target)
            load.wait_more(20)
        load.wait_more(200)
    assert load.errors == []
    assert moved >= 2 * len(load.tids)  # buffer and op keys of every thread moved (at least)
    assert load.check() == []
    assert all(len(acks) == backend.buffer_thread_len(tid) for tid, acks in load.acked.items())
    print(f"\nresharding: {len(load.tids)} slots moved ({moved} keys) during {load.total()} appends; "
          f"longest append {load.max_call * 1000:.0f} ms, none lost, no error")
    backend.buffer_clear()
    backend.close()


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_killed_master_pauses_appends_and_loses_only_unreplicated_ones(redis_cluster: LocalCluster,
                                                                         wait_replicas: int) -> None:
    backend = _backend(redis_cluster.url, redis_wait_replicas=wait_replicas)
    with AppendLoad(backend) as load:
        load.wait_more(300)
        victim = redis_cluster.owner_of(_slot(backend, load.tids[0]))
        killed_at = time.monotonic()
        redis_cluster.kill_master_and_wait_failover(victim)
        promoted_after = time.monotonic() - killed_at
        if wait_replicas:
            redis_cluster.restart(victim)  # back as its successor's replica: WAIT is answered again
        load.wait_more(300, timeout=60)
    assert load.errors == []
    lost = load.check()
    print(f"\ncluster master killed (WAIT {wait_replicas}): replica promoted after {promoted_after:.1f} s; "
          f"longest append {load.max_call:.1f} s; {len(lost)} of {load.total()} acknowledged appends lost")
    if wait_replicas:
        assert lost == []
    backend.close()


@pytest.mark.parametrize("how", ["failover", "kill"])
def test_sentinel_failover_is_a_pause(redis_sentinel: LocalSentinel, how: str) -> None:
    backend = _backend(redis_sentinel.url)
    with AppendLoad(backend, writers=3) as load:
        load.wait_more(300)
        started = time.monotonic()
        old = redis_sentinel.current_master()
        new = redis_sentinel.failover(kill=how == "kill")
        switched_after = time.monotonic() - started
        load.wait_more(300, timeout=60)
    assert load.errors == []
    lost = load.check()
    print(f"\nsentinel {how}: new master after {switched_after:.1f} s; longest append {load.max_call:.1f} s; "
          f"{len(lost)} of {load.total()} acknowledged appends lost")
    assert new is not old and redis_sentinel.current_master() is new
    backend.close()


WORK = """
- {name: work, handler: "fault_handlers:work", cpu_bound: true}
- {name: wait, handler: "fault_handlers:wait"}
"""


def _run_across(url: str, inject: Any, tmp_path: Path, cli_env: dict[str, str], **backend: Any) -> Tally:
    """`xml-pipeline run` (the pump and its worker processes) on `url` (with more `backend:` keys of
    organism.yaml) while `inject()` happens: every conversation gets exactly one answer or one
    error, and no handler runs twice."""
    marker = tmp_path / "runs"
    path = write_organism(tmp_path, WORK, backend={**redis_backend(url, f"xpr{time.monotonic_ns()}:"), **backend},
                          workers=2)
    sent = [Message(sender="console", to=to, payload=f'<m tag="{to}{i}" marker="{marker}" seconds="0.01"/>')
            for to in ("work", "wait") for i in range(150)]
    tally = Tally(sent)
    p = _run_cli(path, sent, cli_env)
    reader = _collect(p, tally)
    wait_for(lambda: len(tally.outputs) >= 40, "the first answers", 60)
    before = len(tally.outputs)
    inject()
    after = len(tally.outputs)
    assert p.wait(180) in (0, 1)
    reader.join(10)
    stderr = p.stderr.read() if p.stderr else ""
    tally.assert_exactly_one_each()
    assert p.returncode == (1 if tally.errored else 0), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert max(executions(marker).values()) == 1
    assert before < len(sent)  # the fault hit a running organism
    for m in tally.outputs:
        if m.is_error:
            print("error response:", m.payload[:300])
    print(f"\n{before} answered before the fault, {after} when it was over")
    return tally


@pytest.mark.parametrize("fault", ["reshard", "kill-master"])
def test_a_run_on_a_cluster_keeps_answering(fault: str, redis_cluster: LocalCluster, tmp_path: Path,
                                            cli_env: dict[str, str]) -> None:
    def inject() -> None:
        if fault == "reshard":
            masters = redis_cluster.masters()
            for slot in range(0, 16384, 331):  # 50 slots all over the key space move to the next master
                owner = redis_cluster.owner_of(slot)
                redis_cluster.migrate_slot(slot, masters[(masters.index(owner) + 1) % len(masters)])
        else:
            redis_cluster.kill_master_and_wait_failover(redis_cluster.masters()[0])

    tally = _run_across(redis_cluster.url, inject, tmp_path, cli_env)
    print(f"\nrun across {fault}: {tally.answered} answered, {tally.errored} errors of {len(tally.sent)}")


def test_a_run_on_sentinel_keeps_answering_when_its_master_dies(redis_sentinel: LocalSentinel, tmp_path: Path,
                                                              cli_env: dict[str, str]) -> None:
    tally = _run_across(redis_sentinel.url, lambda: redis_sentinel.failover(kill=True), tmp_path, cli_env)
    print(f"\nrun across a sentinel failover: {tally.answered} answered, {tally.errored} errors of {len(tally.sent)}")


PODS = """
- {name: work, handler: "fault_handlers:work", cpu_bound: true}
"""


@pytest.mark.parametrize("fault", ["kill-master", "reshard"])
def test_pump_and_worker_pods_on_a_cluster_keep_answering(fault: str, redis_cluster: LocalCluster, tmp_path: Path,
                                                          cli_env: dict[str, str], procs: list[Any]) -> None:
    """`xml-pipeline pump` and `xml-pipeline worker` processes on a cluster (streams in one slot per
    organism, thread data spread over the masters) while a master dies or slots move: every
    conversation sent through ingress gets exactly one answer or error on egress."""
    from pump_harness import cli_popen

    from xml_pipeline.memory import create_backend
    from xml_pipeline.message_bus.ingress import send_message
    from xml_pipeline.message_bus.message import parse_message
    from xml_pipeline.message_bus.streams import Streams
    from fault_harness import load, messages

    path = write_organism(tmp_path, PODS, backend=redis_backend(redis_cluster.url, f"xpp{time.monotonic_ns()}:"),
                          workers=1, claim_idle_seconds=1.0, heartbeat_seconds=0.2, max_attempts=3, drain_seconds=5)
    env = dict(cli_env, XP_CONFIG=str(path))
    for role in ("pump", "worker"):
        procs.append(cli_popen(role, "-v", "--heartbeat-file", str(tmp_path / f"{role}.hb"), env=env,
                               log=tmp_path / f"{role}.log"))
    backend = create_backend(load(path).backend)
    streams = Streams(backend)  # type: ignore[arg-type]
    marker = tmp_path / "runs"
    sent = messages("work", 40, marker, seconds="0.02")
    tally = Tally(sent)
    last = ["-"]

    def poll() -> bool:
        try:
            rows = backend.client.xrange(streams.egress, min=last[0])  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a node failing over: read again later
            return False
        for entry_id, fields in rows:
            if last[0] != "-" and entry_id.decode() == last[0][1:]:
                continue
            last[0] = "(" + entry_id.decode()
            tally.add(parse_message(fields[b"xml"]))
        return tally.complete()

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-8000:]}" for p in sorted(tmp_path.glob("*.log")))

    for m in sent[:20]:
        send_message(backend, m)  # type: ignore[arg-type]
    try:
        wait_for(lambda: poll() or len(tally.outputs) >= 5, "the first answers", 60)
        if fault == "kill-master":
            redis_cluster.kill_master_and_wait_failover(redis_cluster.masters()[0])
            promoted_at = time.monotonic()
            wait_for(lambda: poll() or True, "egress readable", 30)  # what was answered by now
            answered = len(tally.outputs)
        else:
            masters = redis_cluster.masters()
            for slot in range(0, 16384, 331):
                owner = redis_cluster.owner_of(slot)
                redis_cluster.migrate_slot(slot, masters[(masters.index(owner) + 1) % len(masters)])
        for m in sent[20:]:
            send_message(backend, m)  # type: ignore[arg-type]
        if fault == "kill-master":
            # Printed for docs/storage.md: how long after the promotion the pods answer again.
            wait_for(lambda: poll() or len(tally.outputs) > answered, "an answer after the promotion", 60)
            print(f"\nfirst answer {time.monotonic() - promoted_at:.1f} s after the replica was promoted")
        wait_for(poll, "an output for every conversation", 90)
        if fault == "kill-master":
            # Asynchronous replication: egress is read on the master, so this reader can see an output
            # the replica never received; the promoted replica lacks it, the conversation runs again
            # and writes it again under the same message id (docs/storage.md, "Egress across a
            # failover"). One answer or error per conversation still holds, counted by message id.
            repeats = tally.assert_one_output_id_each()
        else:
            tally.assert_exactly_one_each()
            repeats = 0
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs()}") from None
    assert "Traceback" not in logs()
    print(f"\npods across {fault}: {tally.answered} answered, {tally.errored} errors of {len(sent)}, "
          f"{repeats} output(s) written again after the failover; "
          f"handler runs per task at most {max(executions(marker).values())}")
    backend.close()
