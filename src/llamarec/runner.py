"""``llamarec run``: raw data to an evaluated two-stage recommender, stage by stage.

Each stage records a key (a hash of its own config and of the stages before it) in
``stages.json`` when it finishes. A rerun skips stages whose key is unchanged, resumes an
interrupted one (the trainers resume from their last checkpoint), and redoes a stage, and
everything after it, whose config changed or that ``--force`` names. Options at their default
values are left out of the keys, so a new option added to llamarec does not redo finished
stages of existing runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from llamarec.configs import read_config_file, read_json_file, validate
from llamarec.errors import LlamarecError
from llamarec.io import write_json, write_text
from llamarec.layout import (
    DATA_STATS,
    EVAL_DIR,
    PIPELINE_CONFIG,
    PIPELINE_METRICS,
    RANK_TRAIN_METRICS,
    RANKER_DIR,
    RETRIEVER_DIR,
    RETRIEVER_METRICS,
    STAGES_FILE,
    STARTED_FILE,
)
from llamarec.manifest import forget, record
from llamarec.ranking.config import RankConfig
from llamarec.retrieval.config import RetrievalConfig

STAGES = ("data", "retriever", "candidates", "ranker", "evaluate", "report")
console = Console(stderr=True)


class CandidateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    k: int = Field(20, ge=1, le=20)
    train_prefixes: int = Field(2000, ge=0)


class EvalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order: Literal["retriever", "shuffled", "average"] = "retriever"
    permutations: int = Field(3, ge=1)
    limit: int | None = Field(None, ge=1)
    calibrate: bool = False


class PipelineConfig(BaseModel):
    """A whole run; ``retriever`` and ``ranker`` hold the options of their stages."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = "ml-100k"
    data_dir: Path | None = None
    retriever: dict[str, Any] = Field(default_factory=dict)
    candidates: CandidateOptions = Field(default_factory=CandidateOptions)
    ranker: dict[str, Any] = Field(default_factory=dict)
    evaluation: EvalOptions = Field(default_factory=EvalOptions)

    def retrieval_config(self) -> RetrievalConfig:
        values = {**self.retriever, "dataset": self.dataset, "data_dir": self.data_dir}
        return validate(RetrievalConfig, values, "config section retriever")

    def rank_config(self, run_dir: Path) -> RankConfig:
        return validate(RankConfig, {**self.ranker, "retriever": run_dir / RETRIEVER_DIR}, "config section ranker")


def preset_path(name: str) -> Path:
    path = Path(str(resources.files("llamarec") / "presets" / f"{name}.yaml"))
    if not path.is_file():
        names = sorted(p.name.removesuffix(".yaml") for p in path.parent.glob("*.yaml"))
        raise LlamarecError(f"unknown preset {name!r}; presets: {', '.join(names)}")
    return path


def load_pipeline_config(path: Path | None, overrides: dict[str, Any]) -> PipelineConfig:
    """A preset or config file (default preset when none), with top-level overrides."""
    path = path or preset_path("default")
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    cfg = validate(PipelineConfig, data, str(path))
    cfg.retrieval_config()  # fail fast on a bad section
    return cfg


