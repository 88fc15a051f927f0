"""xml_pipeline.memory.manager_backend: ManagerBackend under xml-pipeline's module name
(defined in manager.py)."""
from __future__ import annotations

from .manager import ManagerBackend

__all__ = ["ManagerBackend"]
