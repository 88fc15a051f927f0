"""Safe XML for messages: names and ids, the parser every untrusted document goes through, fragments.

Messages come from outside (files, stdin, the ingress stream of a pod), and handlers return XML
fragments that become payloads: everything parsed here is treated as untrusted. defusedxml with
DTDs forbidden (no entity expansion: no billion laughs; no external entities or DTDs: no file or
network reads), and an error that says what is wrong. message.py builds the envelope on these,
actions.py checks what handlers return with them.
"""
from __future__ import annotations

import re
from typing import Any
from xml.etree.ElementTree import Element, ParseError
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, fromstring

from ..errors import XmlPipelineError

#: Names of listeners and external senders. No '.', which separates the hops of a call chain.
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,62}\Z")  # \Z: "$" would pass a trailing newline
#: Thread ids and message ids: uuids from the registry, or ids an external client chose.
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
#: Deepest element nesting of a message or an input file (envelope, payload and its content).
MAX_XML_DEPTH = 256
_XML_DECL = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_UTF8 = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


class MessageError(XmlPipelineError, ValueError):
    """An XML message is malformed, unsafe or not a valid envelope. The text says what and where."""


def text_payload(text: str, tag: str | None = None) -> str:
    """A fragment holding `text` escaped, optionally inside <tag>…</tag>."""
    body = escape(text)
    return f"<{tag}>{body}</{tag}>" if tag else body


def error_payload(listener: str, error_type: str, detail: str) -> str:
    """The payload of an error response: <error listener=... type=...>detail</error>."""
    return (f"<error listener={quoteattr(listener)} type={quoteattr(error_type)}>"
            f"{escape(detail)}</error>")


# -- parsing ----------------------------------------------------------------------------------------
def parser(target: object) -> DefusedXMLParser:
    """The parser of untrusted documents, feeding `target`."""
    # forbid_dtd: no DOCTYPE at all, which rules out entity expansion and external entities/DTDs.
    p = DefusedXMLParser(target=target, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    # Exact byte offsets need unbuffered character data (see _Scanner).
    p.parser.buffer_text = False
    return p


def explain(e: Exception) -> str:
    """A parse failure in one line."""
    if isinstance(e, DefusedXmlException):
        return (f"{type(e).__name__}: DTDs and entity declarations are not allowed "
                "(they enable entity expansion and external entity attacks)")
    if isinstance(e, ParseError):
        line, col = getattr(e, "position", (None, None))
        msg = str(e).split(":")[0]
        return f"not well-formed XML at line {line}, column {col}: {msg}"
    return f"{type(e).__name__}: {e}"


def check_encoding(raw: bytes) -> None:
    """Refuse a document whose XML declaration names another encoding than UTF-8."""
    m = _XML_DECL.match(raw[:200])
    if m and m.group(1).decode().lower() not in _UTF8:
        raise MessageError(f"XML declaration names encoding {m.group(1).decode()!r}; messages must be UTF-8")


class _DtdRefused(Exception):
    """A fragment declared a DTD or an entity (check_fragment)."""


def _refuse_dtd(*_args: object) -> Any:
    raise _DtdRefused


def check_fragment(fragment: str) -> str:
    """Return `fragment` if it is a well-formed, safe XML fragment, else raise MessageError.

    Every payload a handler returns goes through here (in the worker, for cpu_bound ones), so this
    is a bare expat parser with namespaces on (as ElementTree's, so an undeclared prefix fails the
    same way) and the DTD refused, not a DefusedXMLParser: building one costs ~10x the parse of a
    small fragment. No DTD means no entity declarations and no external entities either, which is
    what the defused parser's forbid_dtd / forbid_entities / forbid_external guard against."""
    if "<!" in fragment and ("<!DOCTYPE" in fragment or "<!ENTITY" in fragment):
        raise MessageError("payload: DTDs and entity declarations are not allowed")
    p = expat.ParserCreate(None, "}")
    p.StartDoctypeDeclHandler = p.EntityDeclHandler = p.UnparsedEntityDeclHandler = _refuse_dtd
    p.ExternalEntityRefHandler = _refuse_dtd
    try:
        p.Parse(b"<payload>", False)
        p.Parse(fragment.encode("utf-8"), False)
        p.Parse(b"</payload>", True)
    except expat.ExpatError as e:
        detail = f"not well-formed XML at line {e.lineno}, column {e.offset}: {str(e).split(':')[0]}"
        raise MessageError(f"payload is not a well-formed XML fragment: {detail}") from None
    except _DtdRefused:
        raise MessageError("payload: DTDs and entity declarations are not allowed") from None
    return fragment


def fragment_tree(fragment: str) -> Element:
    """`fragment` parsed inside a <payload> wrapper element."""
    try:
        return fromstring(f"<payload>{fragment}</payload>", forbid_dtd=True)
    except (ParseError, DefusedXmlException) as e:
        raise MessageError(f"payload is not a well-formed XML fragment: {explain(e)}") from None

