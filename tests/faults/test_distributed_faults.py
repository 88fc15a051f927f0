"""Faults of distributed mode with real `xml-pipeline pump` / `worker` processes and a real
redis-server: Redis restarted without persistence, a pump SIGKILLed and restarted quickly, Redis
forgetting its scripts, a worker SIGKILLed mid-task, Redis gone (health). Each test counts what was
sent against what came back on egress, and how often each handler ran."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fault_harness import Tally, executions, load, messages, redis_backend, wait_for, write_organism
from pump_harness import cli, cli_popen

from xml_pipeline.memory import create_backend
from xml_pipeline.message_bus.ingress import send_message
from xml_pipeline.message_bus.streams import Streams
from xml_pipeline.message_bus.message import Message, parse_message

pytestmark = pytest.mark.faults

LISTENERS = """
- {name: work, handler: "fault_handlers:work", cpu_bound: true}
- {name: die_once, handler: "fault_handlers:die_once", cpu_bound: true}
"""


class Cluster:
    """One organism's pump and worker processes on `server`, and the egress as its senders see it."""

    def __init__(self, server: Any, prefix: str, tmp_path: Path, env: dict[str, str], procs: list[Any],
                 **pool: Any) -> None:
        settings = {"workers": 1, "claim_idle_seconds": 1.0, "heartbeat_seconds": 0.2, "max_attempts": 3,
                    "drain_seconds": 5}
        settings.update(pool)
        self.path = write_organism(tmp_path, LISTENERS, backend=redis_backend(server.url, prefix), **settings)
        self.env = dict(env, XP_CONFIG=str(self.path))
        self.tmp = tmp_path
        self.procs = procs
        self.server = server
        self.backend = create_backend(load(self.path).backend)
        self.streams = Streams(self.backend)
        self.seen: dict[str, Message] = {}
        self.outputs: list[Message] = []
        self._last = "0-0"

    def start(self, role: str, name: str, *extra: str) -> subprocess.Popen[bytes]:
        p = cli_popen(role, "--heartbeat-file", str(self.tmp / f"{name}.hb"), *extra, env=self.env,
                      log=self.tmp / f"{name}.log")
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def wait(self, cond: Any, what: str, timeout: float = 60) -> Any:
        """wait_for, with the processes' logs in the failure message."""
        try:
            return wait_for(cond, what, timeout)
        except AssertionError as e:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))
            raise AssertionError(f"{e}\n{logs}") from None

    def send(self, sent: list[Message]) -> None:
        for m in sent:
            send_message(self.backend, m)

    def poll(self, tally: Tally) -> bool:
        """Read new egress entries into `tally`; True once every sent conversation has an output.
        Reads past a Redis restart too (the egress stream starts again from nothing)."""
        client = self.server.client()
        try:
            if not client.exists(self.streams.egress):
                self._last = "0-0"
            rows = client.xrange(self.streams.egress, min=f"({self._last}" if self._last != "0-0" else "-")
        except Exception:  # noqa: BLE001 - Redis restarting: read again later
            return False
        for entry_id, fields in rows:
            self._last = entry_id.decode()
            tally.add(parse_message(fields[b"xml"]))
        return tally.complete()

    def close(self) -> None:
        self.backend.close()


def healthcheck(cluster: Cluster, name: str) -> subprocess.CompletedProcess[str]:
    return cli("healthcheck", "--file", str(cluster.tmp / f"{name}.hb"), "--max-age", "30", env=cluster.env)


