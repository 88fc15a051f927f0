"""Names and labels of everything the operator creates for an Organism (the DEVELOPERS.md contract)."""
from __future__ import annotations

from typing import Literal

Component = Literal["pump", "worker", "redis", "config", "credentials", "binding"]

ORGANISM_LABEL = "xml-pipeline.dev/organism"
#: Pod label `<label>: <organism name>` that lets a pod of the namespace reach the organism's
#: dedicated Redis through its NetworkPolicy besides the pump and workers (debugging, an exporter).
REDIS_CLIENT_LABEL = "xml-pipeline.dev/redis-client"
#: Pod label `<label>: <organism name>` of the organism's client pods (the injection webhook configures
#: them; a dedicated Redis's NetworkPolicy admits them). docs/clients.md.
CLIENT_LABEL = "xml-pipeline.dev/client"
CONFIG_HASH_ANNOTATION = "xml-pipeline.dev/config-hash"
#: Pod-template annotation in shared mode: HMAC of the password the pods read (rotation.py).
CREDENTIALS_DIGEST_ANNOTATION = "xml-pipeline.dev/credentials-digest"
APP_NAME = "xml-pipeline"
MANAGED_BY = "xml-pipeline-operator"

CONFIG_DIR = "/etc/xml-pipeline"
CONFIG_KEY = "organism.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"
REDIS_PORT = 6379

# Keys of the <name>-credentials Secret.
USERNAME_KEY = "redis-username"
PASSWORD_KEY = "redis-password"
SIGNING_KEY_KEY = "signing-key"
# Only while a password rotation runs (rotation.py); pods never reference them.
NEXT_PASSWORD_KEY = "redis-password-next"
PREVIOUS_PASSWORD_HASHES_KEY = "redis-password-previous-sha256"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def secret_name(name: str) -> str:
    return f"{name}-credentials"


def pump_name(name: str) -> str:
    return f"{name}-pump"


def worker_name(name: str) -> str:
    return f"{name}-worker"


def redis_name(name: str) -> str:
    """The dedicated Redis Service, its Deployment or StatefulSet, and its NetworkPolicy."""
    return f"{name}-redis"


def selector_labels(name: str, component: Component) -> dict[str, str]:
    """The immutable subset used in Deployment/StatefulSet/Service selectors."""
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def labels(name: str, component: Component) -> dict[str, str]:
    """The labels every object of an Organism carries."""
    return {
        **selector_labels(name, component),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        ORGANISM_LABEL: name,
    }
