"""xml-pipeline: a multi-agent XML message bus with a shared backend (memory, manager, Redis).

The public surfaces live in subpackages: `xml_pipeline.memory` (backends, Context Buffer, slots),
`xml_pipeline.message_bus` (thread registry, messages, the pump). Errors: `xml_pipeline.errors`.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    SlotIntegrityError,
    ThreadFullError,
    XmlPipelineError,
)

try:
    __version__ = version("xml-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "XmlPipelineError",
    "ConfigError",
    "BackendError",
    "BackendUnavailable",
    "SlotIntegrityError",
    "ThreadFullError",
]