def test_lost_tasks_after_a_redis_restart_without_persistence_are_answered(  # type: ignore[no-untyped-def]
        fresh_redis, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """Redis restarts without its data while tasks are queued: the pump answers every lost task with
    a TaskDeadline error (its consumers and ingress slots come back), and serves new messages."""
    c = Cluster(fresh_redis, prefix, tmp_path, cli_env, procs, task_deadline_seconds=3)
    c.start("pump", "pump")
    c.start("worker", "w")
    marker = tmp_path / "runs"
    sent = messages("work", 6, marker, seconds="1")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: executions(marker), "the first task to start", 60)
    fresh_redis.restart()  # every key is gone: queued tasks, ingress entries, streams, threads
    c.wait(lambda: c.poll(tally), "an answer or error for every message", 60)
    tally.assert_exactly_one_each()
    assert tally.errored >= 1
    # Lost tasks: TaskDeadline; a step the restart interrupted past the backend's retries: BackendError.
    assert all('type="TaskDeadline"' in m.payload or 'type="BackendError"' in m.payload
               for m in tally.outputs if m.is_error), [m.payload for m in tally.outputs]
    assert any('type="TaskDeadline"' in m.payload for m in tally.outputs)
    assert max(executions(marker).values()) == 1
    assert "no result from a worker within 3 s" in c.log("pump")
    # Tasks missed their deadline and no result came since: the probe says so.
    r = c.wait(lambda: (lambda r: r if r.returncode == 1 else None)(healthcheck(c, "pump")),
               "the healthcheck to report overdue results", 30)
    assert "results overdue" in r.stderr
    # The pump is not wedged: new messages are answered, and it is healthy again.
    again = messages("work", 3, tmp_path / "again")
    tally2 = Tally(again)
    c.send(again)
    c.wait(lambda: c.poll(tally2), "answers after the restart", 60)
    assert tally2.answered == 3
    c.wait(lambda: healthcheck(c, "pump").returncode == 0, "the pump healthy again", 30)
    c.close()


def test_errors_of_lost_tasks_reach_egress_when_redis_stays_down_past_the_deadline(  # type: ignore[no-untyped-def]
        fresh_redis, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """Redis goes down (and comes back without its data) for longer than the task deadline: the
    errors ending those conversations cannot be written when they are due, and the ingress entries that would have
    let another run write them are gone. The pump writes them itself once Redis answers."""
    c = Cluster(fresh_redis, prefix, tmp_path, cli_env, procs, task_deadline_seconds=2)
    c.start("pump", "pump")  # no worker: the tasks stay queued until Redis loses them
    sent = messages("work", 3, tmp_path / "runs")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: "ready" in c.log("pump") and c.server.client().xpending(c.streams.ingress, "pump")["pending"] == 3,
           "the pump to hold every message")
    fresh_redis.stop()
    c.wait(lambda: c.log("pump").count("could not be written") == 3, "the deadline to pass while Redis is down")
    fresh_redis.start()
    c.wait(lambda: c.poll(tally), "an error for every message once Redis is back")
    tally.assert_exactly_one_each()
    # The deadline's error, or the BackendError of the step that met Redis down after it.
    assert tally.errored == 3 and all('type="TaskDeadline"' in m.payload or 'type="BackendError"' in m.payload
                                      for m in tally.outputs), tally.outputs
    assert "ingress entry was lost with Redis's data" in c.log("pump")
    assert "Traceback" not in c.log("pump")  # an outage is logged by what failed, one line each
    c.close()


@pytest.mark.parametrize("redis_back", [True, False], ids=["redis-back", "redis-down"])
def test_sigterm_writes_the_kept_outputs_or_says_they_are_unwritten(  # type: ignore[no-untyped-def]
        redis_back: bool, fresh_redis, prefix: str, tmp_path: Path, cli_env: dict[str, str],
        procs: list[Any]) -> None:
    """SIGTERM while the pump keeps outputs Redis did not take: with Redis back it writes them before
    it exits 0; with Redis still down it exits 1 and says how many conversations may get no answer."""
    c = Cluster(fresh_redis, prefix, tmp_path, cli_env, procs, task_deadline_seconds=2)
    pump = c.start("pump", "pump")
    sent = messages("work", 2, tmp_path / "runs")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: "ready" in c.log("pump") and c.server.client().xpending(c.streams.ingress, "pump")["pending"] == 2,
           "the pump to hold every message")
    fresh_redis.stop()
    c.wait(lambda: c.log("pump").count("could not be written") == 2, "the deadline to pass while Redis is down")
    if redis_back:
        fresh_redis.start()
    pump.send_signal(signal.SIGTERM)
    assert pump.wait(30) == (0 if redis_back else 1), c.log("pump")
    if redis_back:
        c.wait(lambda: c.poll(tally), "an error for every message")
        tally.assert_exactly_one_each()
        assert "pump stopped cleanly" in c.log("pump")
    else:
        assert "2 conversation(s) whose outputs Redis did not take may get no answer" in c.log("pump")
        assert "pump stopped cleanly" not in c.log("pump")
    c.close()


