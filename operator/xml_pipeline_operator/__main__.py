"""`xml-pipeline-operator`: run the Organism operator.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for bad settings (the message names the
XPO_* variable and the allowed values), 1 for a runtime failure.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

import kopf

from xml_pipeline.errors import ConfigError

from . import handlers, health
from .settings import OperatorSettings

logger = logging.getLogger("xml_pipeline_operator")


async def run(settings: OperatorSettings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (kopf's own handlers: finish running handlers, then exit) or until
    `stop` is set (embedding, tests)."""
    ready = asyncio.Event()
    registry = kopf.OperatorRegistry()
    reconciler = handlers.register(registry, settings)
    kopf_settings = kopf.OperatorSettings()  # tuned by the startup handler (handlers.configure_kopf)
    # Peering is chosen before kopf starts (its peering tasks are spawned with the operator).
    handlers.apply_peering(kopf_settings, settings)
    runner = await health.start(settings.health_port, ready, lambda: reconciler.kube.requests)
    logger.info("xml-pipeline-operator starting: %s, health on :%d",
                "all namespaces" if settings.clusterwide else f"namespaces {','.join(settings.namespaces)}",
                settings.health_port)
    try:
        await kopf.operator(
            registry=registry, settings=kopf_settings, standalone=settings.peering is None,
            clusterwide=settings.clusterwide, namespaces=list(settings.namespaces),
            stop_flag=stop, ready_flag=ready,
        )
    finally:
        await runner.cleanup()
        logger.info("xml-pipeline-operator stopped")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nSettings come from the environment: XPO_NAMESPACES, XPO_DEFAULT_IMAGE, XPO_DEFAULT_TTL,\n"
              "XPO_REDIS_IMAGE, XPO_SHARED_REDIS_URL, XPO_SHARED_REDIS_USERNAME, XPO_SHARED_REDIS_PASSWORD,\n"
              "XPO_SHARED_REDIS_CA_FILE, "
              "XPO_HEALTH_PORT, XPO_LOG_LEVEL, XPO_RESYNC_SECONDS, XPO_AUTOSCALER, XPO_PEERING,\n"
              "XPO_PEERING_LIFETIME, XPO_WEBHOOK_PORT, XPO_WEBHOOK_HOST, XPO_WEBHOOK_CERT_DIR,\n"
              "XPO_WEBHOOK_CONFIGURATION (see docs/operator.md).")
        return 0
    if args:
        print(f"xml-pipeline-operator: unexpected arguments {args!r}; settings come from XPO_* variables",
              file=sys.stderr)
        return 2
    try:
        settings = OperatorSettings.from_env(os.environ)
    except ConfigError as e:
        print(f"xml-pipeline-operator: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level_number,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf's per-object logs go through the same handlers; its verbose internals stay at WARNING.
    logging.getLogger("kopf").setLevel(max(settings.log_level_number, logging.INFO))
    try:
        asyncio.run(run(settings))
    except Exception:  # noqa: BLE001 -- last resort: report, exit non-zero
        logger.exception("xml-pipeline-operator failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
