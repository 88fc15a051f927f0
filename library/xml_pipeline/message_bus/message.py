"""The XML envelope an organism exchanges: `Message`, its ids, and the envelope parsed safely.

    <message xmlns="https://xml-pipeline.dev/v1" id="..." from="console" to="greeter"
             thread="..." type="request" in-reply-to="...">
      <payload><greet name="Ada"/></payload>
    </message>

Messages come from outside (files, stdin, the ingress stream of a pod), so parsing treats them as
untrusted (safe_xml.py: defusedxml with DTDs forbidden, bounded depth), with a size limit, and an
error that says what is wrong.

The payload is an XML *fragment* (text and/or elements) carried verbatim: the pump never rebuilds it,
so a 1 MB payload costs one scan, not a tree. A fragment stands alone: namespace prefixes used inside
it must be declared inside it.

What handlers return lives in actions.py, the XML safety rules in safe_xml.py; both are imported
here too, so `message` keeps naming everything of the message API in one place.
"""
from __future__ import annotations

import copyreg
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import quoteattr

from defusedxml import DefusedXmlException

# The message API in one place: what handlers return, and the XML safety rules (re-exported).
from .actions import (  # noqa: F401
    Action,
    Call,
    HandlerResult,
    Reply,
    actions_from_json,
    actions_to_json,
    normalize_result,
)
from .safe_xml import (  # noqa: F401
    ID_RE,
    MAX_XML_DEPTH,
    NAME_RE,
    MessageError,
    check_encoding,
    check_fragment,
    error_payload,
    explain,
    fragment_tree,
    parser,
    text_payload,
)

__all__ = ["Action", "Call", "HandlerResult", "ID_RE", "KINDS", "MAX_MESSAGE_BYTES", "MAX_XML_DEPTH", "Message",
           "MessageError", "MessageKind", "NAME_RE", "NS", "Reply", "actions_from_json", "actions_to_json",
           "check_fragment", "derived_id", "error_payload", "new_id", "normalize_result", "parse_message",
           "split_messages", "text_payload"]

#: What pickle's default form of a class instance unpickles through (subclasses keep that form).
_NEWOBJ = copyreg.__newobj__  # type: ignore[attr-defined]
NS = "https://xml-pipeline.dev/v1"
#: Default size limit of one message (bytes of XML).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

MessageKind = Literal["request", "response", "error"]
KINDS: tuple[str, ...] = ("request", "response", "error")
_ATTRS = frozenset({"id", "from", "to", "thread", "type", "in-reply-to"})
_LEADING_DOCTYPE = re.compile(rb"\s*(?:<!--.*?-->\s*)*<!DOCTYPE", re.S)


def new_id() -> str:
    return uuid.uuid4().hex


