"""The Ray Data engine of batch scoring (``llamarec score --engine ray``); needs the ray extra.

The planned batches (see :mod:`llamarec.score`) become the rows of a Ray dataset; a callable
class loads the :class:`~llamarec.pipeline.Recommender` from the run directory once per actor
(the models are never shipped inside tasks) and scores one batch per call with
:func:`~llamarec.score.score_batch`. The driver streams the results back and hands each shard,
once all its users are in, to the same writer as the local engine, so the manifest, the resume
and the table are the same whichever engine ran.

``rank evaluate --engine ray`` uses the same machinery (:func:`rerank_ray`): the evaluation's
planned chunks of users are the rows, and :class:`ExampleScorer` loads the ranker from the
ranker run directory once per actor and returns its letter scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from llamarec.errors import LlamarecError
from llamarec.score import Shard, assemble, load_recommender, score_batch

if TYPE_CHECKING:
    import torch

    from llamarec.ranking.scoring import ScoringConfig

logger = logging.getLogger(__name__)


class BatchScorer:
    """Ray Data callable class: one Recommender per actor, one planned batch per call."""

    def __init__(self, run_dir: str, device: str, k: int, batch_size: int, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.rec = load_recommender(Path(run_dir), device, batch_size)
        self.k = k

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = []
        for shard, positions, users, histories in zip(batch["shard"], batch["positions"], batch["user_ids"],
                                                      batch["histories"]):
            frame = score_batch(self.rec, list(users), json.loads(histories), self.k)
            frame["pos"] = np.asarray(positions, dtype=np.int64)[frame["pos"].to_numpy()]
            frame.insert(0, "shard", int(shard))
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def _last_line(exc: Exception) -> str:
    """The error a worker raised, in one line: the last line of Ray's report (its traceback's)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    prefix = "llamarec.errors.LlamarecError: "
    return last[len(prefix):] if last.startswith(prefix) else f"a ray worker failed: {last}"[:300]


def connect(workers: int, address: str | None) -> bool:
    """Join the cluster of ``address`` (or ``RAY_ADDRESS``), or start a local one with ``workers``
    CPUs; an already initialised Ray is used as it is. True when this call started Ray."""
    try:
        import ray
    except ImportError:
        raise LlamarecError('the ray engine needs the ray extra: pip install -e ".[ray]"') from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    # AuthenticationError is new in Ray 2.52; on older versions a refused connection is a ConnectionError
    except (ConnectionError, getattr(ray.exceptions, "AuthenticationError", ConnectionError)) as exc:
        raise LlamarecError(f"ray address {address!r}: cannot connect ({' '.join(str(exc).split())[:200]})"
                            f"{_auth_hint(exc)}") from None
    return True


def _auth_hint(exc: Exception) -> str:
    """Ray (2.60) starts clusters with token authentication, but a client given an address (not
    ``auto``) sends a token only when told to: say so when that is why the connection failed."""
    if "AuthToken" in f"{exc} {exc.__cause__}" or "authentication token" in str(exc):
        return ("; the cluster asks for a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "~/.ray/auth_token) to the cluster's")
    return ""


@contextlib.contextmanager
def session(workers: int, address: str | None) -> Iterator[None]:
    """Ray for the duration of the block (see :func:`connect`), shut down after when started
    here; an error raised on a worker becomes one line. Nested sessions share the outer one."""
    started = connect(workers, address)
    import ray

    try:
        yield
    except ray.exceptions.RayError as exc:
        if os.environ.get("LLAMAREC_DEBUG"):
            raise
        raise LlamarecError(_last_line(exc)) from None
    except _execution_timeout() as exc:  # e.g. actors asking for GPUs the cluster does not have
        raise LlamarecError(f"ray: {' '.join(str(exc).split())[:300]}") from None
    finally:
        if started:
            ray.shutdown()


def actor_device(device: str, workers: int) -> str:
    """The device of the actors, decided by the cluster, not the driver: ``auto`` is ``cuda``
    when the cluster has GPUs and ``cpu`` otherwise (so a driver without a GPU does not send
    CPU work to a GPU cluster, nor one with a GPU ask a CPU cluster for GPUs). ``cuda`` (any
    index: each actor gets its own GPU) needs a GPU per worker, else the actors would wait for
    resources that never come."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda"):
        if gpus < workers:
            raise LlamarecError(f"device {device}: the ray cluster has {gpus} GPU(s) for {workers} worker(s); "
                                "use fewer workers, more GPUs or device cpu")
        return "cuda"
    return device


def _execution_timeout() -> type[Exception] | tuple[()]:
    """Ray Data's timeout error (a plain Exception, not a RayError), where this Ray has one."""
    try:
        from ray.data.exceptions import ExecutionTimeoutError
    except ImportError:
        return ()  # an except clause of () catches nothing
    return ExecutionTimeoutError


