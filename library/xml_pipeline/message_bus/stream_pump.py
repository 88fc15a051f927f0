"""StreamPump: the asyncio router of an organism.

Every message is addressed to a listener by name. The pump

1. gives it a thread from the ThreadRegistry (a thread is a call chain: console calls greeter →
   "system.<organism>.console.greeter"; greeter calls primes → "...greeter.primes"; a reply goes
   back one hop, to the caller, on the pruned chain's thread),
2. appends it to the ContextBuffer (every message, including replies and errors),
3. runs the listener's handler: plain listeners in the pump's event loop (write them `async def`
   if they wait on I/O), cpu_bound listeners in a worker (worker_task.py): the task carries the
   message and the result the response — over a local worker's own pipe, or sealed (signed for
   the task) in the stream entries of a worker pod (task_seal.py),
4. routes what the handler returned: a reply to the caller, a Call to another listener, and
   anything addressed to a name that is not a listener (an external sender such as "console") to
   the pump's output (`on_output`: the CLI prints it, a pod writes it to its egress stream).

A handler that raises, a worker that dies, or a call to an unknown listener becomes an error
response (type="error") sent back along the chain, plus a log line. The pump keeps running.

Every conversation ends in an answer or an error response to its sender (docs/reliability.md): a
step that fails outside any handler (a full thread, a backend that refuses or loses a write), a
conversation that routes more than `max_conversation_messages` messages (a loop that keeps its
chain short: ping-pong, fan-out), and a conversation that finished without any output all end in
one error response from the pump, after which nothing more of that conversation is routed.

Conversations: everything caused by one injected message belongs to its conversation. An output
reaching the external sender carries `in-reply-to` = the id of the message that started the
conversation (threads are shared by every conversation on the same chain, message ids are not),
and `on_done(request_id)` fires once the conversation has nothing left in flight.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, ThreadFullError
from ..memory.async_store import RedisStore, open_store
from ..memory.context_buffer import ContextBuffer, PreparedAppend
from ..memory.protocol import SharedBackend
from ..memory.redis_cluster_pipe import ClusterPipe
from ..memory.redis_pipe import RedisPipe
from ..memory.slots import BufferSlot
from ..memory.store import INLINE_MAX_BYTES, AsyncStore
from ..organism import ListenerSpec, Organism
from .local_pool import Dispatcher, default_dispatcher
from .message import Action, Message, MessageError, derived_id, error_payload, normalize_result
from .pump_registry import PumpRegistry
from .pump_feed import run_messages
from .pump_outcome import Outcome, carried
from .pump_routing import MAX_CHAIN_HOPS, Router
from .thread_registry import ThreadRegistry
from .worker_task import WorkerResult, WorkerTask, new_key

log = logging.getLogger(__name__)

__all__ = ["StreamPump", "PumpStats", "run_messages", "MAX_CHAIN_HOPS", "MAX_CONVERSATION_MESSAGES"]

#: Messages one conversation may route (requests, calls, replies) before the pump ends it with a
#: LoopLimit error: a loop whose chain stays short (ping-pong, fan-out) never hits MAX_CHAIN_HOPS.
MAX_CONVERSATION_MESSAGES = 1000

OutputCallback = Callable[[Message], Awaitable[None] | None]
DoneCallback = Callable[[str], Awaitable[None] | None]


@dataclass(eq=False)
class _Conversation:
    request: Message
    inflight: int = 0
    outputs: list[Message] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    #: Outputs sent to the outside (kept even when `outputs` is not).
    answered: int = 0
    #: Messages routed so far (the loop bound counts these).
    routed: int = 0
    #: The pump ended it with an error: nothing more of it is routed or sent.
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Item:
    message: Message
    conversation: str  # id of the message that started it
    admit: bool = False  # from outside: validate it and give it a thread first


@dataclass
class PumpStats:
    messages: int = 0
    outputs: int = 0
    errors: int = 0
    worker_tasks: int = 0
    conversations: int = 0
    #: Conversations the pump ended with its own error (full thread, backend failure, loop bound, ...).
    failed_conversations: int = 0
    #: The pump's store (its fallbacks are `redis_fallbacks`).
    store: AsyncStore | None = field(default=None, repr=False, compare=False)

    @property
    def redis_fallbacks(self) -> int:
        """Appends the RedisPipe could not confirm, redone through the blocking backend (async_store.py)."""
        return self.store.fallbacks if self.store is not None else 0


class StreamPump:
    """Routes an organism's messages. Use `async with StreamPump(...) as pump:` or start()/stop()."""

    def __init__(self, organism: Organism, backend: SharedBackend | None = None, *,
                 dispatcher: Dispatcher | None = None, on_output: OutputCallback | None = None,
                 on_done: DoneCallback | None = None, concurrency: int = 64, io_threads: int = 8,
                 keep_outputs: bool = True, pipelined: bool = True,
                 max_conversation_messages: int = MAX_CONVERSATION_MESSAGES) -> None:
        """`backend=None`: the organism's configured backend (created here, closed by stop()).
        `dispatcher=None` with cpu_bound listeners: a local pool of process_pool.workers processes
        (threads on the memory backend). Pods pass a RedisDispatcher instead.
        `io_threads`: the store's threads for blocking backend calls.
        `pipelined`: on a Redis backend, the hot path's Redis commands go through a RedisPipe in the
        event loop (group commit); False keeps every step in the io threads.
        `max_conversation_messages`: the loop bound (see MAX_CONVERSATION_MESSAGES)."""
        self.organism = organism
        self._owns_backend = backend is None
        if backend is None:
            from ..memory.factory import create_backend
            backend = create_backend(organism.backend)
        self.backend = backend
        if dispatcher is None and organism.has_cpu_bound:
            dispatcher = default_dispatcher(organism, backend)
        self.dispatcher = dispatcher
        #: Every backend operation of the hot path, awaited (store.py).
        self.store = open_store(backend, io_threads, pipelined=pipelined)
        if dispatcher is not None:
            dispatcher.adopt_store(self.store)
        self.buffer = ContextBuffer(backend)
        #: The blocking registry (for callers outside the loop; its root is the routing registry's).
        self.registry = ThreadRegistry(backend)
        ttl = backend.config.ttl
        #: Routing's registry: cached lookups, misses through the store (pump_registry.py).
        self.routes = PumpRegistry(self.registry, self.store, max_age=min(30.0, (ttl or 60) / 4))
        self._listeners = {ls.name: ls for ls in organism.listeners}
        self._router = Router(self._listeners, self.routes)
        self.on_output = on_output
        self.on_done = on_done
        self.keep_outputs = keep_outputs
        self.stats = PumpStats(store=self.store)
        self._concurrency = concurrency
        self.max_conversation_messages = max_conversation_messages
        #: Consumers busy with a message, and when one last finished one (health: is it stuck?).
        self.busy = 0
        self.last_progress = time.monotonic()
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._consumers: list[asyncio.Task[None]] = []
        self._conversations: dict[str, _Conversation] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        self._accepting = False

    @property
    def pipe(self) -> RedisPipe | ClusterPipe | None:
        """The store's group-commit connection (Redis with a pipe-capable URL), or None."""
        return self.store.pipe if isinstance(self.store, RedisStore) else None

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> "StreamPump":
        if self._running:
            return self
        await self.store.run(self.registry.initialize_root, self.organism.name)
        if self.dispatcher is not None:
            await self.dispatcher.start()
        self._consumers = [asyncio.create_task(self._consume(), name=f"xp-pump-{i}")
                           for i in range(self._concurrency)]
        self._running = self._accepting = True
        return self

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting messages, let in-flight conversations finish (up to `timeout` seconds),
        then stop the consumers and the dispatcher. Returns False if the drain timed out."""
        self._accepting = False
        drained = True
        if drain and self._running:
            drained = await self.join(timeout)
        for _ in self._consumers:
            self._queue.put_nowait(None)
        for task in self._consumers:
            if not drained:
                task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        self._running = False
        self.store.close()
        if self._owns_backend:
            self.backend.close()
        return drained

    async def __aenter__(self) -> "StreamPump":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def join(self, timeout: float | None = None) -> bool:
        """Wait until no conversation is in flight. False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def concurrency(self) -> int:
        """Messages the pump routes at once (its consumers)."""
        return self._concurrency

    @property
    def inflight(self) -> int:
        return len(self._conversations)

    # -- feeding messages in ----------------------------------------------------------------------------
    async def inject(self, message: Message) -> str:
        """Accept a message from outside the organism; return its conversation id (= message.id).

        Problems with the message itself (unknown listener, a sender named like a listener) become
        an error output for that conversation, not an exception: a bad message must not stop a pump.
        """
        await self._start_conversation(message)
        return message.id

    async def request(self, message: Message, timeout: float | None = None) -> list[Message]:
        """Inject a message and wait for its conversation to finish; return its outputs."""
        conv = await self._start_conversation(message)
        await asyncio.wait_for(conv.done.wait(), timeout)
        return list(conv.outputs)

    async def _start_conversation(self, message: Message) -> _Conversation:
        if not self._accepting:
            raise RuntimeError("the pump is not accepting messages (not started, or stopping)")
        if message.id in self._conversations:
            raise MessageError(f"a conversation with message id {message.id!r} is already in flight")
        conv = _Conversation(request=message, inflight=1)
        self._conversations[message.id] = conv
        self._idle.clear()
        self.stats.conversations += 1
        self._queue.put_nowait(_Item(message, message.id, admit=True))
        return conv

    # -- the routing loop ---------------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            self.busy += 1
            try:
                conv = self._conversations.get(item.conversation)
                if conv is not None and conv.failed:
                    continue  # the pump already answered this conversation with its error
                if conv is not None:
                    conv.routed += 1
                    if conv.routed > self.max_conversation_messages:
                        await self._fail(item, "LoopLimit",
                                         f"the conversation routed more than {self.max_conversation_messages} "
                                         f"messages (a loop between listeners?); last one: {item.message.sender!r} "
                                         f"to {item.message.to!r}; the bound is the pump's max_conversation_messages")
                        continue
                await self._process(item)
            except ThreadFullError as e:
                await self._fail(item, "ThreadFull", self._thread_full_text(item.message, e))
            except BackendError as e:
                await self._fail(item, "BackendError", f"the shared backend failed while routing message "
                                 f"{item.message.id} to {item.message.to!r}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - one message must never stop the pump
                log.exception("pump: unexpected failure while routing message %s to %r (thread %s)",
                              item.message.id, item.message.to, item.message.thread)
                await self._fail(item, "PumpError", f"routing message {item.message.id} to {item.message.to!r} "
                                 f"failed: {type(e).__name__}: {e}")
            finally:
                try:
                    conv = self._conversations.get(item.conversation)
                    if conv is not None and conv.inflight == 1 and not conv.answered and not conv.failed:
                        # The last message of a conversation that reached nobody outside: say so, once.
                        await self._fail(item, "NoResponse", f"the conversation to {conv.request.to!r} ended "
                                         "without a response (the listeners on its way returned nothing)")
                finally:
                    self.busy -= 1
                    self.last_progress = time.monotonic()
                    self._finish(item.conversation)

    def _thread_full_text(self, msg: Message, e: ThreadFullError) -> str:
        return (f"thread {e.thread_id} is full ({e.limit} messages, the context buffer's max_slots_per_thread): "
                f"every message from one sender to one listener shares one thread, so {msg.sender!r} → "
                f"{msg.to!r} takes messages again once that thread's slots expire (the backend's TTL) or "
                "are cleared (xml-pipeline backend clear)")

    async def _fail(self, item: _Item, error_type: str, detail: str) -> None:
        """End the conversation of `item` with one error response from the pump to its sender;
        whatever of it is still in flight is dropped unrouted."""
        conv = self._conversations.get(item.conversation)
        if conv is not None and conv.failed:
            return
        log.error("pump: conversation %s ends in an error (%s): %s", item.conversation, error_type, detail)
        self.stats.failed_conversations += 1
        self.stats.errors += 1
        request = conv.request if conv is not None else item.message
        error = Message(sender="pump", to=request.sender, kind="error", thread=request.thread,
                        payload=error_payload(item.message.to, error_type, detail),
                        in_reply_to=item.conversation, id=derived_id(item.conversation, 1_000_000))
        await self._emit(item, error)
        if conv is not None:
            conv.failed = True

    def _finish(self, conv_id: str) -> None:
        conv = self._conversations.get(conv_id)
        if conv is None:
            return
        conv.inflight -= 1
        if conv.inflight > 0:
            return
        del self._conversations[conv_id]
        conv.done.set()
        if not self.keep_outputs:
            conv.outputs.clear()
        if not self._conversations:
            self._idle.set()
        if self.on_done is not None:
            self._call_back(self.on_done, conv_id)

    def _call_back(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = fn(arg)
        except Exception:  # noqa: BLE001
            log.exception("pump: callback %r failed", fn)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(_log_task_error)

    async def _process(self, item: _Item) -> None:
        msg = item.message
        listener = self._listeners.get(msg.to)
        try:
            msg, index = await self._step_in(msg, item.admit)
        except MessageError as e:
            log.warning("rejected message %s from %r to %r: %s", msg.id, msg.sender, msg.to, e)
            await self._emit(item, Message(sender="pump", to=msg.sender, kind="error", thread=msg.thread,
                                           payload=error_payload(msg.to, "MessageError", str(e)),
                                           id=derived_id(msg.id, 0)))
            return
        assert listener is not None
        self.stats.messages += 1
        result: WorkerResult | None = None
        actions: list[Action] | None = None
        error: tuple[str, str] | None = None
        if listener.cpu_bound:
            task = WorkerTask(new_key(), listener.name, listener.handler, "", "", message=msg, slot_index=index)
            self.stats.worker_tasks += 1
            assert self.dispatcher is not None
            result = await self.dispatcher.run(task)
        else:
            actions, error = await self._run_plain(listener, msg)
        for out, external in await self._step_out(msg, listener, actions, error, result, item.conversation):
            if out.kind == "error":
                self.stats.errors += 1
            if external:
                await self._emit(item, out)
            else:
                self._forward(item, out)

    # -- the steps of one message: in (admit, append), run, out -------------------------------------
    async def _step_in(self, msg: Message, admit: bool) -> tuple[Message, int]:
        """Admit (a message from outside), then append to the buffer. Returns the message (with its
        thread) and the index its slot landed at (a worker pod reads a large payload from there)."""
        if admit:
            msg = await self._router.admit(msg)
        return msg, (await self._append(msg)).index

    async def _append(self, msg: Message) -> BufferSlot:
        if len(msg.payload) > INLINE_MAX_BYTES:  # pickling it would hold up the loop
            prepared = await self.store.run(self._prepare, msg)
        else:
            prepared = self._prepare(msg)
        return await self.store.append(self.buffer, prepared)

    def _prepare(self, msg: Message) -> PreparedAppend:
        assert msg.thread is not None
        return self.buffer.prepare(msg.thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)

    async def _step_out(self, msg: Message, listener: ListenerSpec, actions: list[Action] | None,
                        error: tuple[str, str] | None, result: WorkerResult | None,
                        conversation: str) -> list[tuple[Message, bool]]:
        """Take the worker's response, route what the handler returned, and append the outputs to
        the outside (each answers the conversation's first message)."""
        if result is not None:
            actions, error = await carried(self.store, result)
        out: list[tuple[Message, bool]] = []
        for m, external in await self._router.route(msg, listener, actions or [], error):
            if external:
                m = m.with_(in_reply_to=conversation)
                await self._append(m)
            out.append((m, external))
        return out

    def _forward(self, item: _Item, out: Message) -> None:
        conv = self._conversations.get(item.conversation)
        if conv is not None:
            conv.inflight += 1
        self._queue.put_nowait(_Item(out, item.conversation))

    async def _emit(self, item: _Item, out: Message) -> None:
        conv = self._conversations.get(item.conversation)
        if conv is not None and conv.failed:
            return  # answered already by the pump's error
        if out.in_reply_to != item.conversation:
            out = out.with_(in_reply_to=item.conversation)
        self.stats.outputs += 1
        if conv is not None:
            conv.answered += 1
            if self.keep_outputs:
                conv.outputs.append(out)
        if self.on_output is not None:
            try:
                result = self.on_output(out)
                if inspect.isawaitable(result):
                    await result
            except BackendError as e:  # the store is down: its message says all (no traceback per output)
                log.error("pump: on_output failed for message %s: %s: %s", out.id, type(e).__name__, e)
            except Exception:  # noqa: BLE001
                log.exception("pump: on_output failed for message %s", out.id)

    async def _run_plain(self, listener: ListenerSpec, msg: Message) -> Outcome:
        assert listener.func is not None, f"listener {listener.name} was loaded without its handler"
        try:
            result = listener.func(msg)
            if inspect.isawaitable(result):
                result = await result
            return normalize_result(result), None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the handler's failure (even sys.exit) is an error response
            log.error("listener %s (handler %s) raised on thread %s: %s: %s", listener.name, listener.handler,
                      msg.thread, type(e).__name__, e)
            log.debug("traceback of the failure above", exc_info=True)
            return None, ("HandlerError", f"{type(e).__name__}: {e}")


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pump: callback failed: %r", task.exception())
