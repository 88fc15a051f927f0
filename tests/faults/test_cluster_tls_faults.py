"""`xml-pipeline run` (pump + worker processes: the blocking pool, the pump's pipe and each worker's
own connection, all asking the sentinels for the master) on a TLS-only Sentinel set
(tests/redis_cluster.py with `tls=`), with `redis_ca_cert` in organism.yaml, while the master dies:
every conversation gets exactly one answer or error, and no handler runs twice
(test_cluster_faults._run_across). On a cluster the pump and workers keep the blocking path, which
tests/library/test_cluster_tls.py takes across a killed TLS master."""
from __future__ import annotations

from pathlib import Path

import pytest
from redis_cluster import LocalSentinel
from redis_server import TLSFiles
from test_cluster_faults import _run_across

pytestmark = [pytest.mark.cluster, pytest.mark.faults]


def test_a_run_on_a_tls_sentinel_set_keeps_answering_when_its_master_dies(
        tls_sentinel: LocalSentinel, tls_files: TLSFiles, tmp_path: Path, cli_env: dict[str, str]) -> None:
    tally = _run_across(tls_sentinel.url, lambda: tls_sentinel.failover(kill=True), tmp_path, cli_env,
                        redis_ca_cert=str(tls_files.ca))
    print(f"\nrun across a TLS sentinel failover: {tally.answered} answered, {tally.errored} errors "
          f"of {len(tally.sent)}")

