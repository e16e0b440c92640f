"""Fixtures shared by every test: an isolated cache per test and the real datasets, if present."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:  # the tiny-world fixtures import torch/transformers lazily, when first used
    from llamarec.data import Dataset
    from llamarec.ranking.config import RankConfig
    from llamarec.retrieval.config import RetrievalConfig

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def llamarec_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``LLAMAREC_CACHE`` at a fresh directory so no test sees another's cache (or ~)."""
    cache = tmp_path_factory.mktemp("llamarec-cache")
    monkeypatch.setenv("LLAMAREC_CACHE", str(cache))
    monkeypatch.delenv("LLAMAREC_DEBUG", raising=False)
    return cache


@pytest.fixture
def shared_data() -> Path:
    """The read-only real datasets next to the repository (``../shared/data``); skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not available at {SHARED_DATA}")
    return SHARED_DATA


# --------------------------------------------------------------------------- the tiny world
# A custom dataset small enough to train a retriever and fine-tune a ranker in seconds:
# 26 users walk through the items in order (item i is followed by i + 1, a pattern the
# retriever learns), 10 users consume random items (so some targets miss the candidates).
# Session fixtures build it once; tests must treat what they return as read-only.

TINY_ITEMS, TINY_PATTERN_USERS, TINY_RANDOM_USERS = 48, 26, 10


def tiny_world_sequences() -> dict[str, list[int]]:
    """Raw user id -> raw item ids in order (8 to 15 items each, no repeats)."""
    out = {}
    for u in range(TINY_PATTERN_USERS + TINY_RANDOM_USERS):
        n = 8 + u % 8
        if u < TINY_PATTERN_USERS:
            items = [(u * 7 + p) % TINY_ITEMS + 1 for p in range(n)]
        else:
            items = (np.random.default_rng(u).permutation(TINY_ITEMS)[:n] + 1).tolist()
        out[str(u + 1)] = items
    return out


def write_tiny_world(root: Path, sequences: dict[str, list[int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["user_id,item_id,timestamp"]
    lines += [f"{u},{i},{1000 + p}" for u, items in sequences.items() for p, i in enumerate(items)]
    (root / "interactions.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    titles = ["item_id,title"] + [f"{i},Item {i}" for i in range(1, TINY_ITEMS + 1)]
    (root / "items.csv").write_text("\n".join(titles) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``LLAMAREC_CACHE`` for session fixtures (they run before the per-test isolation)."""
    return tmp_path_factory.mktemp("llamarec-session-cache")


@pytest.fixture(scope="session")
def make_tiny_world() -> Callable[..., Path]:
    """``make(root, edit=None)``: write the tiny world's CSV files into ``root``, after
    ``edit(sequences)`` changed its raw sequences (user id -> item ids) if given."""

    def make(root: Path, edit: Callable[[dict[str, list[int]]], None] | None = None) -> Path:
        sequences = tiny_world_sequences()
        if edit is not None:
            edit(sequences)
        return write_tiny_world(root, sequences)

    return make


