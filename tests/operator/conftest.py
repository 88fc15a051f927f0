"""The operator tests' fixtures live in operator_harness.py: test modules import helpers from there.

(`from conftest import ...` breaks when several test areas are given on one pytest command line:
pytest loads every area's conftest.py up front, all under the module name `conftest`, and the last
one wins.)"""
from operator_harness import *  # noqa: F403 - re-exports the fixtures to pytest
