"""xml_pipeline.message_bus: routing state and messages of an organism.

`thread_registry` maps opaque thread uuids to call chains (ThreadRegistry, get_registry). The other
modules (messages, the pump) are imported from their own modules; nothing heavy is loaded here.
"""
from __future__ import annotations

from .thread_registry import ThreadRegistry, get_registry

__all__ = ["ThreadRegistry", "get_registry"]
