"""Talking to a running organism from another process: send a message, wait for its answer, read a thread.

    from xml_pipeline.client import OrganismClient
    from xml_pipeline.message_bus.message import Message

    with OrganismClient() as client:            # XP_* environment, or the mounted Service Binding
        answer = client.request(Message(sender="web", to="greeter", payload="<hello/>"), timeout=10)
        for slot in client.read_thread(answer.thread):
            print(slot.from_id, "->", slot.to_id, slot.payload)

A client needs far less than the pump: it puts messages on the organism's ingress stream, reads its
egress stream, and reads (never writes) the context buffer and the thread registry. On a Redis the
operator provisions, the client's own ACL user (`<organism>-client` Secret) may do exactly that
(`CLIENT_COMMANDS` on `CLIENT_KEYS`); every read here is a plain command (LRANGE, GET, SSCAN,
EXISTS), never a script, so the user needs neither FCALL nor FCALL_RO and cannot write through the
organism's function library. Slots are verified with the signing key before they are unpickled; the
client never signs (it has no write access to the buffer).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .contract import CLIENT_COMMANDS, CLIENT_KEYS
from .errors import BackendUnavailable, ConfigError, CredentialsRejected, XmlPipelineError
from .memory.config import BackendConfig
from .memory.context_buffer import ContextBuffer
from .memory.keys import check_tagged_id
from .memory.slots import BufferSlot
from .message_bus.message import Message

__all__ = ["CLIENT_COMMANDS", "CLIENT_KEYS", "NoAnswer", "OrganismClient"]

class NoAnswer(XmlPipelineError, TimeoutError):
    """No answer to a message arrived within the timeout (the message was sent; it may still be
    answered later)."""

    def __init__(self, message_id: str, timeout: float) -> None:
        self.message_id, self.timeout = message_id, timeout
        super().__init__(f"no answer to message {message_id} within {timeout:g} s")


class OrganismClient:
    """A client of one organism: send messages, wait for answers, read threads (read-only).

    `config`: a redis BackendConfig; None reads the process's configuration the way
    get_shared_backend() does (XP_* environment and XP_CONFIG, else the xml-pipeline binding under
    SERVICE_BINDING_ROOT). `binding`: a binding directory to read instead. The client owns its
    connection pool: close it, or use `with`.

    Configured from a binding (either way), the client re-reads it when Redis refuses the password of
    a new connection, and carries on with the credentials it holds now: a mounted binding Secret is
    updated in place by the kubelet when the operator rotates the client password. Configured from
    the environment, a pod sees a new password only after a restart.
    """

    def __init__(self, config: BackendConfig | None = None, *, binding: str | os.PathLike[str] | None = None) -> None:
        from .memory.factory import configuring_binding, default_config

        if config is not None and binding is not None:
            raise TypeError("give a config or a binding directory, not both")
        if binding is None and config is None:
            binding = configuring_binding()
        #: The binding directory the configuration comes from (re-read when Redis refuses the password).
        self.binding = Path(binding) if binding is not None else None
        if self.binding is not None:
            config = BackendConfig.from_binding(self.binding)
        self._reread_lock = threading.Lock()
        #: Pools replaced after a re-read, closed with the client (other threads may still be using them).
        self._retired: list[Any] = []
        config = default_config() if config is None else config
        if config.backend_type != "redis":
            raise ConfigError("backend.type", f"is {config.backend_type!r}: a client talks to an organism through "
                              "its Redis (set XP_BACKEND_TYPE=redis and XP_REDIS_*, or mount its binding)", ["redis"])
        self._connect(config)

    def _connect(self, config: BackendConfig) -> None:
        from .memory.redis_backend import RedisBackend
        self.config = config
        self._backend = RedisBackend(config)
        self._buffer = ContextBuffer(self._backend)

    def _reread_binding(self, failed_with: Any) -> bool:
        """After Redis refused the password: the binding's credentials, if they changed since they were
        read (a rotation: the kubelet updates a mounted Secret in place), replace the connection pool's.
        True when they did (the call is worth repeating)."""
        if self.binding is None:
            return False
        with self._reread_lock:  # one thread reconnects; the others find the new credentials in place
            try:
                fresh = BackendConfig.from_binding(self.binding)
            except ConfigError:
                return False  # mid-update or broken: the caller reports the authentication failure
            if (fresh.redis_username, fresh.redis_password) == (self.config.redis_username,
                                                                self.config.redis_password):
                return failed_with is not self._backend  # another thread reconnected meanwhile
            self._retired.append(self._backend)
            self._connect(fresh)
            return True

    @property
    def backend(self) -> Any:
        """The RedisBackend underneath (its PING, its key names); the client owns and closes it."""
        return self._backend

    # -- messages -------------------------------------------------------------------------------
    def send(self, message: Message) -> str:
        """Put `message` on the organism's ingress stream; returns its id (answers carry it as
        in-reply-to)."""
        from .message_bus.ingress import send_message
        self._guard("send", lambda: send_message(self._backend, message))
        return message.id

    def request(self, message: Message, timeout: float = 30.0) -> Message:
        """Send `message` and wait up to `timeout` seconds for the first output answering it.
        Raises NoAnswer when none came (the message stays sent)."""
        from .message_bus.ingress import send_message
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            raise ValueError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
        answer = self._guard("request", lambda: send_message(self._backend, message, wait=float(timeout)))
        if answer is None:
            raise NoAnswer(message.id, float(timeout))
        return answer

    # -- threads (read-only) --------------------------------------------------------------------
    def read_thread(self, thread_id: str) -> list[BufferSlot]:
        """The slots of a thread, oldest first, each verified with the signing key ([] for a thread
        that does not exist or has expired)."""
        check_tagged_id(thread_id, "thread_id")
        return self._guard("read_thread", lambda: self._buffer.get_thread_slots(thread_id))

    def thread_of(self, chain: str) -> str | None:
        """The thread id the registry maps call chain `chain` to, or None."""
        return self._guard("thread_of", lambda: self._backend.registry_get_uuid(chain))

    def chain_of(self, thread_id: str) -> str | None:
        """The call chain of a thread id, or None."""
        return self._guard("chain_of", lambda: self._backend.registry_get_chain(thread_id))

    def threads(self) -> list[str]:
        """The ids of the organism's live threads (SSCAN of its index, EXISTS of each buffer).

        Read-only: entries of expired threads are skipped, not removed (the pump's own listing
        prunes them)."""
        return self._guard("threads", lambda: sorted(self._live_threads()))

    def _live_threads(self) -> Iterator[str]:
        client, keys = self._backend.client, self._backend.keys
        candidates = [e.decode("utf-8", "replace")[2:]
                      for e in client.sscan_iter(keys.index(), match=b"t:*", count=1000)]
        for tid in dict.fromkeys(candidates):
            try:
                check_tagged_id(tid, "thread id")
            except ValueError:
                continue
            if client.exists(keys.buffer(tid)):
                yield tid

    # -- plumbing -------------------------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        import redis
        try:
            backend = self._backend
            try:
                return fn()
            except (redis.exceptions.AuthenticationError, CredentialsRejected):
                # A new connection was refused its password: after a rotation, the binding may hold the
                # new one (the command was never sent, so sending it again duplicates nothing).
                if not self._reread_binding(backend):
                    raise
                return fn()
        except (redis.exceptions.AuthenticationError, CredentialsRejected) as e:
            where = f" (binding {self.binding} re-read: no newer password in it)" if self.binding is not None else ""
            raise CredentialsRejected(f"{what}: Redis at {self.config.redacted_url} refused the password of user "
                                      f"{self.config.redis_username or 'default'!r}{where}") from e
        except redis.exceptions.NoPermissionError as e:
            raise PermissionError(f"{what}: the Redis user {self.config.redis_username or 'default'!r} may not do "
                                  f"this ({self._backend.scrub(e)})") from None
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BackendUnavailable(f"{what}: Redis at {self.config.redacted_url}: {type(e).__name__}: "
                                     f"{self._backend.scrub(e)}") from None

    def close(self) -> None:
        for b in [*self._retired, self._backend]:
            b.close()
        self._retired.clear()

    def __enter__(self) -> "OrganismClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OrganismClient({self.config.redacted_url}, prefix={self.config.redis_prefix!r})"
