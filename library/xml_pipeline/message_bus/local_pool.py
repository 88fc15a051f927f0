"""Local mode: cpu_bound handlers in a pool of worker processes on this machine.

Why not concurrent.futures.ProcessPoolExecutor: when one of its workers dies, the whole pool breaks
and every task in flight fails with it. Here each worker owns one pipe and runs its tasks one at a
time, in the order they were sent, so the pump knows exactly which task a dead worker held: the
oldest one it has not answered (that one, and only that one, gets an error response); the tasks
queued behind it on its pipe never started and go to another worker. A new worker takes the dead
one's place, and the pump keeps running.

Each worker has up to `PREFETCH` tasks on its pipe: when it finishes one, the next is already there
to read, so it does not go to sleep and wait for the pump's event loop to get round to sending one
(and on a busy machine, for the scheduler to run it again once it does).

Safe under spawn and forkserver: a worker starts from `_worker_main` (a module-level function), gets
the backend by pickling (a ManagerBackend reconnects by address and authkey, a RedisBackend builds
its own pool) and imports handlers by reference. No state is inherited by forking a threaded parent.

Event-driven, no polling: the pump's event loop watches each worker's pipe and process sentinel
(`loop.add_reader`), so a result or a death wakes it at once. A task is written without waiting:
what the pipe does not take at once (a large message is far bigger than its buffer) is written as
the worker reads it (`loop.add_writer`), so the loop goes on with other messages meanwhile instead
of blocking in the write until the worker has read the whole task.

`ThreadWorkerPool` is the same interface for the single-process memory backend, whose data other
processes cannot see: cpu_bound handlers then run in threads of the pump process (said in a log
line), which, like the worker processes, take the message with the task (worker_task.py).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Protocol

from ..memory.async_store import use_from_one_thread
from ..memory.manager_io import Receiver, frame, send_obj, send_some
from ..memory.protocol import SharedBackend
from ..memory.store import AsyncStore
from ..organism import Organism
from .worker_task import WORKER_DIED, WorkerResult, WorkerTask, execute_task

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

log = logging.getLogger(__name__)

#: A worker that dies this many times in a row before it ever got ready means the pool cannot start.
MAX_BOOT_FAILURES = 3
#: Tasks sent to one worker before it answered: the one it runs and the next, waiting on its pipe.
PREFETCH = 2
#: A task whose message is longer (characters) waits for an idle worker instead of queueing on a
#: busy one's pipe: the pipe's buffer would not hold it, so it would wait in the pump behind that
#: worker's running task while another worker may be free first.
PREFETCH_MAX_PAYLOAD = 16 * 1024


class Dispatcher(Protocol):
    """Where the pump sends WorkerTasks: a local pool, threads, or a Redis Stream.

    The pump puts the message into the task (WorkerTask.message, and slot_index: where its slot
    landed) and reads the response's JSON from the result (WorkerResult.response), or the error.
    How both travel is the dispatcher's: over the pipe of a worker only it can reach (the pump's own
    child processes or threads), or sealed for the task in stream entries (dispatcher.py)."""

    def adopt_store(self, store: AsyncStore) -> None:
        """The pump's store, offered before start(): a dispatcher that talks to the same backend
        may send through it (its commands then share the pump's writes)."""
        ...
    async def start(self) -> None: ...
    async def run(self, task: WorkerTask) -> WorkerResult: ...
    async def close(self) -> None: ...
    def describe(self) -> str: ...


# -- the worker process -------------------------------------------------------------------------------
def _worker_main(conn: Connection, backend: SharedBackend, name: str, log_level: int) -> None:
    """Entry point of a worker process: receive tasks on `conn`, answer with WorkerResults."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    # Ctrl-C is the parent's business: it drains and then tells us to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One task at a time in this thread: its Redis commands skip the connection pool.
    use_from_one_thread(backend)
    conn.send(("ready", os.getpid()))
    # Tasks and results as Connection.send frames them, without its copies of a large message
    # (memory/manager_io.py): a task's message is read into one buffer reused for every task.
    fd, receiver = conn.fileno(), Receiver()
    while True:
        try:
            task = receiver.recv(fd)
        except (EOFError, OSError):
            break  # the pump went away
        if task is None:
            break
        result = execute_task(backend, task, worker=name)
        try:
            send_obj(fd, result, pickle.Pickler, pickle.HIGHEST_PROTOCOL)
        except (BrokenPipeError, OSError):
            break
    try:
        backend.close()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


# -- the pool (pump side) -----------------------------------------------------------------------------
@dataclass(eq=False)
class _Worker:
    index: int
    process: Any
    conn: Connection
    ready: bool = False
    dead: bool = False
    #: Tasks sent and not answered yet, oldest first: the worker runs them in this order.
    tasks: collections.deque[tuple[WorkerTask, asyncio.Future[WorkerResult]]] = field(
        default_factory=collections.deque)
    started: float = field(default_factory=time.monotonic)
    #: Reads the worker's results from `conn` (manager_io.Receiver).
    receiver: Receiver = field(default_factory=Receiver)
    #: The same socket as `conn` (a dup), for writes that never wait (manager_io.send_some).
    sock: socket.socket | None = None
    #: What the pipe has not taken yet of the tasks sent, in order (written when it is writable).
    out: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


class LocalWorkerPool:
    """N worker processes, one task each at a time, replaced when they die."""

    def __init__(self, backend: SharedBackend, *, workers: int, start_method: str = "spawn") -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        self.backend = backend
        self.size = workers
        self.start_method = start_method
        # Literal arguments, so the type checker knows the context has Process and Pipe.
        self._ctx: SpawnContext | ForkServerContext = (
            multiprocessing.get_context("spawn") if start_method == "spawn"
            else multiprocessing.get_context("forkserver"))
        self._workers: list[_Worker] = []
        self._pending: collections.deque[tuple[WorkerTask, asyncio.Future[WorkerResult]]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._boot_failures = 0
        self._broken: str | None = None
        self._next_index = 0
        self.deaths = 0

    def describe(self) -> str:
        return f"{self.size} worker process(es) ({self.start_method})"

    def adopt_store(self, store: AsyncStore) -> None:
        """Tasks travel over the workers' own pipes: nothing to send through the store."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        parent, child = self._ctx.Pipe(duplex=True)
        index = self._next_index
        self._next_index += 1
        proc = self._ctx.Process(target=_worker_main, name=f"xml-pipeline-worker-{index}",
                                 args=(child, self.backend, f"worker-{index}", logging.getLogger().getEffectiveLevel()),
                                 daemon=True)
        proc.start()
        child.close()
        w = _Worker(index=index, process=proc, conn=parent,
                    sock=socket.socket(fileno=os.dup(parent.fileno())))
        self._workers.append(w)
        self._loop.add_reader(parent.fileno(), self._on_readable, w)
        self._loop.add_reader(proc.sentinel, self._on_exit, w)

    async def run(self, task: WorkerTask) -> WorkerResult:
        if self._broken:
            return WorkerResult(task.task_id, error=self._broken, error_type=WORKER_DIED)
        if self._closing:
            raise RuntimeError("the worker pool is closed")
        assert self._loop is not None, "start() the pool first"
        fut: asyncio.Future[WorkerResult] = self._loop.create_future()
        self._pending.append((task, fut))
        self._assign()
        return await fut

    def _assign(self) -> None:
        # Breadth first: every worker gets a task before any gets a second one.
        for depth in range(PREFETCH):
            for w in list(self._workers):
                if not self._pending:
                    return
                if w.dead or len(w.tasks) > depth:
                    continue
                if depth and _large(self._pending[0][0]):
                    return  # first in line, for the next idle worker
                task, fut = self._pending.popleft()
                while fut.cancelled() and self._pending:
                    task, fut = self._pending.popleft()
                if fut.cancelled():
                    return
                try:
                    self._send(w, task)
                except OSError:
                    self._pending.appendleft((task, fut))
                    self._on_death(w)
                    continue
                w.tasks.append((task, fut))

    def _send(self, w: _Worker, task: WorkerTask) -> None:
        """Write `task` to the worker's pipe without waiting: what the pipe does not take now is
        written by `_on_writable` as the worker reads, before any later task (order is kept)."""
        # A plain Pickler, not Connection.send's ForkingPickler: a task is plain data. Its message's
        # text is written from the pickler's own object, not copied into a buffer first.
        parts = frame(task, pickle.Pickler, pickle.HIGHEST_PROTOCOL)
        if w.out:
            w.out.extend(parts)
            return
        assert w.sock is not None and self._loop is not None
        w.out = send_some(w.sock, parts)
        if w.out:
            self._loop.add_writer(w.sock.fileno(), self._on_writable, w)

    def _on_writable(self, w: _Worker) -> None:
        assert w.sock is not None and self._loop is not None
        try:
            w.out = send_some(w.sock, w.out)
        except OSError:
            self._on_death(w)
            return
        if not w.out:
            self._loop.remove_writer(w.sock.fileno())

    def _stop_writing(self, w: _Worker) -> None:
        """Forget what the worker's pipe has not taken, and close the socket used to write it."""
        if w.sock is None:
            return
        if w.out and self._loop is not None:
            self._loop.remove_writer(w.sock.fileno())
            w.out = []
        w.sock.close()
        w.sock = None

    def _on_readable(self, w: _Worker) -> None:
        try:
            msg = w.receiver.recv(w.conn.fileno())
        except (EOFError, OSError):
            self._on_death(w)
            return
        self._receive(w, msg)
        self._assign()

    def _receive(self, w: _Worker, msg: Any) -> None:
        if isinstance(msg, tuple) and msg and msg[0] == "ready":
            w.ready = True
            self._boot_failures = 0
            return
        if w.tasks:
            _task, fut = w.tasks.popleft()
            if not fut.done():
                fut.set_result(msg)

    def _on_exit(self, w: _Worker) -> None:
        self._on_death(w)

    def _on_death(self, w: _Worker) -> None:
        if w.dead:
            return
        # Answers the worker sent before it died still count: read them first, so the task it
        # died on is the oldest one left.
        try:
            while w.tasks and w.conn.poll(0):
                self._receive(w, w.receiver.recv(w.conn.fileno()))
        except (EOFError, OSError):
            pass
        w.dead = True
        assert self._loop is not None
        self._stop_writing(w)
        self._loop.remove_reader(w.conn.fileno())
        self._loop.remove_reader(w.process.sentinel)
        w.process.join(timeout=1)
        code = w.process.exitcode
        w.conn.close()
        self._workers.remove(w)
        held = w.tasks.popleft() if w.tasks else None
        # The tasks queued behind it never started: first in line for the other workers.
        while w.tasks:
            self._pending.appendleft(w.tasks.pop())
        if self._closing and held is None:
            return
        self.deaths += 1
        if held is not None:
            task, fut = held
            what = f"signal {-code}" if isinstance(code, int) and code < 0 else f"exit code {code}"
            log.error("worker process %s (pid %s) died (%s) while running listener %r (task %s); "
                      "the task gets an error response and a new worker starts",
                      w.name, w.process.pid, what, task.listener, task.task_id)
            if not fut.done():
                fut.set_result(WorkerResult(
                    task.task_id, error=f"worker process died ({what}) while running listener {task.listener!r}",
                    error_type=WORKER_DIED, worker=w.name))
        else:
            log.error("worker process %s (pid %s) exited unexpectedly (exit code %s)", w.name, w.process.pid, code)
        if not w.ready:
            self._boot_failures += 1
            if self._boot_failures >= MAX_BOOT_FAILURES:
                self._broken = (f"worker processes cannot start ({self._boot_failures} died during start-up, "
                                f"last exit code {code}); check the handler imports and the backend")
                log.error("%s", self._broken)
                while self._pending:
                    task, fut = self._pending.popleft()
                    if not fut.done():
                        fut.set_result(WorkerResult(task.task_id, error=self._broken, error_type=WORKER_DIED))
                return
        if not self._closing:
            self._spawn()
            self._assign()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    async def close(self) -> None:
        """Stop the workers. Call after the pump drained: tasks still queued get an error."""
        if self._closing:
            return
        self._closing = True
        assert self._loop is not None
        while self._pending:
            task, fut = self._pending.popleft()
            if not fut.done():
                fut.set_result(WorkerResult(task.task_id, error="the worker pool was closed", error_type=WORKER_DIED))
        workers = list(self._workers)
        for w in workers:
            self._loop.remove_reader(w.conn.fileno())
            self._loop.remove_reader(w.process.sentinel)
            try:
                if w.out:  # a task the worker has not read whole: end its input, it stops at EOF
                    assert w.sock is not None
                    w.sock.shutdown(socket.SHUT_WR)
                else:
                    w.conn.send(None)
            except OSError:
                pass
            self._stop_writing(w)
        await self._loop.run_in_executor(None, _join_all, [w.process for w in workers], 5.0)
        for w in workers:
            for task, fut in w.tasks:
                if not fut.done():
                    fut.set_result(WorkerResult(task.task_id, error="the worker pool was closed",
                                                error_type=WORKER_DIED))
            w.tasks.clear()
            w.conn.close()
        self._workers.clear()


def _large(task: WorkerTask) -> bool:
    return task.message is not None and len(task.message.payload) > PREFETCH_MAX_PAYLOAD


def _join_all(procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2)
        if p.is_alive():
            p.kill()
            p.join()


class ThreadWorkerPool:
    """cpu_bound handlers in threads of the pump process (for the unshared memory backend)."""

    def __init__(self, backend: SharedBackend, *, workers: int) -> None:
        self.backend = backend
        self.size = max(1, workers)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def describe(self) -> str:
        return f"{self.size} thread(s) in the pump process (memory backend: nothing is shared between processes)"

    def adopt_store(self, store: AsyncStore) -> None:
        """Tasks run in this process: nothing to send through the store."""

    async def start(self) -> None:
        log.info("memory backend: cpu_bound listeners run in %d thread(s) of the pump process; "
                 "use the manager or redis backend for worker processes", self.size)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.size, thread_name_prefix="xp-cpu")

    async def run(self, task: WorkerTask) -> WorkerResult:
        assert self._executor is not None, "start() the pool first"
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(execute_task, self.backend, task,
                                                                            worker="thread"))

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def default_dispatcher(organism: Organism, backend: SharedBackend) -> Dispatcher:
    """Local mode: process_pool.workers processes, or threads on the (unshared) memory backend."""
    pool = organism.process_pool
    if not backend.is_shared:
        return ThreadWorkerPool(backend, workers=pool.workers)
    return LocalWorkerPool(backend, workers=pool.workers, start_method=pool.start_method)