class Runner:
    def __init__(self, cfg: PipelineConfig, out: Path, force: set[str] = frozenset(),
                 progress: bool = True) -> None:
        unknown = set(force) - set(STAGES)
        if unknown:
            raise LlamarecError(f"--force {', '.join(sorted(unknown))}: stages are {', '.join(STAGES)}")
        self.cfg, self.out, self.force, self.progress = cfg, out, set(force), progress
        self.rank_cfg = cfg.rank_config(out)

    def _stage_configs(self, omit_defaults: bool = True) -> dict[str, Any]:
        c, opts = self.cfg, {"exclude_defaults": omit_defaults}
        # The preprocessing options the data stage shares with the retriever's config, when set.
        prep = c.retrieval_config().model_dump(include={"min_uc", "min_sc", "ties"}, exclude_defaults=True)
        return {
            "data": {"dataset": c.dataset, "data_dir": str(c.data_dir), **prep},
            "retriever": json.loads(c.retrieval_config().model_dump_json(**opts)),
            "candidates": c.candidates.model_dump(**opts),
            # Not the retriever's path: it only says where the run directory is, and the stages
            # before this one are in the key already.
            "ranker": json.loads(self.rank_cfg.model_dump_json(exclude={"retriever"}, **opts)),
            "evaluate": c.evaluation.model_dump(**opts),
            "report": {},
        }

    def keys(self, omit_defaults: bool = True) -> dict[str, str]:
        keys, previous = {}, ""
        for stage, conf in self._stage_configs(omit_defaults).items():
            previous = hashlib.sha256((previous + json.dumps(conf, sort_keys=True)).encode()).hexdigest()[:16]
            keys[stage] = previous
        return keys

    def _read_keys(self, path: Path) -> dict[str, str]:
        """Stage keys stored in ``path``; keys written before defaults were left out of them
        (the whole config hashed) are read as today's, so such runs are not redone."""
        stored = read_json_file(path) if path.is_file() else {}
        legacy, current = self.keys(omit_defaults=False), self.keys()
        return {stage: current[stage] if legacy.get(stage) == key else key for stage, key in stored.items()}

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(self.out / PIPELINE_CONFIG, yaml.safe_dump(json.loads(self.cfg.model_dump_json()), sort_keys=False))
        state_path = self.out / STAGES_FILE
        done = self._read_keys(state_path)
        started_path = self.out / STARTED_FILE
        # The stage an earlier run was interrupted in, and its key then: resumed if unchanged,
        # started afresh if its config changed since.
        started = self._read_keys(started_path)
        keys, redo = self.keys(), False
        steps: dict[str, Callable[[], str]] = {
            "data": self._data, "retriever": self._retriever, "candidates": self._candidates,
            "ranker": self._ranker, "evaluate": self._evaluate, "report": self._report,
        }
        for stage in STAGES:
            changed = (stage in done and done[stage] != keys[stage]) or started.get(stage, keys[stage]) != keys[stage]
            redo = redo or stage in self.force or changed
            if not redo and done.get(stage) == keys[stage]:
                console.print(f"[green]✓[/] {stage}: up to date (skipped)")
                continue
            if redo:
                # Forget this stage and those after it on disk before any work, so that an
                # interruption cannot leave stages.json vouching for outputs just removed.
                for later in STAGES[STAGES.index(stage):]:
                    self._clear(later)
                    done.pop(later, None)
                write_json(state_path, done)
            done.pop(stage, None)
            write_json(started_path, {stage: keys[stage]})
            start = time.perf_counter()
            summary = steps[stage]()
            console.print(f"[green]✓[/] {stage} ({time.perf_counter() - start:.0f} s): {summary}")
            done[stage] = keys[stage]
            write_json(state_path, done)
            started_path.unlink()
        return read_json_file(self.out / PIPELINE_METRICS)

    def _clear(self, stage: str) -> None:
        """Remove what a stage wrote so it starts afresh (its config changed or was forced)."""
        paths = {"retriever": [self.out / RETRIEVER_DIR], "ranker": [self.out / RANKER_DIR],
                 "evaluate": [self.out / RANKER_DIR / EVAL_DIR, self.out / PIPELINE_METRICS]}.get(stage, [])
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
                forget(path.parent, path)

    # -- stages ---------------------------------------------------------------------------------
    def _data(self) -> str:
        from llamarec.data import load_dataset

        rc = self.cfg.retrieval_config()
        ds = load_dataset(rc.dataset, rc.data_dir, min_uc=rc.min_uc, min_sc=rc.min_sc, ties=rc.ties)
        stats = ds.stats()
        write_json(self.out / DATA_STATS, stats)
        record(self.out, self.out / DATA_STATS)
        return f"{stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions"

    def _retriever(self) -> str:
        from llamarec.retrieval.train import train_retriever

        m = train_retriever(self.cfg.retrieval_config(), self.out / RETRIEVER_DIR, self.progress)
        return (f"test NDCG@10 {m['test']['NDCG@10']:.4f}, Recall@10 {m['test']['Recall@10']:.4f} "
                f"after {m['steps']} steps")

    def _candidates(self) -> str:
        from llamarec.retrieval.candidates import generate_candidates

        c = self.cfg.candidates
        s = generate_candidates(self.out / RETRIEVER_DIR, k=c.k, train_prefixes=c.train_prefixes)
        return f"top-{c.k}: test valid subset {s['test']['valid_subset']} of {s['test']['users']} users"

    def _ranker(self) -> str:
        from llamarec.ranking.finetune import finetune_ranker

        m = finetune_ranker(self.rank_cfg, self.out / RANKER_DIR, self.progress)
        if self.rank_cfg.kind == "title_similarity":
            return f"{m['items']:,} title vectors of {m['dim']} dimensions ({m['train_seconds']:.0f} s)"
        return (f"val NDCG@10 {m['history'][0]['NDCG@10']:.4f} zero-shot -> {m['best_val_NDCG@10']:.4f} "
                f"(best step {m['best_step']} of {m['steps']})")

    def _evaluate(self) -> str:
        from llamarec.ranking.evaluate import evaluate_ranker

        e = self.cfg.evaluation
        results = evaluate_ranker(self.out / RANKER_DIR, order=e.order, permutations=e.permutations,
                                  limit=e.limit, out=self.out / RANKER_DIR / EVAL_DIR,
                                  calibrate=e.calibrate)
        metrics = {
            "data": read_json_file(self.out / DATA_STATS),
            "retriever": read_json_file(self.out / RETRIEVER_DIR / RETRIEVER_METRICS),
            "ranker_training": read_json_file(self.out / RANKER_DIR / RANK_TRAIN_METRICS),
            "ranker": results,
        }
        write_json(self.out / PIPELINE_METRICS, metrics)
        record(self.out, self.out / PIPELINE_METRICS)
        t = results["test"]["overall"]
        return ("test overall NDCG@10 retriever {:.4f}, ranker {:.4f}, fusion {:.4f}".format(
            t["retriever"]["NDCG@10"], t["ranker"]["NDCG@10"], t["fusion"]["NDCG@10"]))

    def _report(self) -> str:
        from llamarec.report import write_report

        path = write_report(self.out)
        return f"{path}"


def run_pipeline(cfg: PipelineConfig, out: Path, force: set[str] = frozenset(), progress: bool = True) -> dict:
    return Runner(cfg, out, force, progress).run()
