"""StreamPump: the asyncio router of an organism.

Every message is addressed to a listener by name. The pump

1. gives it a thread from the ThreadRegistry (a thread is a call chain: console calls greeter →
   "system.<organism>.console.greeter"; greeter calls primes → "...greeter.primes"; a reply goes
   back one hop, to the caller, on the pruned chain's thread),
2. appends it to the ContextBuffer (every message, including replies and errors),
3. runs the listener's handler: plain listeners in the pump's event loop (write them `async def`
   if they wait on I/O), cpu_bound listeners in a worker through the Shared Backend's data flow
   (worker_task.py: temp keys in, WorkerTask, response key back, temp keys deleted),
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
import concurrent.futures
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, SlotIntegrityError, ThreadFullError
from ..memory.context_buffer import ContextBuffer
from ..memory.protocol import SharedBackend
from ..memory.redis_pipe import RedisPipe, Unsure
from ..organism import ListenerSpec, Organism
from .local_pool import Dispatcher, default_dispatcher
from .message import Action, Call, Message, MessageError, Reply, derived_id, error_payload, normalize_result
from .thread_registry import ThreadRegistry
from .worker_task import (WorkerResult, WorkerTask, new_key, open_response, signed_inputs, take_response,
                          worker_inputs)

log = logging.getLogger(__name__)

#: A call chain longer than this is a loop (a calls b calls a ...): the call fails with an error.
MAX_CHAIN_HOPS = 32
#: Messages one conversation may route (requests, calls, replies) before the pump ends it with a
#: LoopLimit error: a loop whose chain stays short (ping-pong, fan-out) never hits MAX_CHAIN_HOPS.
MAX_CONVERSATION_MESSAGES = 1000
#: Messages with a larger payload take the io-thread path even with a RedisPipe: pickling, signing
#: and sending them would hold up the event loop for milliseconds.
PIPE_MAX_PAYLOAD = 64 * 1024

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


class _RegistryCache:
    """The pump's view of the registry backend, with chain ↔ uuid lookups cached.

    Routing asks for the same few chains over and over ("system.demo.console.greeter"), and a
    mapping, once made, only changes when it expires or is deleted. Cached entries are re-read
    after `max_age` seconds (well inside the backend's TTL, which every append to the thread slides),
    so a pump never routes on a mapping the backend dropped long ago. Everything else is passed
    through to the real backend. Saves up to four round trips per routed message.
    """

    def __init__(self, backend: SharedBackend, max_age: float) -> None:
        self._backend = backend
        self._max_age = max_age
        self._chain_of: dict[str, tuple[str, float]] = {}
        self._uuid_of: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def _remember(self, chain: str, uuid: str) -> None:
        deadline = time.monotonic() + self._max_age
        with self._lock:
            if len(self._uuid_of) > 50_000:  # bounded: forget everything rather than grow forever
                self._uuid_of.clear()
                self._chain_of.clear()
            self._uuid_of[chain] = (uuid, deadline)
            self._chain_of[uuid] = (chain, deadline)

    def _cached(self, table: dict[str, tuple[str, float]], key: str) -> str | None:
        hit = table.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def registry_get_chain(self, uuid: str) -> str | None:
        chain = self._cached(self._chain_of, uuid)
        if chain is None:
            chain = self._backend.registry_get_chain(uuid)
            if chain is not None:
                self._remember(chain, uuid)
        return chain

    def registry_get_uuid(self, chain: str) -> str | None:
        uuid = self._cached(self._uuid_of, chain)
        if uuid is None:
            uuid = self._backend.registry_get_uuid(chain)
            if uuid is not None:
                self._remember(chain, uuid)
        return uuid

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        cached = self._cached(self._uuid_of, chain)
        if cached is not None:
            return cached
        winner = self._backend.registry_get_or_create(chain, uuid)
        self._remember(chain, winner)
        return winner

    def _forget(self) -> None:
        with self._lock:
            self._uuid_of.clear()
            self._chain_of.clear()

    def registry_set(self, chain: str, uuid: str) -> None:
        self._forget()
        self._backend.registry_set(chain, uuid)

    def registry_delete(self, uuid: str) -> bool:
        self._forget()
        return self._backend.registry_delete(uuid)

    def registry_clear(self) -> int:
        self._forget()
        return self._backend.registry_clear()


    def cached_uuid(self, chain: str) -> str | None:
        return self._cached(self._uuid_of, chain)


class _CacheMiss(Exception):
    """A registry step on the event loop needs the backend: redo it in an io thread."""


class _CacheOnly:
    """The registry backend as the event loop sees it: answers from the _RegistryCache only, and
    raises _CacheMiss for anything else (before any side effect), so a step that needs the backend
    is redone in an io thread through the real one."""

    def __init__(self, cache: _RegistryCache) -> None:
        self._cache = cache
        self.is_shared = cache.is_shared

    def __getattr__(self, name: str) -> Any:
        raise _CacheMiss(name)

    def cached_uuid(self, chain: str) -> str:
        uuid = self._cache.cached_uuid(chain)
        if uuid is None:
            raise _CacheMiss(chain)
        return uuid

    def registry_get_or_create(self, chain: str, uuid: str) -> str:
        return self.cached_uuid(chain)

    def registry_get_uuid(self, chain: str) -> str:
        return self.cached_uuid(chain)

    def registry_get_chain(self, uuid: str) -> str:
        chain = self._cache._cached(self._cache._chain_of, uuid)  # noqa: SLF001
        if chain is None:
            raise _CacheMiss(uuid)
        return chain


class _PumpRegistry(ThreadRegistry):
    """ThreadRegistry over a _RegistryCache (or its _CacheOnly view): a cached chain needs no fresh
    candidate uuid (each costs an os.urandom call) before the cache answers."""

    def get_or_create(self, chain: str) -> str:
        cached = getattr(self._backend, "cached_uuid", None)
        hit = cached(chain) if cached is not None else None
        return hit if hit is not None else super().get_or_create(chain)


@dataclass
class PumpStats:
    messages: int = 0
    outputs: int = 0
    errors: int = 0
    worker_tasks: int = 0
    conversations: int = 0
    #: Appends the RedisPipe could not confirm, redone through the blocking backend (see redis_pipe.py).
    redis_fallbacks: int = 0
    #: Conversations the pump ended with its own error (full thread, backend failure, loop bound, ...).
    failed_conversations: int = 0


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
        self.buffer = ContextBuffer(backend)
        ttl = getattr(backend, "ttl", None) or backend.config.ttl
        #: Registry operations go through a small cache (see _RegistryCache).
        cache = _RegistryCache(backend, max_age=min(30.0, (ttl or 60) / 4))
        self.registry = _PumpRegistry(cache)
        #: The same registry seen from the event loop: cache hits only (see _CacheOnly).
        self._loop_registry = _PumpRegistry(_CacheOnly(cache), _root=self.registry._root)  # noqa: SLF001
        #: Redis only: the hot path's commands, group-committed from the event loop.
        self.pipe: RedisPipe | None = RedisPipe.for_backend(backend) if pipelined else None
        self.on_output = on_output
        self.on_done = on_done
        self.keep_outputs = keep_outputs
        self.stats = PumpStats()
        self._listeners = {ls.name: ls for ls in organism.listeners}
        self._concurrency = concurrency
        self.max_conversation_messages = max_conversation_messages
        #: Consumers busy with a message, and when one last finished one (health: is it stuck?).
        self.busy = 0
        self.last_progress = time.monotonic()
        self._io = concurrent.futures.ThreadPoolExecutor(io_threads, thread_name_prefix="xp-pump-io")
        self._io_lock = threading.Lock()
        self._io_done: list[tuple[asyncio.Future[Any], tuple[Any, BaseException | None]]] = []
        self._io_wake_pending = False
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._consumers: list[asyncio.Task[None]] = []
        self._conversations: dict[str, _Conversation] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        self._accepting = False

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> "StreamPump":
        if self._running:
            return self
        await self._run_io(self.registry.initialize_root, self.organism.name)
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
        if self.pipe is not None:
            self.pipe.close()
        self._io.shutdown(wait=False, cancel_futures=True)
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

    def _admit(self, message: Message, reg: ThreadRegistry | None = None) -> Message:
        """(io thread, or the loop with its cache-only registry) Validate an external message and
        register its thread."""
        if message.to not in self._listeners:
            raise MessageError(f"unknown listener {message.to!r} (listeners: {', '.join(self._listeners)})")
        if message.sender in self._listeners:
            raise MessageError(f"'from' must name the external sender, not a listener ({message.sender!r})")
        return message.with_(thread=self._external_thread(message, reg or self.registry))

    def _external_thread(self, message: Message, reg: ThreadRegistry) -> str:
        sender, target = message.sender, message.to
        if message.thread is None:
            # What register_thread(new uuid, sender, target) does, minus its lookup of the brand-new
            # uuid: one cached get_or_create of the conversation's chain.
            new_chain = f"{reg.root_chain}.{sender}.{target}" if reg.root_uuid else f"{sender}.{target}"
            return reg.get_or_create(new_chain)
        chain = reg.lookup(message.thread)
        if chain is None:
            return reg.register_thread(message.thread, sender, target)
        hops = chain.split(".")
        if hops[-2:] == [sender, target]:
            return message.thread
        if hops[-1] == sender:  # the sender continues on a thread it got a response on
            return reg.extend_chain(message.thread, target)
        return reg.register_thread(new_key(), sender, target)

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
        piped = self.pipe is not None and len(msg.payload) <= PIPE_MAX_PAYLOAD
        # Step in: admit, append to the buffer, store the worker's input. Through the pipe in the
        # loop, else one hop to the io threads.
        try:
            if piped:
                msg, keys = await self._step_in_piped(msg, item.admit, listener)
            else:
                msg, keys = await self._run_io(self._step_in, msg, item.admit, listener)
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
        if keys is not None:
            task = WorkerTask(task_id=new_key(), listener=listener.name, handler=listener.handler,
                              payload_key=keys[0], metadata_key=keys[1])
            self.stats.worker_tasks += 1
            assert self.dispatcher is not None
            try:
                result = await self.dispatcher.run(task)
            except BaseException:
                await self._run_io(self.backend.temp_delete, *keys)
                raise
        else:
            actions, error = await self._run_plain(listener, msg)
        # Step out: fetch the worker's response, delete temp keys, route, append outputs.
        if piped:
            outgoing = await self._step_out_piped(msg, listener, actions, error, result, keys, item.conversation)
        else:
            outgoing = await self._run_io(self._step_out, msg, listener, actions, error, result, keys,
                                          item.conversation)
        for out, external in outgoing:
            if out.kind == "error":
                self.stats.errors += 1
            if external:
                await self._emit(item, out)
            else:
                self._forward(item, out)

    def _step_in(self, msg: Message, admit: bool, listener: ListenerSpec | None) -> tuple[Message, tuple[str, str] | None]:
        if admit:
            msg = self._admit(msg)
        assert listener is not None
        assert msg.thread is not None
        if not listener.cpu_bound:
            self._append(msg)
            return msg, None
        # The message's slot and the worker's inputs go to the backend together (one round trip on
        # the manager and redis backends): append first, so a full thread stores no inputs.
        inputs = worker_inputs(self.backend, msg)  # a large payload: a reference to the slot
        self.buffer.append_and_put(msg.thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id,
                                   temps=inputs.items)
        return msg, inputs.keys

    def _step_out(self, msg: Message, listener: ListenerSpec, actions: list[Action] | None,
                  error: tuple[str, str] | None, result: WorkerResult | None, keys: tuple[str, str] | None,
                  conversation: str) -> list[tuple[Message, bool]]:
        if result is not None and keys is not None:
            actions, error = self._collect(result, keys)
        routed = self._route(msg, listener, actions or [], error)
        out: list[tuple[Message, bool]] = []
        for m, external in routed:
            if external:
                # Outputs to the outside answer the conversation's first message.
                m = m.with_(in_reply_to=conversation)
                self._append(m)
            out.append((m, external))
        return out

    # -- the same steps in the event loop, Redis commands through the pipe ----------------------------
    async def _step_in_piped(self, msg: Message, admit: bool,
                             listener: ListenerSpec | None) -> tuple[Message, tuple[str, str] | None]:
        """_step_in without the io thread. Registry lookups come from the cache; a miss redoes the
        whole step in an io thread (nothing was written yet). The append (with the worker's inputs)
        goes through the pipe; any answer but a stored slot redoes it through the blocking backend,
        whose retries and errors (ThreadFullError, ...) are the io-thread path's."""
        if admit:
            try:
                msg = self._admit(msg, self._loop_registry)
            except _CacheMiss:
                return await self._run_io(self._step_in, msg, admit, listener)
        assert listener is not None
        assert msg.thread is not None
        if not listener.cpu_bound:
            await self._append_piped(msg)
            return msg, None
        keys, values = signed_inputs(self.backend, msg)
        await self._append_piped(msg, values)
        return msg, keys

    async def _append_piped(self, msg: Message, temps: list[tuple[str, bytes]] | None = None) -> None:
        assert msg.thread is not None and self.pipe is not None
        thread, pipe, items = msg.thread, self.pipe, temps or []
        prepared = self.buffer.prepare(thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)
        try:
            await self.buffer.store_async(prepared, lambda index, blob: pipe.append_at(
                thread, blob, index, max_slots=self.buffer.max_slots_per_thread, append_id=msg.id, items=items))
        except Unsure as e:
            self.stats.redis_fallbacks += 1
            log.debug("append of message %s through the pipe unconfirmed (%s); redone by the backend", msg.id, e)
            # The same prepared slot: a repeat of an append the pipe did store is recognised as one.
            await self._run_io(self.buffer.store, prepared, items)

    async def _step_out_piped(self, msg: Message, listener: ListenerSpec, actions: list[Action] | None,
                              error: tuple[str, str] | None, result: WorkerResult | None,
                              keys: tuple[str, str] | None, conversation: str) -> list[tuple[Message, bool]]:
        """_step_out without the io thread (routing from the cache; a miss routes in an io thread)."""
        if result is not None and keys is not None:
            actions, error = await self._collect_piped(result, keys)
        try:
            routed = self._route(msg, listener, actions or [], error, self._loop_registry)
        except _CacheMiss:
            routed = await self._run_io(self._route, msg, listener, actions or [], error)
        out: list[tuple[Message, bool]] = []
        for m, external in routed:
            if external:
                m = m.with_(in_reply_to=conversation)
                await self._append_piped(m)
            out.append((m, external))
        return out

    async def _collect_piped(self, result: WorkerResult,
                             keys: tuple[str, str]) -> tuple[list[Action] | None, tuple[str, str] | None]:
        """_collect through the pipe: the same outcomes for the same failures."""
        assert self.pipe is not None
        try:
            if not result.ok or result.response_key is None:
                await self.pipe.delete(*keys)
                return None, (result.error_type or "WorkerError", result.error or "unknown error")
            blob = await self.pipe.take(result.response_key, *keys)
        except BackendError as e:
            # As _collect: the temp keys expire with the TTL anyway.
            log.error("task %s: cannot collect the response: %s", result.task_id, e)
            return None, ("BackendError", f"{type(e).__name__}: {e}")
        response_key = result.response_key
        return self._response_outcome(result, lambda: open_response(self.backend, blob, response_key))

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

    async def _run_plain(self, listener: ListenerSpec, msg: Message) -> tuple[list[Action] | None, tuple[str, str] | None]:
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

    # -- blocking steps (run in the io threads: backends do network round trips) -------------------------
    async def _run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._io.submit(self._io_work, fut, fn, args)
        return await fut

    def _io_work(self, fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """(io thread) Run one blocking step and hand its outcome to the loop. Outcomes finished
        while the loop has not yet collected the earlier ones share its wake-up (one
        call_soon_threadsafe, i.e. one self-pipe write, per batch instead of per step)."""
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the awaiting task
            outcome = (None, e)
        with self._io_lock:
            self._io_done.append((fut, outcome))
            if self._io_wake_pending:
                return
            self._io_wake_pending = True
        try:
            fut.get_loop().call_soon_threadsafe(self._io_collect)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _io_collect(self) -> None:
        with self._io_lock:
            done, self._io_done = self._io_done, []
            self._io_wake_pending = False
        for fut, (value, error) in done:
            if fut.cancelled():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    def _append(self, msg: Message) -> None:
        assert msg.thread is not None
        self.buffer.append(msg.thread, msg, msg.sender, msg.to, own_name=msg.to, append_id=msg.id)

    @staticmethod
    def _response_outcome(result: WorkerResult, read: Callable[[], list[Action]]
                          ) -> tuple[list[Action] | None, tuple[str, str] | None]:
        """(actions, None) from `read()`, or (None, error) for a response that fails its integrity
        check or cannot be decoded. Backend errors propagate (each caller reports them)."""
        try:
            return read(), None
        except SlotIntegrityError as e:
            log.error("task %s: the response failed its integrity check: %s", result.task_id, e)
            return None, ("IntegrityError", f"SlotIntegrityError: {e}")
        except (LookupError, MessageError, ValueError) as e:
            log.error("task %s: cannot read the response: %s", result.task_id, e)
            return None, ("MissingData", f"{type(e).__name__}: {e}")

    def _collect(self, result: WorkerResult, keys: tuple[str, str]) -> tuple[list[Action] | None, tuple[str, str] | None]:
        """Fetch the worker's response, and delete every temp key of the task."""
        try:
            if not result.ok or result.response_key is None:
                self.backend.temp_delete(*keys)
                return None, (result.error_type or "WorkerError", result.error or "unknown error")
            response_key = result.response_key
            return self._response_outcome(result, lambda: take_response(self.backend, response_key, list(keys)))
        except BackendError as e:
            # Could not reach the backend to collect: the temp keys expire with the TTL anyway.
            log.error("task %s: cannot collect the response: %s", result.task_id, e)
            return None, ("BackendError", f"{type(e).__name__}: {e}")

    def _route(self, msg: Message, listener: ListenerSpec, actions: list[Action],
               error: tuple[str, str] | None, reg: ThreadRegistry | None = None) -> list[tuple[Message, bool]]:
        """(io thread, or the loop with its cache-only registry) Turn a handler's actions into
        addressed messages: (message, is_external). Logs only once routing is done, so a cache miss
        that sends the routing to an io thread never logs a problem twice."""
        assert msg.thread is not None
        reg = reg or self.registry
        out: list[tuple[Message, bool]] = []
        problems: list[str] = []
        if error is not None:
            actions = [Reply(error_payload(listener.name, error[0], error[1]))]
            kind = "error"
        else:
            kind = "response"
        for action in actions:
            if isinstance(action, Call):
                chain = reg.lookup(msg.thread) or ""
                if action.to not in self._listeners:
                    problem = (f"listener {listener.name!r} called {action.to!r}, which is not a listener "
                               f"(listeners: {', '.join(self._listeners)})")
                elif chain.count(".") + 1 >= MAX_CHAIN_HOPS:
                    problem = f"call chain longer than {MAX_CHAIN_HOPS} hops (a loop?): {chain}"
                else:
                    thread = reg.extend_chain(msg.thread, action.to)
                    out.append((Message(sender=listener.name, to=action.to, payload=action.payload,
                                        thread=thread, in_reply_to=None, id=derived_id(msg.id, len(out))), False))
                    continue
                problems.append(problem)
                out.append(self._reply(msg, listener, error_payload(listener.name, "RoutingError", problem), "error",
                                       reg, derived_id(msg.id, len(out))))
            else:
                out.append(self._reply(msg, listener, action.payload, kind, reg, derived_id(msg.id, len(out))))
        for problem in problems:
            log.error("%s", problem)
        return out

    def _reply(self, msg: Message, listener: ListenerSpec, payload: str, kind: str,
               reg: ThreadRegistry, ident: str) -> tuple[Message, bool]:
        assert msg.thread is not None
        caller, thread = reg.prune_for_response(msg.thread)
        if caller is None or thread is None:
            # Nobody left on the chain (an unknown or expired thread): answer the sender directly.
            caller, thread = msg.sender, msg.thread
        reply = Message(sender=listener.name, to=caller, payload=payload, thread=thread, kind=kind,  # type: ignore[arg-type]
                        in_reply_to=msg.id, id=ident)
        return reply, caller not in self._listeners


def _log_task_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("pump: callback failed: %r", task.exception())


async def run_messages(pump: StreamPump, messages: list[Message], *,
                       on_progress: Callable[[int, int], None] | None = None,
                       window: int = 256) -> float:
    """Inject `messages` (at most `window` conversations in flight at once) and wait for all of them.

    Returns the elapsed seconds. `on_progress(done, total)` is called as conversations finish.
    """
    start = time.perf_counter()
    total = len(messages)
    done = 0
    slots = asyncio.Semaphore(window)
    finished = asyncio.Event()
    if total == 0:
        return 0.0
    previous = pump.on_done

    def _done(conv_id: str) -> Any:
        nonlocal done
        done += 1
        slots.release()
        if on_progress is not None:
            on_progress(done, total)
        if done >= total:
            finished.set()
        return previous(conv_id) if previous is not None else None

    pump.on_done = _done
    try:
        for m in messages:
            await slots.acquire()
            await pump.inject(m)
        await finished.wait()
    finally:
        pump.on_done = previous
    return time.perf_counter() - start