def derived_id(parent: str, n: int) -> str:
    """The id of the n-th message a listener sends while handling message `parent`.

    Deterministic, so a conversation run again (a pump taking over a dead pump's unfinished work)
    produces the same ids: its context-buffer appends (append_id = message id) and its egress
    outputs are then recognised as repeats instead of stored twice. Distinct parents or positions
    give distinct ids (SHA-256, 128 bits kept)."""
    return hashlib.sha256(f"{parent}/{n}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Message:
    """One envelope. `payload` is the XML fragment inside <payload>, exactly as sent."""

    sender: str
    to: str
    payload: str
    thread: str | None = None
    kind: MessageKind = "request"
    id: str = field(default_factory=new_id)
    in_reply_to: str | None = None

    def __post_init__(self) -> None:
        for name, value in (("from", self.sender), ("to", self.to)):
            if not isinstance(value, str) or not NAME_RE.match(value):
                raise MessageError(f"attribute {name!r} must be a name matching {NAME_RE.pattern}, got {value!r}")
        for attr, ident in (("id", self.id), ("thread", self.thread), ("in-reply-to", self.in_reply_to)):
            if ident is not None and (not isinstance(ident, str) or not ID_RE.match(ident)):
                raise MessageError(f"attribute {attr!r} must match {ID_RE.pattern}, got {ident!r}")
        if self.kind not in KINDS:
            raise MessageError(f"attribute 'type' must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.payload, str):
            raise MessageError(f"payload must be a str (an XML fragment), got {type(self.payload).__name__}")

    def __reduce__(self) -> tuple[Any, ...]:
        # A flat tuple: the dataclass default (a state list set field by field through fields())
        # costs ~3x more per pickle and per unpickle, and every slot of the context buffer holds a
        # Message. Unpickling does not validate again (see _rebuild). A subclass keeps the default.
        if type(self) is not Message:
            return (_NEWOBJ, (type(self),), self.__getstate__())
        return (_rebuild, (self.sender, self.to, self.payload, self.thread, self.kind, self.id, self.in_reply_to))

    # -- convenience for handlers -----------------------------------------------------------------
    @property
    def is_error(self) -> bool:
        return self.kind == "error"

    def element(self) -> Element | None:
        """The payload's first element, parsed safely (None if the payload is only text)."""
        wrapper = fragment_tree(self.payload)
        return wrapper[0] if len(wrapper) else None

    def text(self) -> str:
        """All text of the payload, without markup."""
        return "".join(fragment_tree(self.payload).itertext())

    def to_xml(self) -> str:
        attrs = [f"xmlns={quoteattr(NS)}", f"id={quoteattr(self.id)}", f"from={quoteattr(self.sender)}",
                 f"to={quoteattr(self.to)}"]
        if self.thread is not None:
            attrs.append(f"thread={quoteattr(self.thread)}")
        attrs.append(f"type={quoteattr(self.kind)}")
        if self.in_reply_to is not None:
            attrs.append(f"in-reply-to={quoteattr(self.in_reply_to)}")
        return f"<message {' '.join(attrs)}><payload>{self.payload}</payload></message>"

    def with_(self, **changes: Any) -> "Message":
        """A copy with `changes` applied; only the changed fields are validated again."""
        values: list[Any] = [self.sender, self.to, self.payload, self.thread, self.kind, self.id, self.in_reply_to]
        for name, value in changes.items():
            try:
                values[_POSITION[name]] = value
            except KeyError:
                raise TypeError(f"Message has no field {name!r} (fields: {', '.join(_FIELDS)})") from None
            _check(name, value)
        return _rebuild(*values)


#: Message's fields, in order.
_FIELDS = ("sender", "to", "payload", "thread", "kind", "id", "in_reply_to")
_POSITION = {name: i for i, name in enumerate(_FIELDS)}
_ATTR_NAMES = {"sender": "from", "to": "to", "thread": "thread", "id": "id", "in_reply_to": "in-reply-to"}
_set = object.__setattr__


def _check(name: str, value: object) -> None:
    """Raise MessageError unless `value` is valid for Message field `name` (what __post_init__
    checks, one field at a time)."""
    if name in ("sender", "to"):
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise MessageError(f"attribute {_ATTR_NAMES[name]!r} must be a name matching {NAME_RE.pattern}, "
                               f"got {value!r}")
    elif name == "payload":
        if not isinstance(value, str):
            raise MessageError(f"payload must be a str (an XML fragment), got {type(value).__name__}")
    elif name == "kind":
        if value not in KINDS:
            raise MessageError(f"attribute 'type' must be one of {', '.join(KINDS)}, got {value!r}")
    elif value is not None and (not isinstance(value, str) or not ID_RE.match(value)):
        raise MessageError(f"attribute {_ATTR_NAMES[name]!r} must match {ID_RE.pattern}, got {value!r}")


def _rebuild(sender: str, to: str, payload: str, thread: str | None, kind: str, id: str,  # noqa: A002
             in_reply_to: str | None) -> Message:
    """A Message from fields that were validated already (a copy's, or an unpickled one's: pickle
    restores state without checks, and whoever can feed pickle bytes can run code anyway)."""
    m = object.__new__(Message)
    _set(m, "sender", sender)
    _set(m, "to", to)
    _set(m, "payload", payload)
    _set(m, "thread", thread)
    _set(m, "kind", kind)
    _set(m, "id", id)
    _set(m, "in_reply_to", in_reply_to)
    return m




def _local(tag: str) -> tuple[str | None, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return None, tag


class _Scanner:
    """Parser target that records the envelope's structure and the byte range of <payload>'s content."""

    def __init__(self) -> None:
        self.expat: Any = None
        self.depth = 0
        self.root: tuple[str, dict[str, str]] | None = None
        self.children: list[str] = []
        self.payload_start: int | None = None
        self.payload_end: int | None = None
        self.stray_text = False
        #: byte ranges of depth-1 elements (used to split a <messages> document)
        self.ranges: list[tuple[str, int, int]] = []
        self._child_start = 0

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if self.depth >= MAX_XML_DEPTH:
            # Raised inside expat's callback: the parse stops here, before the rest is read.
            raise MessageError(f"elements are nested more than {MAX_XML_DEPTH} deep "
                               f"(at line {self.expat.CurrentLineNumber})")
        if self.depth == 0:
            self.root = (tag, dict(attrib))
        elif self.depth == 1:
            self.children.append(tag)
            self._child_start = self.expat.CurrentByteIndex
            if _local(tag)[1] == "payload" and self.payload_start is None:
                self.payload_start = self._child_start
        self.depth += 1

    def end(self, tag: str) -> None:
        self.depth -= 1
        if self.depth == 1:
            # For an end tag the index is where "</tag>" starts; for an empty element <x/> it is
            # just after "/>" (checked in _content_range).
            end = self.expat.CurrentByteIndex
            self.ranges.append((tag, self._child_start, end))
            if _local(tag)[1] == "payload" and self.payload_end is None:
                self.payload_end = end

    def data(self, data: str) -> None:
        if self.depth == 1 and data.strip():
            self.stray_text = True

    def close(self) -> None:
        return None


def _tag_end(raw: bytes, start: int) -> tuple[int, bool]:
    """Index just after the '>' closing the start tag at `start`, and whether it was '/>'."""
    quote = 0
    i = start
    n = len(raw)
    while i < n:
        c = raw[i]
        if quote:
            if c == quote:
                quote = 0
        elif c in (0x22, 0x27):  # " '
            quote = c
        elif c == 0x3E:  # >
            return i + 1, raw[i - 1] == 0x2F  # '/'
        i += 1
    raise MessageError("unterminated start tag")  # unreachable for well-formed input


def _element_end(raw: bytes, end_index: int, empty: bool, content_start: int) -> int:
    """Index just after an element whose end event was at `end_index`."""
    if empty:
        return content_start
    gt = raw.index(b">", end_index)
    return gt + 1


def _scan(raw: bytes, what: str) -> _Scanner:
    check_encoding(raw)
    scanner = _Scanner()
    p = parser(scanner)
    scanner.expat = p.parser
    try:
        p.feed(raw)
        p.close()
    except (ParseError, DefusedXmlException) as e:
        raise MessageError(f"{what}: {explain(e)}") from None
    except MessageError as e:
        raise MessageError(f"{what}: {e}") from None
    except RecursionError:
        raise MessageError(f"{what}: nested too deeply") from None
    return scanner


def _as_bytes(data: str | bytes, max_bytes: int) -> bytes:
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise MessageError(f"message is {len(raw)} bytes, the limit is {max_bytes}")
    if not raw.strip():
        raise MessageError("message is empty")
    return raw


def parse_message(data: str | bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse one untrusted <message> document. Raises MessageError saying what is wrong."""
    raw = _as_bytes(data, max_bytes)
    s = _scan(raw, "malformed message")
    return _envelope(raw, s)


def _envelope(raw: bytes, s: _Scanner) -> Message:
    assert s.root is not None
    tag, attrib = s.root
    ns, local = _local(tag)
    if local != "message" or ns not in (None, NS):
        shown = f"{{{ns}}}{local}" if ns else local
        raise MessageError(f"root element must be <message xmlns={NS!r}>, got <{shown}>")
    unknown = sorted(set(attrib) - _ATTRS)
    if unknown:
        raise MessageError(f"<message> has unknown attribute {unknown[0]!r} (allowed: {', '.join(sorted(_ATTRS))})")
    for required in ("from", "to"):
        if required not in attrib:
            raise MessageError(f"<message> is missing the attribute {required!r}")
    payloads = [c for c in s.children if _local(c)[1] == "payload"]
    others = [c for c in s.children if _local(c)[1] != "payload"]
    if len(payloads) != 1 or others:
        raise MessageError(f"<message> must contain exactly one <payload> element and nothing else, "
                           f"found {[_local(c)[1] for c in s.children] or 'no elements'}")
    if _local(payloads[0])[0] not in (None, NS):
        raise MessageError(f"<payload> must be in namespace {NS!r}")
    if s.stray_text:
        raise MessageError("<message> holds text outside <payload>")
    assert s.payload_start is not None and s.payload_end is not None
    content_start, empty = _tag_end(raw, s.payload_start)
    fragment = "" if empty else raw[content_start:s.payload_end].decode("utf-8")
    kwargs: dict[str, Any] = dict(sender=attrib["from"], to=attrib["to"], payload=fragment,
                                  thread=attrib.get("thread"), kind=attrib.get("type", "request"),
                                  in_reply_to=attrib.get("in-reply-to"))
    if "id" in attrib:
        kwargs["id"] = attrib["id"]
    msg = Message(**kwargs)
    # The fragment must also stand alone (prefixes declared outside <payload> would not travel).
    if ":" in fragment and "<" in fragment:
        check_fragment(fragment)
    return msg


def split_messages(data: str | bytes, *, max_bytes: int = 256 * 1024 * 1024) -> list[Message]:
    """Parse a file of messages: one <message>, several <message> elements one after another, or a
    <messages> document holding them. Raises MessageError naming the message's position."""
    raw = _as_bytes(data, max_bytes)
    check_encoding(raw)
    body = re.sub(rb"^\s*<\?xml[^>]*\?>", b"", raw, count=1)
    if _LEADING_DOCTYPE.match(body):
        # Said plainly here: inside the <messages> wrapper it would only be "invalid token".
        raise MessageError("malformed input: DTDForbidden: DTDs and entity declarations are not allowed "
                           "(they enable entity expansion and external entity attacks)")
    return _split(b"<messages>" + body + b"</messages>")


def _split(doc: bytes, unwrapped: bool = False) -> list[Message]:
    s = _scan(doc, "malformed input")
    ranges = []
    for tag, start, end_idx in s.ranges:
        content_start, empty = _tag_end(doc, start)
        ranges.append((tag, start, _element_end(doc, end_idx, empty, content_start)))
    if len(ranges) == 1 and _local(ranges[0][0])[1] == "messages":
        if unwrapped:  # one <messages> wrapper is the format; more would be rescanned once per level
            raise MessageError("malformed input: <messages> inside <messages> (allowed: one <messages> "
                               "document, or <message> elements one after another)")
        _, start, stop = ranges[0]
        return _split(doc[start:stop], unwrapped=True)
    out: list[Message] = []
    for n, (tag, start, stop) in enumerate(ranges, 1):
        if _local(tag)[1] != "message":
            raise MessageError(f"message {n}: expected <message>, got <{_local(tag)[1]}>")
        try:
            out.append(parse_message(doc[start:stop]))
        except MessageError as e:
            raise MessageError(f"message {n}: {e}") from None
    if not out:
        raise MessageError("input holds no <message>")
    return out
