"""xml-pipeline's Kubernetes operator for `Organism` custom resources (kopf).

Public surface: the API coordinates below. Everything else is internal, by layer: `settings`
(environment), `model` (typed spec + validation), `desired` (pure builders), `apply` (diff + patch),
`status` (conditions), `handlers` (kopf registrations), `redis_admin` (shared-Redis seam).
"""
from __future__ import annotations

from xml_pipeline.contract import API_VERSION, GROUP, KIND, PLURAL, VERSION

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION"]
