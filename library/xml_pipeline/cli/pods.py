"""`xml-pipeline pump`, `worker` and `healthcheck`: the processes of pump and worker pods.

Configuration comes from the pod contract: XP_CONFIG names the mounted organism.yaml, and the XP_*
variables override its backend section. SIGTERM (how Kubernetes stops a pod) drains in-flight work
and exits 0. Both refresh a heartbeat file under /tmp that `xml-pipeline healthcheck` (the liveness
probe) checks.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.connection import wait as mp_wait
from pathlib import Path
from urllib.parse import urlsplit
from typing import TYPE_CHECKING, Any

from ..contract import CONFIG_PATH, ENV_CONFIG
from ..errors import ConfigError
from ..memory.factory import create_backend
from ..memory.protocol import SharedBackend
from ..organism import Organism, load_organism
from . import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from ..message_bus.local_pool import Dispatcher

log = logging.getLogger("xml_pipeline.cli")

#: How often the pump refreshes its heartbeat file.
PUMP_HEARTBEAT_SECONDS = 2.0
#: A pump whose consumers (or ingress slots) are all busy and that finished nothing for this long
#: is stuck: it reports unhealthy.
STALL_SECONDS = 30.0


def config_path(args: argparse.Namespace) -> str:
    path = getattr(args, "config", None) or os.environ.get(ENV_CONFIG)
    if not path:
        raise ConfigError(ENV_CONFIG, "is not set: point it at the organism.yaml "
                          f"(pods: {CONFIG_PATH}) or pass --config")
    if os.path.isdir(path):
        raise ConfigError("--config" if getattr(args, "config", None) else ENV_CONFIG,
                          f"{path!r} is a directory", "the path of an organism.yaml file")
    return path


def check_heartbeat_file(path: str | None) -> None:
    """Refuse a heartbeat file that cannot be written: the process would run, but its liveness probe
    would never find a heartbeat and have it restarted over and over without saying why."""
    if path is None:
        return
    p = Path(path)
    try:
        if p.is_dir():
            raise IsADirectoryError(21, "is a directory")
        if p.parent.exists() and not p.parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")  # how the heartbeat is written (touch)
        tmp.write_text("")
        tmp.unlink()
    except OSError as e:
        raise ConfigError("--heartbeat-file", f"{path!r} cannot be written ({e.strerror or e})",
                          "a file in a writable directory, e.g. /tmp/xml-pipeline.heartbeat") from None


def load(args: argparse.Namespace) -> Organism:
    return load_organism(config_path(args))


def _backend_down(backend: SharedBackend) -> str | None:
    """None if the backend answers, else why not: a Redis that refuses the credentials answers, so
    saying it "does not answer" would send the operator looking for a network problem."""
    if backend.ping():
        return None
    from ..memory.redis_backend import RedisBackend
    if isinstance(backend, RedisBackend):
        import redis
        try:  # one unretried PING: its error says whether Redis is down or refused the login
            backend.client.ping()
        except redis.exceptions.AuthenticationError:
            config = backend.config
            user = config.redis_username or urlsplit(config.redis_url).username or "default"
            return (f"Redis at {config.redacted_url} answers but rejected the credentials of user {user!r} "
                    "(XP_REDIS_USERNAME/XP_REDIS_PASSWORD)")
        except Exception:  # noqa: BLE001 - down, or any other failure: it does not answer
            pass
        else:
            return None
    return f"the backend {backend} does not answer"


def _wait_for_backend(backend: SharedBackend, stopping: Any) -> bool:
    """Block until the backend answers (pods may start before their Redis). False if asked to stop."""
    from ..message_bus.retry import Backoff

    backoff = Backoff()
    warned = False
    while not stopping():
        down = _backend_down(backend)
        if down is None:
            if warned:
                log.info("backend is reachable again")
            return True
        if not warned:
            log.warning("%s; waiting", down)
            warned = True
        time.sleep(backoff.next())
    return False


# ---------------------------------------------------------------------------------------------------
# pump
# ---------------------------------------------------------------------------------------------------
def _require_signing_key(organism: Organism) -> None:
    """Pump and workers are separate processes: on Redis they must share a configured key (without
    one every process signs with a random key of its own, and none could read another's slots)."""
    if organism.backend.backend_type == "redis" and not organism.backend.signing_keys:
        raise ConfigError("XP_SIGNING_KEY", "is not set: the pump and its workers are separate processes "
                          "and share slots only under a configured signing key",
                          "a random secret of 16 or more characters, the same for the pump and every worker "
                          "(or backend.signing_key in the organism file)")


def cmd_pump(args: argparse.Namespace) -> int:
    organism = load(args)
    _require_signing_key(organism)
    check_heartbeat_file(args.heartbeat_file)
    backend = create_backend(organism.backend)
    try:
        return asyncio.run(_pump_main(organism, backend, args.heartbeat_file, args.metrics_port))
    finally:
        backend.close()


async def _pump_main(organism: Organism, backend: SharedBackend, heartbeat_file: str, metrics_port: int = 0) -> int:
    from ..message_bus.dispatcher import RedisDispatcher
    from ..message_bus.ingress import IngressBridge
    from ..message_bus.streams import as_redis, stream_info
    from ..message_bus.worker import touch
    from ..message_bus.stream_pump import StreamPump
    from .metrics import MetricsServer, pump_samples
    from .run import make_dispatcher

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pump_ref: list[Any] = []  # the pump and its bridge, once they exist
    stall = max(STALL_SECONDS, organism.process_pool.task_deadline) if organism.has_cpu_bound else STALL_SECONDS

    async def heartbeat() -> None:
        unhealthy: str | None = None
        while True:
            reason = await loop.run_in_executor(None, _pump_problem, backend, pump_ref, stall)
            if reason != unhealthy:
                if reason:
                    log.error("pump unhealthy: %s", reason)
                else:
                    log.info("pump healthy again")
                unhealthy = reason
            touch(heartbeat_file, f"unhealthy: {reason}\n" if reason else "")
            await asyncio.sleep(PUMP_HEARTBEAT_SECONDS)

    beat = asyncio.create_task(heartbeat())
    metrics: MetricsServer | None = None
    try:
        if not await loop.run_in_executor(None, _wait_for_backend, backend, stop.is_set):
            return EXIT_OK
        redis_mode = organism.backend.backend_type == "redis"
        dispatcher: Dispatcher | None
        if redis_mode:
            dispatcher = RedisDispatcher(as_redis(backend), deadline=organism.process_pool.task_deadline) \
                if organism.has_cpu_bound else None
        else:
            dispatcher = make_dispatcher(organism, backend)
        pump = StreamPump(organism, backend, dispatcher=dispatcher, keep_outputs=False)
        await pump.start()
        if metrics_port:
            streams = (lambda: stream_info(as_redis(backend))) if redis_mode else None
            metrics = MetricsServer(lambda: pump_samples(pump, organism.name, organism.backend.backend_type, streams),
                                    metrics_port).start()
        bridge = IngressBridge(as_redis(backend), pump, claim_idle_seconds=organism.process_pool.claim_idle_seconds) \
            if redis_mode else None
        pump_ref[:] = [pump, bridge]
        if bridge is not None:
            await bridge.start()
            log.info("pump of organism %r ready: ingress %s → listeners %s → egress %s; cpu_bound work: %s",
                     organism.name, bridge.streams.ingress, ", ".join(organism.listener_names),
                     bridge.streams.egress, dispatcher.describe() if dispatcher else "none")
        else:
            log.warning("pump of organism %r runs on the %s backend: there is no ingress stream without "
                        "Redis, so this pump only idles (use backend type redis in a cluster)",
                        organism.name, organism.backend.backend_type)
        await stop.wait()
        log.info("stop requested: no new messages; draining %d conversation(s) (up to %.0f s)",
                 pump.inflight, organism.process_pool.drain_seconds)
        if bridge is not None:
            await bridge.stop()
        unfinished = pump.inflight
        drained = await pump.stop(drain=True, timeout=organism.process_pool.drain_seconds)
        unwritten = await bridge.finish(5.0) if bridge is not None else 0
        if not drained:
            pending = await loop.run_in_executor(None, bridge.pending_entries) if bridge is not None else None
            if pending is None:
                where = "Redis does not answer, so whether their ingress entries survive is unknown"
            elif pending >= unfinished:
                where = f"their {pending} ingress entries stay pending for the next pump to take over"
            elif pending == 0:
                where = ("none of their ingress entries is in Redis any more (lost with Redis's data): "
                         "their senders get no answer")
            else:
                where = (f"only {pending} of their ingress entries are still in Redis (the next pump takes "
                         f"them over); the other {unfinished - pending} were lost with Redis's data and "
                         "get no answer")
            log.error("drain timed out with %d conversation(s) unfinished: %s", unfinished, where)
            return EXIT_FAILURE
        if unwritten:
            return EXIT_FAILURE
        log.info("pump stopped cleanly (%d messages, %d outputs)", pump.stats.messages, pump.stats.outputs)
        return EXIT_OK
    finally:
        beat.cancel()
        if metrics is not None:
            metrics.close()


def _pump_problem(backend: SharedBackend, pump_ref: list[Any], stall: float) -> str | None:
    """(thread) Why this pump cannot make progress, or None: Redis does not answer, every consumer
    or ingress slot is held while nothing finished for `stall` seconds, or worker results are
    overdue (tasks missed their deadline and no result came since)."""
    down = _backend_down(backend)
    if down is not None:
        return down
    if not pump_ref:
        return None
    pump, bridge = pump_ref
    idle_for = time.monotonic() - pump.last_progress
    if pump.busy >= pump.concurrency and idle_for > stall:
        return (f"capacity exhausted: all {pump.concurrency} consumers busy and nothing finished for "
                f"{idle_for:.0f} s")
    if bridge is not None:
        if bridge.redis_error is not None:
            return f"the ingress stream cannot be read: {bridge.redis_error}"
        if bridge.held >= bridge.max_inflight and idle_for > stall:
            return (f"capacity exhausted: all {bridge.max_inflight} ingress slots held and nothing finished "
                    f"for {idle_for:.0f} s")
    overdue = getattr(pump.dispatcher, "overdue", None)
    return overdue() if overdue is not None else None


# ---------------------------------------------------------------------------------------------------
# worker
# ---------------------------------------------------------------------------------------------------
def _require_redis(organism: Organism) -> None:
    if organism.backend.backend_type != "redis":
        raise ConfigError("backend.type", f"is {organism.backend.backend_type!r}, but worker processes share data "
                          "with the pump only through Redis (set backend.type or XP_BACKEND_TYPE)", ["redis"])


def cmd_worker(args: argparse.Namespace) -> int:
    organism = load(args)
    _require_redis(organism)
    _require_signing_key(organism)
    check_heartbeat_file(args.heartbeat_file)
    processes = args.processes if args.processes is not None else organism.process_pool.workers
    if processes < 1:
        raise ConfigError("--processes", f"must be >= 1, got {processes}")
    if not organism.has_cpu_bound:
        log.warning("organism %r has no cpu_bound listener: this worker will wait for tasks that never come",
                    organism.name)
    if processes == 1:
        return _worker_single(organism, args.heartbeat_file)
    return _supervise(processes, config_path(args), args.heartbeat_file)


def _worker_single(organism: Organism, heartbeat_file: str | None, *, name: str | None = None,
                   parent_pid: int | None = None) -> int:
    from ..message_bus.streams import as_redis
    from ..message_bus.worker import DistributedWorker
    backend = create_backend(organism.backend)
    worker = DistributedWorker(as_redis(backend), organism, name=name, heartbeat_file=heartbeat_file, parent_pid=parent_pid)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("worker %s: %s received; finishing the task in hand", worker.name, signal.Signals(signum).name)
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not _wait_for_backend(backend, lambda: worker.stopping):
            return EXIT_OK
        worker.run()
    finally:
        backend.close()
    return EXIT_OK


def _child_main(path: str, index: int, parent_pid: int, level: int, name: str | None = None) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s worker-{index} %(levelname)s %(name)s: %(message)s")
    organism = load_organism(path)
    sys.exit(_worker_single(organism, None, parent_pid=parent_pid, name=name))


def _release(path: str, consumer: str) -> None:
    """Re-queue the tasks of a dead child at once (release_consumer), instead of after claim_idle."""
    from ..message_bus.streams import as_redis
    from ..message_bus.worker import release_consumer
    try:
        organism = load_organism(path)
        backend = create_backend(organism.backend)
        try:
            requeued, dead = release_consumer(as_redis(backend), consumer, max_attempts=organism.process_pool.max_attempts)
        finally:
            backend.close()
    except Exception as e:  # noqa: BLE001 - the time-based reclaim still recovers them
        log.warning("could not release the tasks of dead worker %s (%s); they are reclaimed after "
                    "claim_idle_seconds", consumer, e)
        return
    if requeued or dead:
        log.warning("worker %s died holding %d task(s): %d re-queued, %d dead-lettered", consumer,
                    requeued + dead, requeued, dead)


def _supervise(processes: int, path: str, heartbeat_file: str) -> int:
    """Run `processes` consumer processes; restart the ones that die; SIGTERM stops them all."""
    from ..message_bus.worker import touch
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            log.info("%s received: stopping %d worker process(es) after their current task",
                     signal.Signals(signum).name, len(children))
        stopping = True
        for p in children.values():
            if p.is_alive() and p.pid:
                os.kill(p.pid, signal.SIGTERM)

    children: dict[int, Any] = {}
    level = logging.getLogger().getEffectiveLevel()

    names: dict[int, str] = {}
    from ..message_bus.streams import consumer_name

    def start(index: int) -> None:
        # The supervisor names each child's consumer, so it knows whose tasks to release on a death.
        names[index] = f"{consumer_name('worker')}-{index}"
        p = ctx.Process(target=_child_main, args=(path, index, os.getpid(), level, names[index]),
                        name=f"xp-worker-{index}")
        p.start()
        children[index] = p

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(processes):
        start(i)
    failures = 0
    while children:
        touch(heartbeat_file)
        mp_wait([p.sentinel for p in children.values()], timeout=PUMP_HEARTBEAT_SECONDS)
        for index, p in list(children.items()):
            if p.is_alive():
                continue
            p.join()
            del children[index]
            if stopping:
                continue
            failures += 1
            log.error("worker process %d (pid %s) exited with %s; starting a new one", index, p.pid, p.exitcode)
            if p.exitcode != 0:
                _release(path, names[index])
            time.sleep(min(5.0, 0.2 * failures))
            start(index)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# healthcheck
# ---------------------------------------------------------------------------------------------------
def cmd_healthcheck(args: argparse.Namespace) -> int:
    try:
        age = time.time() - os.stat(args.file).st_mtime
        with open(args.file) as f:
            status = f.read(4096).strip()
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat file {args.file}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"unhealthy: cannot read {args.file}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if age > args.max_age:
        print(f"unhealthy: heartbeat {args.file} is {age:.0f} s old (max {args.max_age:g} s)", file=sys.stderr)
        return EXIT_FAILURE
    if status:  # the process is alive but says it cannot make progress, and why
        print(status if status.startswith("unhealthy") else f"unhealthy: {status}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
