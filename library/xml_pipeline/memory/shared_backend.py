"""xml_pipeline.memory.shared_backend: xml-pipeline's module of the backend protocol, the config,
the factory and slot serialization, under its original name.

The definitions live in protocol.py, config.py, factory.py and serialization.py; this module only
gathers them where code written for xml-pipeline imports them from.
"""
from __future__ import annotations

from .config import BackendConfig
from .factory import get_shared_backend, reset_shared_backend
from .protocol import SharedBackend
from .serialization import deserialize_slot, serialize_slot

__all__ = [
    "SharedBackend",
    "BackendConfig",
    "get_shared_backend",
    "reset_shared_backend",
    "serialize_slot",
    "deserialize_slot",
]
