"""The library's whole backend contract suite (tests/library/test_contract.py), run on RedisBackend
logged in as an organism's restricted ACL user: the permission set is sufficient, not just strict.

The suite's test functions are loaded from the library's file and collected here with this module's
fixtures, so a test added to the contract is run with the restricted user automatically.
"""
from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xml_pipeline.memory import BackendConfig, SharedBackend
from xml_pipeline.memory.redis_backend import RedisBackend

from .conftest import Org

_CONTRACT = Path(__file__).resolve().parents[1] / "library" / "test_contract.py"
if not _CONTRACT.exists():  # pragma: no cover - only while the library suite is missing
    pytest.skip(f"{_CONTRACT} does not exist", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("xp_contract_for_restricted_user", _CONTRACT)
assert _spec is not None and _spec.loader is not None
_contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_contract)
CONTRACT_TESTS = sorted(name for name in vars(_contract) if name.startswith("test_"))
for _name in CONTRACT_TESTS:
    globals()[_name] = getattr(_contract, _name)

#: Tests parametrized over backend kinds run here for "redis" only (conftest deselects the others).
ONLY_KIND = "redis"


@pytest.fixture
def make_backend(make_org: Callable[..., Org]) -> Iterator[Callable[..., SharedBackend]]:
    """make_backend("redis", **config): a RedisBackend logged in as a fresh organism user."""
    made: list[RedisBackend] = []

    def make(kind: str, **config: Any) -> SharedBackend:
        assert kind == ONLY_KIND, kind
        org = make_org(f"contract-{secrets.token_hex(3)}")
        config.setdefault("signing_key", "multitenancy-contract-key-0123456789")
        config.setdefault("redis_prefix", org.prefix)
        backend = RedisBackend(BackendConfig(backend_type="redis", redis_url=org.server.url,
                                             redis_username=org.username, redis_password=org.password,
                                             **config))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        # The tenant has no EVAL/EVALSHA: whatever script the test ran went through FCALL.
        assert backend.script_mechanism in (None, "fcall")
        backend.close()


@pytest.fixture
def any_backend(make_backend: Callable[..., SharedBackend]) -> SharedBackend:
    return make_backend(ONLY_KIND, redis_ttl=600)


def test_the_contract_suite_was_collected() -> None:
    assert len(CONTRACT_TESTS) >= 10
