"""`xml-pipeline-operator` as a real process: settings errors, liveness, metrics, SIGTERM."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp

from operator_harness import DEPLOYMENTS, eventually, get_obj, org_path, organism
from kmock_cluster import Cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def operator_env(kubeconfig: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XPO_", "KUBERNETES_SERVICE"))}
    env.update(KUBECONFIG=str(kubeconfig), XPO_LOG_LEVEL="INFO", **extra)
    return env


async def test_bad_settings_exit_2_naming_the_variable(kubeconfig: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xml_pipeline_operator", env=operator_env(kubeconfig, XPO_DEFAULT_TTL="soon"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    assert b"XPO_DEFAULT_TTL" in err and b"60..31536000" in err and b"Traceback" not in err


async def test_liveness_metrics_and_clean_sigterm(k8s: Cluster, kubeconfig: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xml_pipeline_operator",
        env=operator_env(kubeconfig, XPO_HEALTH_PORT=str(port), XPO_SHARED_REDIS_PASSWORD="never-logged-pw"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            async def healthz() -> Any:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        return resp.status == 200 and await resp.json()
                except aiohttp.ClientError:
                    return None
            assert await eventually(healthz, timeout=60, interval=0.1) == {"status": "ok"}

            spec = {"config": {"listeners": [{"name": "greeter", "handler": "xml_pipeline.examples.greeter:handle"}]}}
            assert (await k8s.post(org_path(), json=organism("proc", spec))).status == 201
            await eventually(lambda: get_obj(k8s, DEPLOYMENTS, "proc-pump"), timeout=30)

            async def metrics() -> str | None:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                    return text if 'xpo_reconciles_total{result="ok"}' in text else None
            text = await eventually(metrics, timeout=30, interval=0.1)
            assert 'xpo_api_requests_total{verb="create",kind="Deployment"} 2' in text
            assert 'xpo_organisms{phase="Provisioning"} 1' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, output.decode()[-3000:]
    log = output.decode()
    assert "xml-pipeline-operator stopped" in log
    assert "never-logged-pw" not in log
    credentials = get_obj(k8s, "v1/secrets", "proc-credentials")
    assert credentials is not None
    for key in ("redis-password", "signing-key"):  # the generated secrets are never logged
        assert base64.b64decode(credentials["data"][key]).decode() not in log