def test_a_pump_restarted_quickly_after_sigkill_takes_over_every_message(  # type: ignore[no-untyped-def]
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """SIGKILL the pump mid-work and start a new one at once (before the dead pump's entries are
    claim_idle old): its periodic sweep takes them over, and each message is answered once."""
    # claim_idle longer than a pump takes to start: a sweep only at start would find nothing to take.
    c = Cluster(redis_server, prefix, tmp_path, cli_env, procs, workers=2, claim_idle_seconds=4.0,
                heartbeat_seconds=0.5)
    first = c.start("pump", "pump1")
    c.start("worker", "w", "--processes", "2")
    warm = Tally(messages("work", 1, tmp_path / "warm"))
    c.send([Message(sender="console", to="work", payload="<m/>", id=warm.sent[0])])
    c.wait(lambda: c.poll(warm), "the processes to be up", 60)
    marker = tmp_path / "runs"
    sent = messages("work", 8, marker, seconds="0.2")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: executions(marker), "the first task to start", 60)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    c.start("pump", "pump2")
    c.wait(lambda: c.poll(tally), "every message answered", 60)
    tally.assert_exactly_one_each()
    assert tally.answered == 8
    assert "took over" in c.log("pump2")
    # At-least-once below the answer: a task of the dead pump may run again for the new one.
    assert max(executions(marker).values()) <= 2
    c.close()


def test_script_cache_loss_does_not_run_a_task_twice(  # type: ignore[no-untyped-def]
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """SCRIPT FLUSH while a task runs for longer than claim_idle: the worker's heartbeat reloads its
    script, so the task is not reclaimed by the idle worker and runs once."""
    c = Cluster(redis_server, prefix, tmp_path, cli_env, procs, claim_idle_seconds=1.5, task_deadline_seconds=60)
    c.start("pump", "pump")
    c.start("worker", "w", "--processes", "2")
    marker = tmp_path / "runs"
    sent = messages("work", 1, marker, seconds="3")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: executions(marker), "the task to start", 60)
    client = redis_server.client()
    while not c.poll(tally):
        client.script_flush()  # again and again: heartbeats keep meeting an empty script cache
        time.sleep(0.3)
    tally.assert_exactly_one_each()
    assert tally.answered == 1, tally.outputs[0].payload
    assert executions(marker) == {"t0": 1}, marker.read_text()
    c.close()


def test_a_worker_killed_mid_task_is_replaced_and_its_task_requeued_at_once(  # type: ignore[no-untyped-def]
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """A child of `xml-pipeline worker --processes 2` dies mid-task: its supervisor re-queues the task
    at once (claim_idle is 60 s here, longer than this test waits), and it is answered once."""
    c = Cluster(redis_server, prefix, tmp_path, cli_env, procs, claim_idle_seconds=60, heartbeat_seconds=1,
                task_deadline_seconds=120)
    c.start("pump", "pump")
    c.start("worker", "w", "--processes", "2")
    marker = tmp_path / "runs"
    sent = messages("die_once", 2, marker)
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: c.poll(tally), "answers without waiting for claim_idle", 30)
    tally.assert_exactly_one_each()
    assert tally.answered == 2
    assert executions(marker) == {"t0": 2, "t1": 2}  # the death, then the run that answered
    assert "re-queued" in c.log("w")
    c.close()


