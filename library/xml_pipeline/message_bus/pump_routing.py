"""Where the pump sends a message: threads for messages from outside, addresses for what handlers return.

A thread is a call chain (thread_registry.py): console calls greeter → "system.<organism>.console.greeter";
a Call extends the chain by the callee, a reply goes back one hop, to the caller, on the pruned
chain's thread. Anything addressed to a name that is not a listener (an external sender such as
"console") is external: the pump's output.
"""
from __future__ import annotations

import logging

from ..organism import ListenerSpec
from .message import Action, Call, Message, MessageError, Reply, derived_id, error_payload
from .pump_registry import PumpRegistry
from .worker_task import new_key

log = logging.getLogger("xml_pipeline.message_bus.stream_pump")

#: A call chain longer than this is a loop (a calls b calls a ...): the call fails with an error.
MAX_CHAIN_HOPS = 32


class Router:
    """Admits external messages and addresses handler results, on the pump's registry."""

    def __init__(self, listeners: dict[str, ListenerSpec], registry: PumpRegistry) -> None:
        self.listeners = listeners
        self.registry = registry

    async def admit(self, message: Message) -> Message:
        """Validate a message from outside and give it its thread. Raises MessageError."""
        if message.to not in self.listeners:
            raise MessageError(f"unknown listener {message.to!r} (listeners: {', '.join(self.listeners)})")
        if message.sender in self.listeners:
            raise MessageError(f"'from' must name the external sender, not a listener ({message.sender!r})")
        return message.with_(thread=await self._external_thread(message))

    async def _external_thread(self, message: Message) -> str:
        reg, sender, target = self.registry, message.sender, message.to
        if message.thread is None:
            # What register_thread(new uuid, sender, target) does, minus its lookup of the brand-new
            # uuid: one cached get_or_create of the conversation's chain.
            return await reg.get_or_create(f"{reg.root_chain}.{sender}.{target}" if reg.root_uuid
                                           else f"{sender}.{target}")
        chain = await reg.lookup(message.thread)
        if chain is None:
            return await reg.register_thread(message.thread, sender, target)
        hops = chain.split(".")
        if hops[-2:] == [sender, target]:
            return message.thread
        if hops[-1] == sender:  # the sender continues on a thread it got a response on
            return await reg.extend_chain(message.thread, target)
        return await reg.register_thread(new_key(), sender, target)

    async def route(self, msg: Message, listener: ListenerSpec, actions: list[Action],
                    error: tuple[str, str] | None) -> list[tuple[Message, bool]]:
        """A handler's actions (or its error) as addressed messages: (message, is_external)."""
        assert msg.thread is not None
        reg = self.registry
        out: list[tuple[Message, bool]] = []
        if error is not None:
            actions = [Reply(error_payload(listener.name, error[0], error[1]))]
            kind = "error"
        else:
            kind = "response"
        for action in actions:
            if isinstance(action, Call):
                chain = await reg.lookup(msg.thread) or ""
                if action.to not in self.listeners:
                    problem = (f"listener {listener.name!r} called {action.to!r}, which is not a listener "
                               f"(listeners: {', '.join(self.listeners)})")
                elif chain.count(".") + 1 >= MAX_CHAIN_HOPS:
                    problem = f"call chain longer than {MAX_CHAIN_HOPS} hops (a loop?): {chain}"
                else:
                    thread = await reg.extend_chain(msg.thread, action.to)
                    out.append((Message(sender=listener.name, to=action.to, payload=action.payload,
                                        thread=thread, in_reply_to=None, id=derived_id(msg.id, len(out))), False))
                    continue
                log.error("%s", problem)
                out.append(await self._reply(msg, listener, error_payload(listener.name, "RoutingError", problem),
                                             "error", derived_id(msg.id, len(out))))
            else:
                out.append(await self._reply(msg, listener, action.payload, kind, derived_id(msg.id, len(out))))
        return out

    async def _reply(self, msg: Message, listener: ListenerSpec, payload: str, kind: str,
                     ident: str) -> tuple[Message, bool]:
        assert msg.thread is not None
        caller, thread = await self.registry.prune_for_response(msg.thread)
        if caller is None or thread is None:
            # Nobody left on the chain (an unknown or expired thread): answer the sender directly.
            caller, thread = msg.sender, msg.thread
        reply = Message(sender=listener.name, to=caller, payload=payload, thread=thread, kind=kind,  # type: ignore[arg-type]
                        in_reply_to=msg.id, id=ident)
        return reply, caller not in self.listeners
