"""Loading a trained retriever for inference: weights and shape from the run alone.

Nothing here reads the dataset, so a run directory that was copied elsewhere loads as is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llamarec.checkpoint import load_tensors
from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError
from llamarec.layout import RETRIEVER_CONFIG, RETRIEVER_MODEL
from llamarec.retrieval.config import RetrievalConfig
from llamarec.retrieval.models import RetrieverConfig, SequentialRecommender, build_model

logger = logging.getLogger(__name__)


def read_retrieval_config(run_dir: Path) -> tuple[RetrievalConfig, RetrieverConfig]:
    """The training options and the model shape saved in a retriever run's config file."""
    path = run_dir / RETRIEVER_CONFIG
    if not path.is_file():
        raise LlamarecError(f"{run_dir}: not a retriever run ({RETRIEVER_CONFIG} missing)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return RetrievalConfig.model_validate(saved["train"]), RetrieverConfig.from_dict(saved["model"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LlamarecError(f"{path}: not a valid retriever config ({' '.join(str(exc).split())[:200]})") from None


def load_retriever_model(run_dir: Path, device: str = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[SequentialRecommender, RetrievalConfig]:
    """The best model of a retriever run on ``device`` (optionally cast to ``dtype``), with its config."""
    cfg, shape = read_retrieval_config(run_dir)
    model = build_model(cfg.model, shape)
    tensors, _ = load_tensors(run_dir / RETRIEVER_MODEL)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise LlamarecError(f"{run_dir / RETRIEVER_MODEL}: weights do not fit the model in "
                            f"{RETRIEVER_CONFIG} ({str(exc).splitlines()[0]})") from None
    model = model.to(resolve_device(device)).eval()
    if dtype is not None and dtype != torch.float32:
        model = _cast(model, dtype, cfg.model)
    return model, cfg


def _cast(model: SequentialRecommender, dtype: torch.dtype, name: str) -> SequentialRecommender:
    """``model`` in ``dtype`` if it can score in it; otherwise (LRURec's complex recurrence has
    no bfloat16/float16 kernels) it stays in float32, and the log says so."""
    probe = torch.ones(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.inference_mode():
            model.to(dtype).score_last(probe)
        return model
    except RuntimeError:
        logger.warning("the %s retriever cannot run in %s here; it stays in float32", name,
                       str(dtype).removeprefix("torch."))
        return model.float()
