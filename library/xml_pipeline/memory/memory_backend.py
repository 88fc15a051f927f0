"""xml_pipeline.memory.memory_backend: InMemoryBackend under xml-pipeline's module name
(defined in inmemory.py)."""
from __future__ import annotations

from .inmemory import InMemoryBackend

__all__ = ["InMemoryBackend"]
