"""Real `xml-pipeline pump` and `worker` processes on a local Redis Cluster, the tasks stream split
into buckets (message_bus/streams.py, "Task buckets"): every conversation sent through ingress gets
exactly one answer on egress while tasks go through many buckets, while workers die mid-task, while
a consumer that died holds tasks in several buckets, and while the slots of buckets move to another
master."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pump_harness import cli_environment, cli_popen
from redis_cluster import LocalCluster

FAULTS = Path(__file__).resolve().parent.parent / "faults"
if str(FAULTS) not in sys.path:
    sys.path.insert(0, str(FAULTS))  # fault_harness here, fault_handlers in the worker processes

from fault_harness import Tally, executions, load, messages, redis_backend, wait_for, write_organism  # noqa: E402

from xml_pipeline import contract  # noqa: E402
from xml_pipeline.memory import create_backend  # noqa: E402
from xml_pipeline.message_bus.ingress import send_message  # noqa: E402
from xml_pipeline.message_bus.message import Message, parse_message  # noqa: E402
from xml_pipeline.message_bus.streams import WORKER_GROUP, Streams  # noqa: E402

pytestmark = pytest.mark.cluster

LISTENERS = """
- {name: work, handler: "fault_handlers:work", cpu_bound: true}
- {name: die_once, handler: "fault_handlers:die_once", cpu_bound: true}
"""


class Organism:
    """One organism's pump and worker processes on a local cluster, and its egress as senders see it."""

    def __init__(self, cluster: LocalCluster, tmp_path: Path, procs: list[Any], **pool: Any) -> None:
        settings = {"workers": 1, "claim_idle_seconds": 1.0, "heartbeat_seconds": 0.2, "max_attempts": 3,
                    "drain_seconds": 5}
        settings.update(pool)
        prefix = f"xps{time.monotonic_ns()}:"
        self.path = write_organism(tmp_path, LISTENERS, backend=redis_backend(cluster.url, prefix), **settings)
        env = cli_environment(FAULTS)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
        self.env = dict(env, XP_CONFIG=str(self.path))
        self.tmp, self.procs, self.cluster = tmp_path, procs, cluster
        self.backend: Any = create_backend(load(self.path).backend)
        self.streams = Streams(self.backend)
        self._last = "-"

    def start(self, role: str, name: str, *extra: str) -> None:
        self.procs.append(cli_popen(role, "--heartbeat-file", str(self.tmp / f"{name}.hb"), *extra, env=self.env,
                                    log=self.tmp / f"{name}.log"))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def wait(self, cond: Any, what: str, timeout: float = 60) -> Any:
        try:
            return wait_for(cond, what, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def send(self, sent: list[Message]) -> None:
        for m in sent:
            send_message(self.backend, m)

    def poll(self, tally: Tally) -> bool:
        try:
            rows = self.backend.client.xrange(self.streams.egress, min=self._last)
        except Exception:  # noqa: BLE001 - a slot moving: read again later
            return False
        for entry_id, fields in rows:
            if self._last != "-" and entry_id.decode() == self._last[1:]:
                continue
            self._last = "(" + entry_id.decode()
            tally.add(parse_message(fields[b"xml"]))
        return tally.complete()

    def buckets_used(self) -> int:
        """How many task buckets have ever held a task (XINFO STREAM entries-added; the streams
        only keep unfinished tasks)."""
        return sum(1 for k in self.streams.task_streams
                   if self.backend.client.exists(k) and self.backend.client.xinfo_stream(k)["entries-added"] > 0)

    def close(self) -> None:
        self.backend.close()


def test_pump_and_workers_answer_every_conversation_once_through_many_buckets(
        shared_cluster: LocalCluster, tmp_path: Path, procs: list[Any]) -> None:
    o = Organism(shared_cluster, tmp_path, procs)
    assert o.streams.sharded and len(o.streams.task_streams) == contract.CLUSTER_TASKS_BUCKETS
    o.start("pump", "pump")
    o.start("worker", "w1")
    o.start("worker", "w2")
    marker = tmp_path / "runs"
    sent = messages("work", 48, marker, seconds="0.01")
    tally = Tally(sent)
    o.send(sent)
    o.wait(lambda: o.poll(tally), "an answer for every conversation", 60)
    tally.assert_exactly_one_each()
    assert tally.answered == len(sent)
    assert max(executions(marker).values()) == 1 and len(executions(marker)) == len(sent)
    assert o.buckets_used() == contract.CLUSTER_TASKS_BUCKETS  # 48 tasks dealt round robin over 16
    info = o.streams.client.xpending  # every bucket acknowledged and emptied
    assert all(o.backend.client.xlen(k) == 0 and info(k, WORKER_GROUP)["pending"] == 0
               for k in o.streams.task_streams)
    assert "Traceback" not in o.logs()
    o.close()


def test_workers_killed_mid_task_have_their_tasks_requeued_in_their_buckets(
        shared_cluster: LocalCluster, tmp_path: Path, procs: list[Any]) -> None:
    """Children of `xml-pipeline worker --processes 2` die mid-task (each tag kills its first worker):
    the supervisor re-queues each dead child's task in its own bucket at once (claim_idle is 60 s
    here), and every conversation is answered once."""
    o = Organism(shared_cluster, tmp_path, procs, claim_idle_seconds=60, heartbeat_seconds=1,
                 task_deadline_seconds=120)
    o.start("pump", "pump")
    o.start("worker", "w", "--processes", "2")
    marker = tmp_path / "runs"
    sent = messages("die_once", 6, marker)
    tally = Tally(sent)
    o.send(sent)
    o.wait(lambda: o.poll(tally), "answers without waiting for claim_idle", 60)
    tally.assert_exactly_one_each()
    assert tally.answered == len(sent)
    assert executions(marker) == {f"t{i}": 2 for i in range(6)}  # the death, then the run that answered
    assert o.buckets_used() >= 6
    assert (tmp_path / "w.log").read_text().count("re-queued") >= 6
    o.close()


def test_tasks_a_dead_consumer_held_in_several_buckets_are_claimed_by_a_live_worker(
        shared_cluster: LocalCluster, tmp_path: Path, procs: list[Any]) -> None:
    """A worker took a task from each of several buckets and died without a supervisor: the live
    worker's XAUTOCLAIM, bucket by bucket, takes them over after claim_idle_seconds."""
    o = Organism(shared_cluster, tmp_path, procs)
    o.start("pump", "pump")
    marker = tmp_path / "runs"
    sent = messages("work", 12, marker)
    tally = Tally(sent)
    o.send(sent)
    client = o.backend.client
    o.wait(lambda: sum(client.xlen(k) for k in o.streams.task_streams) == len(sent), "the tasks queued", 30)
    held = []
    for stream in o.streams.task_streams:
        if client.xlen(stream) and len(held) < 5:
            assert client.xreadgroup(WORKER_GROUP, "worker-gone", {stream: ">"}, count=1)
            held.append(stream)
    assert len(held) == 5
    o.start("worker", "w")
    o.wait(lambda: o.poll(tally), "an answer for every conversation", 60)
    tally.assert_exactly_one_each()
    assert tally.answered == len(sent)
    assert max(executions(marker).values()) == 1
    assert o.logs().count("reclaimed task entry") >= 5
    assert all(client.xpending(k, WORKER_GROUP)["pending"] == 0 for k in held)
    o.close()


def test_resharding_the_slots_of_buckets_mid_run_loses_and_doubles_nothing(
        shared_cluster: LocalCluster, tmp_path: Path, procs: list[Any]) -> None:
    o = Organism(shared_cluster, tmp_path, procs)
    o.start("pump", "pump")
    o.start("worker", "w1")
    o.start("worker", "w2")
    marker = tmp_path / "runs"
    sent = messages("work", 60, marker, seconds="0.02")
    tally = Tally(sent)
    o.send(sent[:30])
    o.wait(lambda: o.poll(tally) or len(tally.outputs) >= 5, "the first answers", 60)
    masters = shared_cluster.masters()
    moved = []
    for stream in o.streams.task_streams[::3]:  # six buckets, spread over every master, move on
        slot = shared_cluster.key_slot(stream)
        owner = shared_cluster.owner_of(slot)
        target = masters[(masters.index(owner) + 1) % len(masters)]
        shared_cluster.migrate_slot(slot, target)
        moved.append((slot, owner.port, target.port))
    o.send(sent[30:])
    o.wait(lambda: o.poll(tally), "an answer for every conversation", 90)
    tally.assert_exactly_one_each()
    assert tally.answered == len(sent), ([m.payload for m in tally.outputs if m.is_error], o.logs())
    assert max(executions(marker).values()) == 1
    assert all(shared_cluster.owner_of(slot).port == to for slot, _, to in moved)
    assert "Traceback" not in o.logs()
    o.close()
