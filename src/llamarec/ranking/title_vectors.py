"""Building a ``title_similarity`` ranker: the LLM embeds every catalogue title once.

This is the ranker kind's whole "training" (:mod:`llamarec.ranking.title_similarity` serves
it): one forward pass per title, no labels, a few minutes on a CPU for tens of thousands of
titles. The run directory gets the vectors (safetensors), the config and prompt files every
ranker run has, and ``train_metrics.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llamarec.catalogue import Catalogue
from llamarec.checkpoint import save_tensors
from llamarec.configs import read_json_file
from llamarec.errors import LlamarecError
from llamarec.io import write_json
from llamarec.layout import CATALOGUE_FILE, RANK_TRAIN_METRICS, TITLE_VECTORS_FILE
from llamarec.manifest import record, verify
from llamarec.ranking.config import RankConfig, check_rank_config


def embed_titles(titles: Sequence[str], model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """``[len(titles), hidden]``: each title's mean last-layer hidden state, centred over the
    titles and scaled to unit length; row 0 (the padding item) stays zero.

    Padding never enters a title's mean, so a title's vector does not depend on the batch it
    was embedded in (the supported models' rotary positions do not see the left padding's
    shift). Only the decoder runs: the LM head, a large share of a small model's compute
    (Gemma 3 270M's 262k-token vocabulary), is not needed for hidden states."""
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    out = np.zeros((len(titles), model.config.hidden_size), dtype=np.float32)
    starts = range(1, len(titles), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="title vectors", unit="batch", disable=not progress):
            enc = tokenizer(list(titles[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            hidden = decoder(**enc).last_hidden_state.float()
            weights = enc["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            out[start:start + len(mean)] = mean.cpu().numpy()
    if len(titles) > 1:
        out[1:] -= out[1:].mean(0)
        out[1:] /= np.maximum(np.linalg.norm(out[1:], axis=1, keepdims=True), 1e-9)
    return out


def build_title_ranker(cfg: RankConfig, out: Path, progress: bool = True) -> dict:
    """Embed the retriever run's catalogue into ``out`` (a ranker run of kind
    ``title_similarity``); a finished run with the same config is left as it is."""
    from llamarec.ranking.llm import load_llm

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LlamarecError("a title_similarity ranker is built by one process: run `llamarec rank train` "
                            "without torchrun or accelerate launch")
    out.mkdir(parents=True, exist_ok=True)
    check_rank_config(out, cfg, cfg.prompt_config())
    metrics_path = out / RANK_TRAIN_METRICS
    if metrics_path.is_file() and (out / TITLE_VECTORS_FILE).is_file():
        verify(out, TITLE_VECTORS_FILE, RANK_TRAIN_METRICS)
        return read_json_file(metrics_path)
    verify(cfg.retriever, CATALOGUE_FILE)
    titles = Catalogue.load(cfg.retriever / CATALOGUE_FILE).titles
    started = time.perf_counter()
    model, tokenizer = load_llm(cfg.model, dtype="float32", device=cfg.device, gguf_file=cfg.gguf_file)
    vectors = embed_titles(titles, model, tokenizer, progress=progress)
    seconds = time.perf_counter() - started
    save_tensors(out / TITLE_VECTORS_FILE, {"vectors": torch.from_numpy(vectors)},
                 {"model": cfg.model or "smollm2", "items": len(titles) - 1})
    record(out, out / TITLE_VECTORS_FILE)
    metrics = {"kind": cfg.kind, "model": cfg.model or "smollm2", "items": len(titles) - 1,
               "dim": int(vectors.shape[1]), "max_history": cfg.prompt_config().max_history,
               "similarity_scale": cfg.similarity_scale, "train_seconds": round(seconds, 1)}
    write_json(metrics_path, metrics)
    record(out, metrics_path)
    return metrics
