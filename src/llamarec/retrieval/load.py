"""Loading a trained retriever for inference: weights and shape from the run alone.

Nothing here reads the dataset, so a run directory that was copied elsewhere loads as is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from llamarec.checkpoint import load_tensors
from llamarec.configs import read_json_file, validate
from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError
from llamarec.layout import RETRIEVER_CONFIG, RETRIEVER_MODEL
from llamarec.manifest import verify
from llamarec.retrieval.config import RetrievalConfig
from llamarec.retrieval.models import RetrieverConfig, SequentialRecommender, build_model

logger = logging.getLogger(__name__)


def read_retrieval_config(run_dir: Path) -> tuple[RetrievalConfig, RetrieverConfig]:
    """The training options and the model shape saved in a retriever run's config file."""
    path = run_dir / RETRIEVER_CONFIG
    if not path.is_file():
        raise LlamarecError(f"{run_dir}: not a retriever run ({RETRIEVER_CONFIG} missing)")
    verify(run_dir, RETRIEVER_CONFIG)
    saved = read_json_file(path)
    for key in ("train", "model"):
        if not isinstance(saved.get(key), dict):
            raise LlamarecError(f"{path}: not a valid retriever config (no {key!r} section)")
    train = validate(RetrievalConfig, saved["train"], f"{path}: train")
    try:
        return train, RetrieverConfig.from_dict(saved["model"])
    except (ValueError, TypeError) as exc:
        raise LlamarecError(f"{path}: not a valid retriever config ({' '.join(str(exc).split())[:200]})") from None
    except LlamarecError as exc:
        raise LlamarecError(f"{path}: {exc}") from None


def load_retriever_model(run_dir: Path, device: str = "cpu",
                         dtype: torch.dtype | None = None) -> tuple[SequentialRecommender, RetrievalConfig]:
    """The best model of a retriever run on ``device`` (optionally cast to ``dtype``), with its config."""
    cfg, shape = read_retrieval_config(run_dir)
    verify(run_dir, RETRIEVER_MODEL)
    tensors, _ = load_tensors(run_dir / RETRIEVER_MODEL)
    _check_shapes(run_dir, cfg.model, shape, tensors)
    model = build_model(cfg.model, shape)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise LlamarecError(f"{run_dir / RETRIEVER_MODEL}: weights do not fit the model in "
                            f"{RETRIEVER_CONFIG} ({str(exc).splitlines()[0]})") from None
    model = model.to(resolve_device(device)).eval()
    if dtype is not None and dtype != torch.float32:
        model = _cast(model, dtype, cfg.model)
    return model, cfg


def _check_shapes(run_dir: Path, name: str, shape: RetrieverConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The weights must have the shapes of the model the config describes; checked on the meta
    device, so that an edited config (say a huge n_items) allocates nothing."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(name, shape).state_dict().items()}
    except (ValueError, RuntimeError, TypeError) as exc:
        raise LlamarecError(f"{run_dir / RETRIEVER_CONFIG}: cannot build the {name} model it describes "
                            f"({' '.join(str(exc).split())[:200]})") from None
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        key = min(k for k in expected.keys() | got.keys() if got.get(k) != expected.get(k))
        raise LlamarecError(f"{run_dir / RETRIEVER_MODEL}: weights do not fit the model in {RETRIEVER_CONFIG} "
                            f"({key}: {got.get(key, 'missing')} in the file, {expected.get(key, 'not in the model')} "
                            "in the model)")


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
