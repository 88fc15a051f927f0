"""The handler API is importable from xml_pipeline.message_bus, and the handler example in
examples/README.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import xml_pipeline.message_bus as bus
from xml_pipeline.message_bus.message import normalize_result

README = Path(__file__).resolve().parents[2] / "examples" / "README.md"


def test_every_name_in_all_is_exported() -> None:
    assert {"Message", "Reply", "Call", "HandlerResult", "MessageError", "text_payload"} <= set(bus.__all__)
    missing = [name for name in bus.__all__ if not hasattr(bus, name)]
    assert missing == []


def _handler_snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Writing a handler"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "examples/README.md: no python block under 'Writing a handler'"
    return match.group(1)


def test_the_readme_handler_example_runs_with_the_public_imports() -> None:
    namespace: dict[str, object] = {}
    exec(compile(_handler_snippet(), str(README), "exec"), namespace)  # noqa: S102 - our own docs
    handle = namespace["handle"]
    assert callable(handle)
    ask = bus.Message("console", "agent", '<ask/>')
    other = bus.Message("console", "agent", "<hello/>")
    assert normalize_result(handle(ask)) == [bus.Call("primes", '<count below="1000"/>')]
    assert normalize_result(handle(other)) == [bus.Reply("<answer>42</answer>")]


def test_a_bad_handler_result_names_the_allowed_types() -> None:
    with pytest.raises(bus.MessageError, match="allowed: None, str"):
        normalize_result(42)
    with pytest.raises(bus.MessageError, match="well-formed"):
        bus.check_fragment("<unclosed>")
