"""The greeter: a plain listener (it runs inside the pump's event loop).

    <greet name="Ada"/>                  → <greeting>Hello, Ada!</greeting>
    <greet name="Ada" lucky="20000"/>    → calls primes with <count below="20000" ref="Ada"/>;
                                           primes answers <primes below=".." count=".." ref="Ada"/>;
                                           the greeter then replies with the greeting and the count.
"""
from __future__ import annotations

from xml.sax.saxutils import quoteattr

from xml_pipeline.message_bus import Call, Message, text_payload


def handle(message: Message) -> str | Call | None:
    if message.is_error:
        # A listener we called failed: pass the error text on to our caller.
        return text_payload(f"sorry, something went wrong: {message.text()}", "greeting")
    el = message.element()
    if el is not None and el.tag == "primes":
        name = el.get("ref", "friend")
        return text_payload(f"Hello, {name}! Your lucky number: there are {el.get('count')} primes "
                            f"below {el.get('below')}.", "greeting")
    name = (el.get("name") if el is not None else None) or message.text().strip() or "world"
    lucky = el.get("lucky") if el is not None else None
    if lucky:
        return Call("primes", f"<count below={quoteattr(lucky)} ref={quoteattr(name)}/>")
    return text_payload(f"Hello, {name}!", "greeting")
