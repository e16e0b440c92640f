"""The Ray Data engine of batch scoring (``llamarec score --engine ray``); needs the ray extra.

The planned batches (see :mod:`llamarec.score`) become the rows of a Ray dataset; a callable
class loads the :class:`~llamarec.pipeline.Recommender` from the run directory once per actor
(the models are never shipped inside tasks) and scores one batch per call with
:func:`~llamarec.score.score_batch`. The driver streams the results back and hands each shard,
once all its users are in, to the same writer as the local engine, so the manifest, the resume
and the table are the same whichever engine ran.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from llamarec.errors import LlamarecError
from llamarec.score import Shard, assemble, load_recommender, score_batch

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
    except ConnectionError as exc:
        raise LlamarecError(f"ray address {address!r}: cannot connect ({' '.join(str(exc).split())[:200]})") from None
    return True


def run_ray(run_dir: Path, todo: list[Shard], sink, *, k: int, batch_size: int, device: str, workers: int,
            address: str | None) -> None:
    started = connect(workers, address)
    import ray

    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        rows = [{"shard": s.index, "positions": batch, "user_ids": [s.user_ids[i] for i in batch],
                 "histories": json.dumps([s.histories[i] for i in batch], default=str, ensure_ascii=False)}
                for s in todo for batch in s.batches]
        # Blocks of about 16 batches: every actor gets work, and results (so shards) come back as they are done.
        n_blocks = max(min(len(rows), 4 * workers), len(rows) // 16)
        blocks = [pd.DataFrame(rows[b * len(rows) // n_blocks:(b + 1) * len(rows) // n_blocks])
                  for b in range(n_blocks)]
        gpus = 1 if device.startswith("cuda") else 0
        results = ray.data.from_pandas(blocks).map_batches(
            BatchScorer, batch_size=1, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus,
            fn_constructor_kwargs={"run_dir": str(run_dir.resolve()), "device": "cuda" if gpus else device,
                                   "k": k, "batch_size": batch_size, "threads": 1})
        by_index = {s.index: s for s in todo}
        pending: dict[int, list[pd.DataFrame]] = {s.index: [] for s in todo}
        seen: dict[int, set] = {s.index: set() for s in todo}
        for frame in results.iter_batches(batch_size=None, batch_format="pandas"):
            for index, part in frame.groupby("shard", sort=False):
                pending[index].append(part.drop(columns="shard"))
                seen[index].update(part["pos"].tolist())
                if len(seen[index]) == len(by_index[index].user_ids):
                    sink.put(by_index[index], *assemble(pending.pop(index)))
    except ray.exceptions.RayError as exc:
        if os.environ.get("LLAMAREC_DEBUG"):
            raise
        raise LlamarecError(_last_line(exc)) from None
    finally:
        if started:
            ray.shutdown()
    if pending:
        raise LlamarecError(f"ray returned no results for shard(s) {', '.join(map(str, sorted(pending)))}")