@pytest.fixture(scope="session")
def tiny_data_dir(make_tiny_world, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_world(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_retrieval_config(tiny_data_dir: Path) -> Callable[..., RetrievalConfig]:
    """``make(**overrides)``: a small LRU config on the tiny world (10 steps, 3 validations)."""

    from llamarec.retrieval.config import RetrievalConfig

    def make(**overrides) -> RetrievalConfig:
        values = dict(dataset="custom", data_dir=tiny_data_dir, hidden=8, n_blocks=1, n_heads=1,
                      max_len=10, batch_size=8, max_epochs=2, eval_every=3, patience=50)
        return RetrievalConfig(**{**values, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_dataset(tiny_retrieval_config, session_cache: Path) -> Dataset:
    from llamarec.data import load_dataset

    cfg = tiny_retrieval_config()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAREC_CACHE", str(session_cache))
        ds = load_dataset(cfg.dataset, cfg.data_dir, min_uc=cfg.min_uc, min_sc=cfg.min_sc)
    assert (ds.n_users, ds.n_items) == (TINY_PATTERN_USERS + TINY_RANDOM_USERS, TINY_ITEMS)
    return ds


@pytest.fixture(scope="session")
def tiny_retriever_run(tiny_retrieval_config, tiny_dataset: Dataset, session_cache: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished retriever run with 20 candidates per user and 50 training prefixes."""
    from llamarec.retrieval.candidates import generate_candidates
    from llamarec.retrieval.train import train_retriever

    out = tmp_path_factory.mktemp("tiny-retriever") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAREC_CACHE", str(session_cache))
        train_retriever(tiny_retrieval_config(), out, progress=False)
        generate_candidates(out, k=20, train_prefixes=50)
    return out


@pytest.fixture(scope="session")
def _tiny_llm_store() -> dict:
    return {}


@pytest.fixture
def tiny_llm_dir(_tiny_llm_store: dict, char_tokenizer, make_tiny_llama,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and its character tokenizer saved like a hub checkpoint; built once.

    Only for tests under ``tests/ranking`` (whose conftest provides the two builders); it is
    function-scoped for that reason and caches its result for the session."""
    if "llm" not in _tiny_llm_store:
        path = tmp_path_factory.mktemp("tiny-llm")
        make_tiny_llama(len(char_tokenizer)).save_pretrained(path)
        char_tokenizer.save_pretrained(path)
        _tiny_llm_store["llm"] = path
    return _tiny_llm_store["llm"]


@pytest.fixture
def tiny_rank_config(tiny_retriever_run: Path, tiny_llm_dir: Path) -> Callable[..., RankConfig]:
    """``make(**overrides)``: ranker config on the tiny world (8 examples = 2 steps of 4)."""

    from llamarec.ranking.config import RankConfig

    def make(**overrides) -> RankConfig:
        values = dict(retriever=tiny_retriever_run, model=str(tiny_llm_dir), device="cpu",
                      max_examples=8, batch_size=4, eval_every=1, val_users=4, dtype="float32",
                      autocast_bf16=False, eval_batch_size=4, target_modules=["q_proj", "v_proj"],
                      lr=1e-2, warmup_steps=0)
        return RankConfig(**{**values, **overrides})

    return make


@pytest.fixture
def tiny_rank_run(_tiny_llm_store: dict, tiny_rank_config, session_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ranker run of ``tiny_rank_config()``; built once, read-only."""
    from llamarec.ranking.finetune import finetune_ranker

    if "run" not in _tiny_llm_store:
        out = tmp_path_factory.mktemp("tiny-ranker") / "rank"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LLAMAREC_CACHE", str(session_cache))
            finetune_ranker(tiny_rank_config(), out, progress=False)
        _tiny_llm_store["run"] = out
    return _tiny_llm_store["run"]


# --------------------------------------------------------------------------- tiny pipeline runs
# ``llamarec run`` on the tiny world: the same tiny Llama as ``tiny_llm_dir`` (usable outside
# tests/ranking), a pipeline config whose stages take seconds, and one finished run.


@pytest.fixture(scope="session")
def tiny_llm_path(_tiny_llm_store: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama of ``tiny_llm_dir`` saved in a folder, for any test; built once."""
    if "llm" not in _tiny_llm_store:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_llamarec_tiny_llm_builders", Path(__file__).parent / "ranking" / "conftest.py")
        builders = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builders)
        tokenizer = builders.build_char_tokenizer()
        path = tmp_path_factory.mktemp("tiny-llm")
        builders.build_tiny_llama(len(tokenizer)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        _tiny_llm_store["llm"] = path
    return _tiny_llm_store["llm"]


@pytest.fixture(scope="session")
def tiny_pipeline_values(tiny_data_dir: Path, tiny_llm_path: Path) -> Callable[..., dict]:
    """``make(**sections)``: the tiny pipeline config as plain data (what a YAML file holds);
    a dict given for a section updates that section's options, anything else replaces it."""

    def make(**sections) -> dict:
        values = {
            "dataset": "custom",
            "data_dir": str(tiny_data_dir),
            "retriever": {"model": "lru", "hidden": 8, "n_blocks": 1, "max_len": 10, "batch_size": 8,
                          "max_epochs": 2, "eval_every": 3},
            "candidates": {"k": 20, "train_prefixes": 30},
            "ranker": {"model": str(tiny_llm_path), "device": "cpu", "max_examples": 8, "batch_size": 4,
                       "eval_every": 1, "val_users": 4, "dtype": "float32", "autocast_bf16": False,
                       "eval_batch_size": 4, "target_modules": ["q_proj", "v_proj"], "lr": 1e-2,
                       "warmup_steps": 0},
            "evaluation": {"limit": 4},
        }
        for name, section in sections.items():
            current = values.get(name)
            values[name] = {**current, **section} if isinstance(current, dict) and isinstance(section, dict) \
                else section
        return values

    return make


@pytest.fixture(scope="session")
def tiny_pipeline_run(tiny_pipeline_values, session_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``llamarec run`` of ``tiny_pipeline_values()`` (all six stages); read-only:
    copy it with ``copy_tiny_run`` to change it."""
    from llamarec.runner import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("tiny-pipeline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMAREC_CACHE", str(session_cache))
        run_pipeline(PipelineConfig.model_validate(tiny_pipeline_values()), out, progress=False)
    return out


@pytest.fixture
def copy_tiny_run(tiny_pipeline_run: Path, tmp_path: Path) -> Callable[..., Path]:
    """``copy(name="run")``: a private copy of ``tiny_pipeline_run`` under the test's tmp_path."""
    import shutil

    def copy(name: str = "run") -> Path:
        return Path(shutil.copytree(tiny_pipeline_run, tmp_path / name))

    return copy


@pytest.fixture
def run_llamarec():
    """Run the installed ``llamarec`` console script (LLAMAREC_DEBUG unset) and return the result."""
    import os
    import shutil
    import subprocess
    import sys

    script = Path(sys.executable).parent / "llamarec"
    found = str(script) if script.is_file() else shutil.which("llamarec")
    if found is None:
        pytest.skip("the llamarec console script is not installed")

    def run(*args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LLAMAREC_DEBUG"} | env_extra
        return subprocess.run([found, *args], capture_output=True, text=True, env=env, timeout=120)

    return run
