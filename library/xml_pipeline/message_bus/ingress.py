"""The pump pod's side of distributed mode: the ingress stream feeds a StreamPump, its outputs go to
the egress stream; and `xml-pipeline send`, which writes to ingress and reads egress.

Streams and consumer groups are described in streams.py. How an ingress entry stays safe:
it is acknowledged when its conversation has finished; every live pump sweeps the stream
(XAUTOCLAIM) every claim_idle_seconds / 2 and takes over the entries of dead pumps, and refreshes
the entries of its own running conversations first, so a merely long conversation is never
taken over. A re-run writes to egress only the outputs egress has not seen (see IngressBridge).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import ResponseError

from ..errors import BackendError
from .retry import _REDIS_DOWN, Backoff, transient_reply
from .streams import (
    EGRESS_MAXLEN,
    EGRESS_ONCE,
    PUMP_GROUP,
    Streams,
    _entries,
    _s,
    _xfields,
    consumer_name,
)
from .message import Message, MessageError, derived_id, error_payload, parse_message

if TYPE_CHECKING:
    from ..memory.redis_backend import RedisBackend

log = logging.getLogger(__name__)


# ==================================================================================================
# The pump pod: ingress → StreamPump → egress
# ==================================================================================================
class IngressBridge:
    """Feeds a StreamPump from the ingress stream and writes its outputs to the egress stream.

    An ingress entry is acknowledged (XACK + XDEL) when its conversation has finished, so a pump
    that dies mid-conversation leaves the entry pending; the next pump reclaims it after
    claim_idle_seconds and runs the conversation again (at-least-once processing). Its outputs still
    reach egress once: every message a conversation produces has an id derived from the message it
    answers (message.derived_id), so a re-run produces the same ids, and an output whose id is in the
    conversation's record (`egress:sent:<id>`, removed with the ack) is not written again; its
    context-buffer appends are recognised as repeats by the same ids.
    """

    def __init__(self, backend: RedisBackend, pump: Any, *, consumer: str | None = None,
                 claim_idle_seconds: float = 30.0, max_inflight: int = 256) -> None:
        self.streams = Streams(backend)
        self.backend = backend
        self.pump = pump
        self.consumer = consumer or consumer_name("pump")
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.max_inflight = max_inflight
        self._entries: dict[str, str] = {}  # conversation id -> ingress entry id
        #: conversation id -> its outputs egress did not take (Redis down for longer than its retries)
        self._unwritten: dict[str, list[Message]] = {}
        self._rewrites: set[asyncio.Task[None]] = set()
        self._finishing = False
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._slots: threading.Semaphore = threading.Semaphore(max_inflight)
        #: Ingress slots in use (health: a pump whose slots are all held makes no progress).
        self.held = 0
        self._held_lock = threading.Lock()
        self.last_read = time.monotonic()
        #: The last Redis failure of the ingress reader, None once a read succeeds again.
        self.redis_error: str | None = None
        pump.on_output = self._on_output
        pump.on_done = self._on_done

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        s = self.streams
        await self._loop.run_in_executor(None, s.ensure_group, s.ingress, PUMP_GROUP)
        self._reader = threading.Thread(target=self._read, name="xp-ingress", daemon=True)
        self._reader.start()

    async def stop(self) -> None:
        """Stop reading new messages (in-flight conversations are the pump's to drain)."""
        self._stop.set()
        if self._reader is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._reader.join, 5.0)


    def _read(self) -> None:
        s = self.streams
        backoff = Backoff()
        cursor = "0-0"
        # Sweep for entries of dead pumps at start and then every claim_idle / 2 for as long as this
        # pump runs: a pump restarted quickly after a crash takes over its predecessor's entries as
        # soon as they are claim_idle old, not only those that were old at its start.
        sweep_every = max(0.05, self.claim_idle_ms / 2000)
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    if cursor == "0-0":
                        self._refresh_own()
                    # Entries a dead pump left unacknowledged.
                    resp = s.client.xautoclaim(s.ingress, PUMP_GROUP, self.consumer, self.claim_idle_ms,
                                               start_id=cursor, count=64)
                    cursor = _s(resp[0])
                    entries = [(_s(i), f) for i, f in resp[1] if f]
                    if cursor == "0-0":
                        next_sweep = time.monotonic() + sweep_every
                    if entries:
                        log.warning("pump: took over %d unfinished message(s) of a previous pump", len(entries))
                else:
                    block = max(1, min(s.block_ms, int((next_sweep - time.monotonic()) * 1000)))
                    read = s.client.xreadgroup(PUMP_GROUP, self.consumer, {s.ingress: ">"}, count=64,
                                              block=block)
                    entries = [(_s(i), f) for i, f in _entries(read)]
                backoff.reset()
                self.last_read = time.monotonic()
                self.redis_error = None
            except _REDIS_DOWN as e:
                self.redis_error = f"{type(e).__name__}: {e}"
                self._stop.wait(backoff.retrying(log, f"ingress {s.ingress}", type(e).__name__))
                continue
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    # The stream is gone (expired, or Redis restarted without its data).
                    s.ensure_group(s.ingress, PUMP_GROUP)
                    cursor = "0-0"
                    continue
                if transient_reply(e):  # e.g. the ingress stream moved to another node (resharding)
                    self._stop.wait(backoff.retrying(log, f"ingress {s.ingress}", type(e).__name__))
                    continue
                self.redis_error = f"{type(e).__name__}: {e}"
                log.exception("ingress %s: read failed", s.ingress)
                self._stop.wait(1.0)
                continue
            for entry_id, fields in entries:
                while not self._slots.acquire(timeout=0.5):
                    if self._stop.is_set():
                        return
                assert self._loop is not None
                with self._held_lock:
                    self.held += 1
                asyncio.run_coroutine_threadsafe(self._accept(entry_id, fields), self._loop)

    def _refresh_own(self) -> None:
        """Reset the idle time of the entries of this pump's running conversations (XCLAIM JUSTID
        to itself), so no pump's sweep takes over a conversation that is merely long."""
        own: list[Any] = list(self._entries.values())
        for i in range(0, len(own), 256):
            self.streams.client.xclaim(self.streams.ingress, PUMP_GROUP, self.consumer, 0, own[i:i + 256],
                                       justid=True)

    def pending_entries(self) -> int | None:
        """Ingress entries this pump holds in Redis's pending list (None if Redis does not answer)."""
        s = self.streams
        try:
            rows = s.client.xpending_range(s.ingress, PUMP_GROUP, min="-", max="+", count=self.max_inflight,
                                           consumername=self.consumer)
            return len(rows)
        except ResponseError as e:
            return 0 if "NOGROUP" in str(e) else None  # no group: the stream is gone, and its entries
        except redis.RedisError:
            return None

    async def _accept(self, entry_id: str, fields: dict[Any, Any]) -> None:
        raw = fields.get(b"xml", fields.get("xml", b""))
        try:
            message = parse_message(raw)
        except MessageError as e:
            log.warning("ingress entry %s is not a valid message: %s", entry_id, e)
            reply_id = _s(fields.get(b"id", fields.get("id", entry_id)))
            bad = Message(sender="pump", to="unknown", kind="error",
                          payload=error_payload("pump", "MessageError", str(e)),
                          in_reply_to=reply_id if _valid_id(reply_id) else None, id=derived_id(entry_id, 0))
            await self._write_egress(bad, conversation=entry_id)
            await self._ack(entry_id, conversation=entry_id)
            return
        if self._entries.get(message.id) == entry_id:
            self._release_slot()  # a sweep brought back an entry of a conversation running here
            return
        if message.id in self._entries:
            log.warning("ingress entry %s repeats message id %s, which is in flight; ignored", entry_id, message.id)
            await self._ack(entry_id, conversation=entry_id)
            return
        self._entries[message.id] = entry_id
        try:
            await self.pump.inject(message)
        except Exception as e:  # noqa: BLE001 - e.g. the pump is stopping: leave it pending for the next pump
            log.warning("ingress entry %s not accepted (%s); it stays pending", entry_id, e)
            self._entries.pop(message.id, None)
            self._release_slot()

    async def _on_output(self, message: Message) -> None:
        try:
            await self._write_egress(message, conversation=message.in_reply_to)
        except Exception:
            if message.in_reply_to is not None:
                self._unwritten.setdefault(message.in_reply_to, []).append(message)
            raise


    def _sent_record(self, conversation: str) -> str:
        return self.backend.key("egress", "sent", conversation)

    async def _write_egress(self, message: Message, *, conversation: str | None) -> None:
        """XADD `message` to egress; once per message id within `conversation` (see the class)."""
        s = self.streams
        fields = {"xml": message.to_xml(), "in_reply_to": message.in_reply_to or "", "thread": message.thread or "",
                  "type": message.kind, "from": message.sender, "to": message.to}
        if conversation is None:  # not part of a conversation: nothing to repeat it
            def write() -> None:
                pipe = s.client.pipeline(transaction=True)
                pipe.xadd(s.egress, _xfields(fields), maxlen=EGRESS_MAXLEN, approximate=True)
                s.expire(pipe, s.egress)
                self.backend.execute(lambda _c: pipe.execute(), idempotent=False, what="write egress")
        else:
            args = [message.id, s.ttl or 0, EGRESS_MAXLEN, *(x for kv in fields.items() for x in kv)]
            keys = [s.egress, self._sent_record(conversation)]

            def write() -> None:
                # Retried: HSETNX makes a repeat of a write that happened a no-op.
                if not self.backend.execute(lambda _c: self.backend.run_script(EGRESS_ONCE, keys, args),
                                            idempotent=True, what="write egress"):
                    log.info("output %s of conversation %s was written by an earlier pump; not repeated",
                             message.id, conversation)

        assert self._loop is not None
        await self._loop.run_in_executor(None, write)

    async def _on_done(self, conv_id: str) -> None:
        entry_id = self._entries.pop(conv_id, None)
        if conv_id in self._unwritten:
            # An output never reached egress: no ack. The entry stays pending, a sweep takes it over
            # after claim_idle and the re-run writes what egress lacks -- unless Redis lost the entry
            # with its data (a restart without persistence): then nobody would run it again, so this
            # pump writes the outputs itself once Redis answers (_rewrite).
            outputs = self._unwritten.pop(conv_id)
            log.error("conversation %s: %d output(s) could not be written to %s; its ingress entry stays "
                      "pending and the conversation runs again after claim_idle (if Redis lost the entry, "
                      "this pump writes the outputs once Redis answers)", conv_id, len(outputs), self.streams.egress)
            if entry_id is not None:
                self._release_slot()
                task = asyncio.create_task(self._rewrite(conv_id, entry_id, outputs))
                self._rewrites.add(task)
                task.add_done_callback(self._rewrites.discard)
            return
        if entry_id is not None:
            await self._ack(entry_id, conversation=conv_id)

    async def finish(self, timeout: float) -> int:
        """After the pump drained: give the outputs still waiting for Redis (_rewrite) up to `timeout`
        seconds, retrying at once. Returns how many conversations that leaves without an answer."""
        self._finishing = True
        if self._rewrites:
            await asyncio.wait(list(self._rewrites), timeout=timeout)
        left = len(self._rewrites)
        for task in list(self._rewrites):
            task.cancel()
        if left:
            log.error("%d conversation(s) whose outputs Redis did not take may get no answer: Redis did not "
                      "answer within %.0f s to tell whether their ingress entries survived", left, timeout)
        return left

    async def _rewrite(self, conv_id: str, entry_id: str, outputs: list[Message]) -> None:
        """Once Redis answers: if the conversation's ingress entry is still pending, leave it to the
        sweep; if Redis lost it, write the outputs egress lacks (once per id, as always)."""
        s = self.streams

        def entry_pending() -> bool:
            try:
                return bool(s.client.xpending_range(s.ingress, PUMP_GROUP, min=entry_id, max=entry_id, count=1))
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    return False  # the stream and its group are gone: so is the entry
                raise

        assert self._loop is not None
        delay = 0.5
        while True:
            await asyncio.sleep(0.2 if self._finishing else delay)
            delay = min(delay * 2, 5.0)
            try:
                if await self._loop.run_in_executor(None, entry_pending):
                    return
                for message in outputs:
                    await self._write_egress(message, conversation=conv_id)
                await self._loop.run_in_executor(None, s.client.delete, self._sent_record(conv_id))
            except (redis.RedisError, BackendError):
                continue  # Redis still down: try again
            log.warning("conversation %s: its ingress entry was lost with Redis's data; its %d output(s) "
                        "were written to %s now", conv_id, len(outputs), s.egress)
            return

    async def _ack(self, entry_id: str, *, conversation: str) -> None:
        """XACK + XDEL the ingress entry and forget the conversation's sent-record, in one MULTI."""
        s = self.streams

        def ack() -> None:
            pipe = s.client.pipeline(transaction=True)
            pipe.xack(s.ingress, PUMP_GROUP, entry_id)
            pipe.xdel(s.ingress, entry_id)
            pipe.delete(self._sent_record(conversation))
            pipe.execute()

        assert self._loop is not None
        try:
            await self._loop.run_in_executor(None, ack)
        except redis.RedisError as e:
            log.warning("could not acknowledge ingress entry %s: %s", entry_id, e)
        finally:
            self._release_slot()

    def _release_slot(self) -> None:
        with self._held_lock:
            self.held -= 1
        self._slots.release()


