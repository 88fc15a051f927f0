"""Fixtures of the fault suite: real redis-server, real pump / worker / run processes."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
for p in (HERE, HERE.parent / "pump"):  # fault_handlers for spawned workers; pump_harness
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from process_fixtures import cli_env, prefix, procs  # noqa: E402,F401 - fixtures shared with tests/pump
