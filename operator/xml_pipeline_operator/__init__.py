"""xml-pipeline's Kubernetes operator for `Organism` custom resources (kopf).

Public surface: the API coordinates below. Everything else is internal, by layer: `settings`
(environment), `model` (typed spec + validation), `desired` (pure builders), `apply` (diff + patch),
`status` (conditions), `handlers` (kopf registrations), `redis_admin` (shared-Redis seam).
"""
from __future__ import annotations

GROUP = "xml-pipeline.dev"
VERSION = "v1alpha1"
KIND = "Organism"
PLURAL = "organisms"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION"]