def _valid_id(value: str) -> bool:
    from .message import ID_RE
    return bool(ID_RE.match(value))


# ==================================================================================================
# Clients: `xml-pipeline send`
# ==================================================================================================
def send_message(backend: RedisBackend, message: Message, *, wait: float | None = None) -> Message | None:
    """Put `message` on the ingress stream; with `wait`, block up to that many seconds for the first
    egress output answering it (in-reply-to = message.id). Returns None on timeout or without wait."""
    s = Streams(backend)
    client = s.client
    start_id = "0-0"
    if wait is not None:
        last = client.xrevrange(s.egress, count=1)
        start_id = _s(last[0][0]) if last else "0-0"
    pipe = client.pipeline(transaction=True)
    pipe.xadd(s.ingress, {"xml": message.to_xml(), "id": message.id})
    s.expire(pipe, s.ingress)
    backend.execute(lambda _c: pipe.execute(), idempotent=False, what="send to ingress")
    if wait is None:
        return None
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        resp = client.xread({s.egress: start_id}, count=256, block=max(1, min(s.block_ms, int(left * 1000))))
        for entry_id, fields in _entries(resp):
            start_id = _s(entry_id)
            if _s(fields.get(b"in_reply_to", b"")) == message.id:
                return parse_message(fields[b"xml"])
