"""Datasets: raw loaders, the paper's preprocessing, the leave-one-out split and a safe cache."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from llamarec.data.dataset import FORMAT_VERSION, Dataset
from llamarec.data.preprocess import check_ties, preprocess
from llamarec.data.registry import DATASETS, get_spec, locate
from llamarec.errors import LlamarecError
from llamarec.fetch import cache_dir, sha256_of

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "Dataset", "load_dataset", "load_run_dataset", "processed_dir"]

# Bump when preprocessing changes what it produces, so old caches are not reused.
PREPROCESS_VERSION = 2


def processed_dir(name: str, data_dir: Path | None = None, *, min_uc: int = 5,
                  min_sc: int = 5, ties: str = "item") -> tuple[Path, Path]:
    """Where the processed dataset is cached, keyed by the raw files' checksums and the
    parameters; also returns the raw directory used. (``ties`` enters the key only when it is
    not the default, so caches made before it existed stay valid.)"""
    spec = get_spec(name)
    root, fmt = locate(spec, data_dir)
    key = json.dumps({
        "name": name, "files": {f: sha256_of(root / f) for f in fmt.files},
        "min_uc": min_uc, "min_sc": min_sc, **({"ties": ties} if ties != "item" else {}),
        "preprocess": PREPROCESS_VERSION, "format": FORMAT_VERSION,
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "processed" / f"{name}-{digest}", root


def load_dataset(name: str, data_dir: str | Path | None = None, *, min_uc: int = 5,
                 min_sc: int = 5, ties: str = "item") -> Dataset:
    """Load a dataset by name, preparing and caching it on first use (``ties``: see
    :data:`~llamarec.data.preprocess.TIES`)."""
    data_dir = Path(data_dir) if data_dir is not None else None
    check_ties(ties)  # before the raw files are hashed for the cache key
    cached, root = processed_dir(name, data_dir, min_uc=min_uc, min_sc=min_sc, ties=ties)
    if (cached / "meta.json").is_file():
        try:
            return Dataset.load(cached)
        except LlamarecError as exc:  # a damaged cache entry is rebuilt from the raw files
            logger.warning("rebuilding the processed dataset: %s", exc)
    _, fmt = locate(get_spec(name), root)
    ds = preprocess(fmt.read(root), name, min_uc=min_uc, min_sc=min_sc, ties=ties)
    ds.params["raw_dir"] = str(root)
    ds.save(cached)
    return ds


def load_run_dataset(retriever_dir: str | Path) -> Dataset:
    """The dataset a retriever run was trained on, as its config file names it."""
    from llamarec.layout import RETRIEVER_CONFIG
    from llamarec.manifest import verify

    path = Path(retriever_dir) / RETRIEVER_CONFIG
    verify(Path(retriever_dir), RETRIEVER_CONFIG)
    try:
        train = json.loads(path.read_text(encoding="utf-8"))["train"]
        return load_dataset(train["dataset"], train.get("data_dir"), min_uc=train.get("min_uc", 5),
                            min_sc=train.get("min_sc", 5), ties=train.get("ties", "item"))
    except FileNotFoundError:
        raise LlamarecError(f"{retriever_dir}: not a retriever run ({RETRIEVER_CONFIG} missing)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise LlamarecError(f"{path}: cannot tell the dataset ({' '.join(str(exc).split())[:200]})") from None
