"""Names and labels of everything the operator creates for an Organism (the contract's labels;
pods, the chart and tests find the objects by these names)."""
from __future__ import annotations

from typing import Literal

from xml_pipeline.contract import CONFIG_DIR as CONFIG_DIR
from xml_pipeline.contract import CONFIG_PATH as CONFIG_PATH
from xml_pipeline.contract import (APP_NAME, CONFIG_FILE, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME,
                                   LABEL_CLIENT, LABEL_ORGANISM, LABEL_REDIS_CLIENT, MANAGED_BY)

Component = Literal["pump", "worker", "redis", "config", "credentials", "binding"]

ORGANISM_LABEL = LABEL_ORGANISM
#: Pod label `<label>: <organism name>` that lets a pod of the namespace reach the organism's
#: dedicated Redis through its NetworkPolicy besides the pump and workers (debugging, an exporter).
REDIS_CLIENT_LABEL = LABEL_REDIS_CLIENT
#: Pod label `<label>: <organism name>` of the organism's client pods (the injection webhook configures
#: them; a dedicated Redis's NetworkPolicy admits them). docs/clients.md.
CLIENT_LABEL = LABEL_CLIENT
CONFIG_HASH_ANNOTATION = "xml-pipeline.dev/config-hash"
#: Pod-template annotation in shared mode: HMAC of the password the pods read (rotation.py).
CREDENTIALS_DIGEST_ANNOTATION = "xml-pipeline.dev/credentials-digest"
#: The ConfigMap key of organism.yaml (the file name under CONFIG_DIR).
CONFIG_KEY = CONFIG_FILE
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
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: component,
    }


def labels(name: str, component: Component) -> dict[str, str]:
    """The labels every object of an Organism carries."""
    return {
        **selector_labels(name, component),
        LABEL_MANAGED_BY: MANAGED_BY,
        ORGANISM_LABEL: name,
    }
