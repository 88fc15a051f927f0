"""What handlers return: Reply and Call, normalized and checked, and their JSON form for workers.

A handler returns None, an XML fragment (str/bytes), an Element, a Reply, a Call, or a list of
them; `normalize_result` turns that into Actions whose payloads are checked fragments, so a message
the pump emits always parses. A worker sends its actions to the pump as JSON (`actions_to_json`),
never as pickle: the pump decodes them with `actions_from_json`, which accepts nothing else.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from xml.etree.ElementTree import Element, tostring

from .safe_xml import NAME_RE, MessageError, check_fragment


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the caller: the message goes back one hop along the call chain."""

    payload: str


@dataclass(frozen=True, slots=True)
class Call:
    """Call another listener: the call chain grows by one hop ("a" calls "b" → "a.b")."""

    to: str
    payload: str


Action = Reply | Call
#: What a handler returns (normalize_result turns it into Actions): None (no reply), an XML fragment
#: (str/bytes), an Element, a Reply, a Call, or a list of them.
HandlerResult = None | str | bytes | Element | Reply | Call | Sequence["str | bytes | Element | Reply | Call"]


def normalize_result(result: object) -> list[Action]:
    """Turn whatever a handler returned into a list of Reply/Call with checked payloads.

    None → nothing; str/bytes/Element → a Reply; Reply/Call or a list of them as given. Every payload
    must be a well-formed XML fragment (raises MessageError otherwise), so a message the pump emits
    always parses.
    """
    if result is None:
        return []
    items: Iterable[object]
    if isinstance(result, (list, tuple)):
        items = result
    else:
        items = (result,)
    out: list[Action] = []
    for item in items:
        if isinstance(item, Reply):
            out.append(Reply(_as_fragment(item.payload)))
        elif isinstance(item, Call):
            if not isinstance(item.to, str) or not NAME_RE.match(item.to):
                raise MessageError(f"Call.to must be a listener name, got {item.to!r}")
            out.append(Call(item.to, _as_fragment(item.payload)))
        elif isinstance(item, (str, bytes, Element)):
            out.append(Reply(_as_fragment(item)))
        else:
            raise MessageError(
                f"a handler returned {type(item).__name__}; allowed: None, str (XML fragment), "
                "an Element, Reply, Call, or a list of Reply/Call")
    return out


def actions_to_json(actions: Sequence[Action]) -> list[dict[str, str]]:
    return [{"op": "reply", "payload": a.payload} if isinstance(a, Reply)
            else {"op": "call", "to": a.to, "payload": a.payload} for a in actions]


def actions_from_json(data: object) -> list[Action]:
    if not isinstance(data, list):
        raise MessageError("worker response is not a list of actions")
    out: list[Action] = []
    for d in data:
        if not isinstance(d, dict) or not isinstance(d.get("payload"), str):
            raise MessageError("worker response holds a malformed action")
        if d.get("op") == "reply":
            out.append(Reply(d["payload"]))
        elif d.get("op") == "call" and isinstance(d.get("to"), str):
            out.append(Call(d["to"], d["payload"]))
        else:
            raise MessageError(f"worker response holds an unknown action {d.get('op')!r}")
    return out


def _as_fragment(value: object) -> str:
    """A handler's payload as a checked fragment (an Element serialized, bytes decoded as UTF-8)."""
    if isinstance(value, Element):
        return tostring(value, encoding="unicode")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError("payload bytes are not UTF-8") from None
    if not isinstance(value, str):
        raise MessageError(f"payload must be an XML fragment (str), got {type(value).__name__}")
    return check_fragment(value)


