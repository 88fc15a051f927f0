"""xml-pipeline: a multi-agent XML message bus with a shared backend (memory, manager, Redis).

The public surfaces live in subpackages: `xml_pipeline.memory` (backends, Context Buffer, slots),
`xml_pipeline.message_bus` (thread registry, messages, the pump). Errors: `xml_pipeline.errors`.
"""
from __future__ import annotations

from typing import Any

from .errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    SlotIntegrityError,
    ThreadFullError,
    XmlPipelineError,
)


def __getattr__(name: str) -> Any:
    # Lazy: importlib.metadata costs ~30 ms, paid by every pod, worker and manager server start.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            value = version("xml-pipeline")
        except PackageNotFoundError:  # a source tree that was never installed
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "__version__",
    "XmlPipelineError",
    "ConfigError",
    "BackendError",
    "BackendUnavailable",
    "SlotIntegrityError",
    "ThreadFullError",
]
