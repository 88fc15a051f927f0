"""`xml-pipeline run` (pump + worker processes, each with its own connections to every node it uses)
on a TLS-only Sentinel set and a TLS-only Redis Cluster (tests/redis_cluster.py with `tls=`), with
`redis_ca_cert` in organism.yaml, while a master dies: every conversation gets exactly one answer or
error, and no handler runs twice (test_cluster_faults._run_across)."""
from __future__ import annotations

from pathlib import Path

import pytest
from redis_cluster import LocalCluster, LocalSentinel
from redis_server import TLSFiles
from test_cluster_faults import _run_across

pytestmark = [pytest.mark.cluster, pytest.mark.faults]


def test_a_run_on_a_tls_sentinel_set_keeps_answering_when_its_master_dies(
        tls_sentinel: LocalSentinel, tls_files: TLSFiles, tmp_path: Path, cli_env: dict[str, str]) -> None:
    tally = _run_across(tls_sentinel.url, lambda: tls_sentinel.failover(kill=True), tmp_path, cli_env,
                        redis_ca_cert=str(tls_files.ca))
    print(f"\nrun across a TLS sentinel failover: {tally.answered} answered, {tally.errored} errors "
          f"of {len(tally.sent)}")



def test_a_run_on_a_tls_cluster_keeps_answering_when_a_master_dies(
        tls_cluster: LocalCluster, tls_files: TLSFiles, tmp_path: Path, cli_env: dict[str, str]) -> None:
    tally = _run_across(tls_cluster.url, lambda: tls_cluster.kill_master_and_wait_failover(tls_cluster.masters()[0]),
                        tmp_path, cli_env, redis_ca_cert=str(tls_files.ca))
    print(f"\nrun across a TLS cluster master kill: {tally.answered} answered, {tally.errored} errors "
          f"of {len(tally.sent)}")
