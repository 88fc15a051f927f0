"""XML envelopes: round trips, and untrusted input rejected safely with a clear error."""
from __future__ import annotations

from pathlib import Path

import pytest

from xml_pipeline.message_bus.message import (
    NS,
    Call,
    Message,
    MessageError,
    Reply,
    check_fragment,
    normalize_result,
    parse_message,
    split_messages,
)


def test_round_trip_keeps_the_payload_verbatim() -> None:
    payload = '<order xmlns:x="urn:x" id="7"><x:item qty="2">tea &amp; cake</x:item><![CDATA[<raw>]]></order>'
    m = Message("console", "greeter", payload, thread="t-1", kind="response", in_reply_to="abc")
    back = parse_message(m.to_xml())
    assert back == m
    assert back.payload == payload
    assert parse_message(m.to_xml().encode("utf-8")) == m


def test_minimal_envelope_and_helpers() -> None:
    m = parse_message(f'<message xmlns="{NS}" from="a" to="b"><payload><greet name="Ada"/>hi</payload></message>')
    assert (m.sender, m.to, m.thread, m.kind) == ("a", "b", None, "request")
    assert m.element() is not None and m.element().get("name") == "Ada"  # type: ignore[union-attr]
    assert m.text() == "hi"
    assert parse_message('<message from="a" to="b"><payload/></message>').payload == ""
    assert parse_message('<message from="a" to="b"><payload>é ü</payload></message>').payload == "é ü"


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<message from="a" to="b"><payload>&lol4;</payload></message>"""


def test_billion_laughs_is_rejected() -> None:
    with pytest.raises(MessageError, match="DTDs and entity declarations are not allowed"):
        parse_message(BILLION_LAUGHS)


def test_external_entity_is_rejected_and_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file://{secret}">]>'
           '<message from="a" to="b"><payload>&x;</payload></message>')
    with pytest.raises(MessageError) as e:
        parse_message(xxe)
    assert "TOP-SECRET" not in str(e.value)
    # Undeclared entities are plain errors too (nothing is expanded).
    with pytest.raises(MessageError, match="undefined entity"):
        parse_message('<message from="a" to="b"><payload>&x;</payload></message>')
    # A DTD smuggled into a handler's output is refused as well.
    with pytest.raises(MessageError):
        check_fragment('<!DOCTYPE x [<!ENTITY a "b">]><x/>')


@pytest.mark.parametrize("doc, problem", [
    ('<message from="a" to="b"><payload><x></payload></message>', "mismatched tag"),
    ("", "empty"),
    ("not xml", "not well-formed"),
    ("<foo/>", "root element must be <message"),
    ('<message xmlns="urn:other" from="a" to="b"><payload/></message>', "root element must be"),
    ('<message from="a"><payload/></message>', "missing the attribute 'to'"),
    ('<message from="a" to="b"/>', "exactly one <payload>"),
    ('<message from="a" to="b"><payload/><payload/></message>', "exactly one <payload>"),
    ('<message from="a" to="b"><payload/><extra/></message>', "exactly one <payload>"),
    ('<message from="a" to="b">text<payload/></message>', "text outside <payload>"),
    ('<message from="a" to="b" colour="red"><payload/></message>', "unknown attribute 'colour'"),
    ('<message from="a.b" to="b"><payload/></message>', "attribute 'from'"),
    ('<message from="a" to="b" type="shout"><payload/></message>', "attribute 'type'"),
    ('<message from="a" to="b" thread="has space"><payload/></message>', "attribute 'thread'"),
    ('<?xml version="1.0" encoding="ISO-8859-1"?><message from="a" to="b"><payload/></message>', "UTF-8"),
    ('<message xmlns:p="urn:p" from="a" to="b"><payload><p:x/></payload></message>', "well-formed"),
])
def test_malformed_envelopes_get_a_clear_error(doc: str, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        parse_message(doc)


def test_size_limit() -> None:
    big = Message("a", "b", "x" * 2000).to_xml()
    with pytest.raises(MessageError, match="limit is 1000"):
        parse_message(big, max_bytes=1000)


def test_split_messages_accepts_sequences_and_documents() -> None:
    a = Message("console", "greeter", "<a/>")
    b = Message("console", "primes", "<b/>")
    assert split_messages(a.to_xml() + "\n\n" + b.to_xml()) == [a, b]
    doc = f'<?xml version="1.0"?>\n<messages xmlns="{NS}">\n{a.to_xml()}\n{b.to_xml()}\n</messages>'
    assert split_messages(doc) == [a, b]
    assert split_messages(a.to_xml()) == [a]
    with pytest.raises(MessageError, match="message 2: expected <message>"):
        split_messages(a.to_xml() + "<other/>")
    with pytest.raises(MessageError, match="message 1: <message> is missing the attribute 'to'"):
        split_messages('<message from="a"><payload/></message>')


def test_normalize_result() -> None:
    assert normalize_result(None) == []
    assert normalize_result("<ok/>") == [Reply("<ok/>")]
    assert normalize_result(b"plain text") == [Reply("plain text")]
    assert normalize_result([Call("b", "<x/>"), Reply("y")]) == [Call("b", "<x/>"), Reply("y")]
    with pytest.raises(MessageError, match="not a well-formed XML fragment"):
        normalize_result("a < b")
    with pytest.raises(MessageError, match="allowed: None, str"):
        normalize_result(42)
    with pytest.raises(MessageError, match="Call.to"):
        normalize_result(Call("a.b", "<x/>"))


def test_deep_nesting_is_refused_at_the_limit() -> None:
    from xml_pipeline.message_bus.message import MAX_XML_DEPTH
    deep = "<a>" * MAX_XML_DEPTH + "</a>" * MAX_XML_DEPTH
    with pytest.raises(MessageError, match=f"nested more than {MAX_XML_DEPTH} deep"):
        parse_message(f'<message from="a" to="b"><payload>{deep}</payload></message>')
    fits = "<a>" * (MAX_XML_DEPTH - 2) + "</a>" * (MAX_XML_DEPTH - 2)  # + <message> and <payload>
    assert parse_message(f'<message from="a" to="b"><payload>{fits}</payload></message>').payload == fits


def test_20000_deep_messages_document_is_refused_at_once() -> None:
    with pytest.raises(MessageError, match="nested more than"):
        split_messages("<messages>" * 20_000 + "</messages>" * 20_000)


def test_messages_inside_messages_is_refused() -> None:
    one = Message("a", "b", "<x/>").to_xml()
    assert len(split_messages(f"<messages>{one}{one}</messages>")) == 2
    with pytest.raises(MessageError, match="<messages> inside <messages>"):
        split_messages(f"<messages><messages>{one}</messages></messages>")


@pytest.mark.parametrize("attr", ['from="greeter&#10;"', 'to="greeter&#10;"', 'thread="t1&#10;"', 'id="m1&#10;"'])
def test_trailing_newline_in_names_and_ids(attr: str) -> None:
    attrs = {"from": 'from="a"', "to": 'to="b"'}
    attrs[attr.split("=")[0]] = attr
    with pytest.raises(MessageError):
        parse_message(f'<message {" ".join(attrs.values())}><payload/></message>')
