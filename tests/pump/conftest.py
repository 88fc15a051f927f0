"""Fixtures of the pump tests (plain helpers live in pump_harness.py)."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # xp_test_handlers, for this process and its spawned children

from process_fixtures import cli_env, prefix, procs  # noqa: E402,F401 - fixtures shared with tests/faults