def on_actors(rows: list[dict], fn: type, kwargs: dict, workers: int, gpus: int):
    """A Ray dataset of ``rows`` (one unit of work each) mapped by ``fn``, a callable class built
    once per actor with ``kwargs``, on a pool of ``workers`` actors of one CPU (and ``gpus`` GPUs)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    # Blocks of about 16 rows: every actor gets work, and results come back as they are done.
    n_blocks = max(min(len(rows), 4 * workers), len(rows) // 16)
    blocks = [pd.DataFrame(rows[b * len(rows) // n_blocks:(b + 1) * len(rows) // n_blocks]) for b in range(n_blocks)]
    return ray.data.from_pandas(blocks).map_batches(
        fn, batch_size=1, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
        num_gpus=gpus, fn_constructor_kwargs=kwargs)


def run_ray(run_dir: Path, todo: list[Shard], sink, *, k: int, batch_size: int, device: str, workers: int,
            address: str | None) -> None:
    rows = [{"shard": s.index, "positions": batch, "user_ids": [s.user_ids[i] for i in batch],
             "histories": json.dumps([s.histories[i] for i in batch], default=str, ensure_ascii=False)}
            for s in todo for batch in s.batches]
    by_index = {s.index: s for s in todo}
    pending: dict[int, list[pd.DataFrame]] = {s.index: [] for s in todo}
    seen: dict[int, set] = {s.index: set() for s in todo}
    with session(workers, address):
        device = actor_device(device, workers)
        gpus = 1 if device == "cuda" else 0
        kwargs = {"run_dir": str(run_dir.resolve()), "device": device, "k": k, "batch_size": batch_size,
                  "threads": 1}
        results = on_actors(rows, BatchScorer, kwargs, workers, gpus)
        for frame in results.iter_batches(batch_size=None, batch_format="pandas"):
            for index, part in frame.groupby("shard", sort=False):
                pending[index].append(part.drop(columns="shard"))
                seen[index].update(part["pos"].tolist())
                if len(seen[index]) == len(by_index[index].user_ids):
                    sink.put(by_index[index], *assemble(pending.pop(index)))
    if pending:
        raise LlamarecError(f"ray returned no results for shard(s) {', '.join(map(str, sorted(pending)))}")


# --------------------------------------------------------------------------- rank evaluate
class ExampleScorer:
    """Ray Data callable class of ``rank evaluate --engine ray``: one ranker per actor, loaded
    from the ranker run directory; the letter scores of one planned chunk of users per call,
    through :func:`~llamarec.ranking.evaluate.rerank_chunk` like the local engine."""

    def __init__(self, rank_dir: str, titles: list[str], zero_shot: bool, dtype: str | None, device: str,
                 scoring: dict, threads: int) -> None:
        import torch

        from llamarec.ranking.ranker import load_ranker
        from llamarec.ranking.scoring import ScoringConfig

        torch.set_num_threads(threads)
        self.ranker = load_ranker(Path(rank_dir), titles, zero_shot=zero_shot, device=device, dtype=dtype)
        self.scoring = ScoringConfig.model_validate(scoring)
        self.dtype = self.ranker.dtype_name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from llamarec.ranking.evaluate import rerank_chunk

        frames = []
        for positions, examples in zip(batch["positions"], batch["examples"]):
            scores = rerank_chunk(self.ranker, json.loads(examples), self.scoring).numpy()
            frames.append(pd.DataFrame({"pos": np.asarray(positions, dtype=np.int64), "scores": list(scores),
                                        "dtype": self.dtype}))
        return pd.concat(frames, ignore_index=True)


def rerank_ray(rank_dir: Path, examples: Sequence[tuple[list[int], list[int], list[float]]],
               chunks: list[list[int]], scoring: ScoringConfig, *, titles: Sequence[str], zero_shot: bool,
               dtype: str | None, device: str, workers: int, address: str | None = None) -> tuple[torch.Tensor, str]:
    """The ranker's letter scores ``[len(examples), n]`` of ``(history, candidates, retriever
    scores)`` examples, in input order, each of ``chunks`` (positions in ``examples``) reranked
    in one call of an actor; and the dtype the ranker ran in. ``titles`` are the item titles the
    prompts show (data, shipped once per actor; the models are read from ``rank_dir``)."""
    import torch

    rows = [{"positions": chunk, "examples": json.dumps([examples[i] for i in chunk])} for chunk in chunks]
    with session(workers, address):
        device = actor_device(device, workers)
        gpus = 1 if device == "cuda" else 0
        kwargs = {"rank_dir": str(Path(rank_dir).resolve()), "titles": list(titles), "zero_shot": zero_shot,
                  "dtype": dtype, "device": device, "scoring": scoring.model_dump(), "threads": 1}
        frame = pd.concat(list(on_actors(rows, ExampleScorer, kwargs, workers, gpus).iter_batches(
            batch_size=None, batch_format="pandas")), ignore_index=True)
    if sorted(frame["pos"].tolist()) != list(range(len(examples))):
        raise LlamarecError(f"ray returned the scores of {frame['pos'].nunique()} of {len(examples)} users")
    scores = np.empty((len(examples), len(frame["scores"].iloc[0])), dtype=np.float32)
    scores[frame["pos"].to_numpy()] = np.stack(frame["scores"].to_numpy())
    return torch.from_numpy(scores), str(frame["dtype"].iloc[0])