def test_health_fails_while_redis_is_gone_and_says_why(  # type: ignore[no-untyped-def]
        fresh_redis, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    c = Cluster(fresh_redis, prefix, tmp_path, cli_env, procs)
    c.start("pump", "pump")
    wait_for(lambda: (tmp_path / "pump.hb").exists() and healthcheck(c, "pump").returncode == 0,
             "a healthy pump", 60)
    fresh_redis.stop()
    r = wait_for(lambda: (lambda r: r if r.returncode == 1 else None)(healthcheck(c, "pump")),
                 "the healthcheck to fail", 60)
    assert "unhealthy:" in r.stderr and "does not answer" in r.stderr
    assert "ERROR" in c.log("pump") and "pump unhealthy" in c.log("pump")
    fresh_redis.start()
    c.wait(lambda: healthcheck(c, "pump").returncode == 0, "the pump healthy again", 60)
    c.close()


def test_health_says_when_redis_rejects_the_credentials(  # type: ignore[no-untyped-def]
        redis_factory, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """A Redis that refuses the pump's password answers: the health reason and the log say the
    credentials were rejected (not that Redis does not answer), and never show the password."""
    server = redis_factory(password="right-password").start()
    c = Cluster(server, prefix, tmp_path, dict(cli_env, XP_REDIS_PASSWORD="wrong-password"), procs)
    c.start("pump", "pump")
    r = c.wait(lambda: (tmp_path / "pump.hb").exists()
               and (lambda r: r if r.returncode == 1 else None)(healthcheck(c, "pump")), "the healthcheck to fail")
    assert "rejected the credentials of user 'default'" in r.stderr and "does not answer" not in r.stderr, r.stderr
    log = c.log("pump")
    assert "rejected the credentials" in log and "does not answer" not in log, log
    assert "wrong-password" not in r.stderr + log
    c.close()


def test_sigterm_says_truthfully_where_unfinished_messages_are(  # type: ignore[no-untyped-def]
        fresh_redis, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """A pump stopped with work unfinished (no worker runs its task) says how many conversations
    are unfinished and whether their ingress entries are still in Redis: after a restart without
    persistence they are not, and the pump says so instead of promising a takeover."""
    c = Cluster(fresh_redis, prefix, tmp_path, cli_env, procs, drain_seconds=1)
    pump = c.start("pump", "pump")
    sent = messages("work", 2, tmp_path / "runs")
    c.send(sent)
    c.wait(lambda: "ready" in c.log("pump") and c.server.client().xpending(c.streams.ingress, "pump")["pending"] == 2,
           "the pump to hold both messages", 60)
    fresh_redis.restart()
    pump.send_signal(signal.SIGTERM)
    assert pump.wait(30) == 1
    log = c.log("pump")
    assert "drain timed out with 2 conversation(s) unfinished" in log, log
    assert "none of their ingress entries is in Redis any more (lost with Redis's data)" in log, log
    assert "stay pending" not in log
    c.close()


def test_a_long_conversation_is_not_taken_over_by_another_live_pump(  # type: ignore[no-untyped-def]
        redis_server, prefix: str, tmp_path: Path, cli_env: dict[str, str], procs: list[Any]) -> None:
    """Two live pumps sweep the ingress stream every claim_idle / 2; a conversation that lasts
    longer than claim_idle stays with the pump running it (it refreshes its entries), so its task
    runs once and it is answered once."""
    c = Cluster(redis_server, prefix, tmp_path, cli_env, procs, claim_idle_seconds=1.0, task_deadline_seconds=60)
    c.start("pump", "pump1")
    c.start("pump", "pump2")
    c.start("worker", "w", "--processes", "2")
    marker = tmp_path / "runs"
    sent = messages("work", 2, marker, seconds="3")
    tally = Tally(sent)
    c.send(sent)
    c.wait(lambda: c.poll(tally), "both answers", 60)
    tally.assert_exactly_one_each()
    assert tally.answered == 2
    assert executions(marker) == {"t0": 1, "t1": 1}, marker.read_text()
    assert "took over" not in c.log("pump1") + c.log("pump2")
    c.close()
