"""Retrieval models; importing a model module registers it in :data:`MODELS`."""

from . import bert4rec, lru, narm, sasrec  # noqa: F401  (imported to register the models)
from .base import (
    MODELS,
    RetrieverConfig,
    SequentialRecommender,
    build_model,
    register_model,
)

__all__ = ["MODELS", "RetrieverConfig", "SequentialRecommender", "build_model", "register_model"]
