"""Batch scoring speed: users per second of ``llamarec score`` for the local engine and for
Ray with 1 and 2 workers, one torch thread each.

    python benchmarks/score.py --run RUN [--limit 200] [--repeat 1] [--batch-size B] [--device cpu] [--json]

The run is copied (weights, catalogue and configs only) into a temporary directory, so nothing
is written inside RUN. The histories are the first ``--limit`` users of the run's dataset (all
of them without ``--limit``), each ``--repeat`` times. Each engine scores them twice, a single batch and then all of
them, both into a fresh output directory (shards, manifest and all): ``users/s`` is the rate
over the whole call, ``steady users/s`` excludes the start-up (loading the models, starting Ray
and its actors), taken as the difference between the two calls; ``startup s`` is what is left.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llamarec.score import _run_settings, read_histories, score

CONFIGS = [("local", 1), ("ray", 1), ("ray", 2)]
SKIP = shutil.ignore_patterns("last", "candidates.safetensors", "eval", "checkpoints", "*.png", "report.md")


def timed(run: Path, histories: list, out: Path, engine: str, workers: int, batch_size: int, device: str) -> float:
    start = time.perf_counter()
    score(run, histories, out, engine=engine, workers=workers, batch_size=batch_size, device=device, shards=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run directory of `llamarec run`")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N users")
    parser.add_argument("--repeat", type=int, default=1,
                        help="score each history this many times (as users ID#1, ID#2...): more users from a small run")
    parser.add_argument("--batch-size", type=int, default=None, help="histories per forward pass (the run's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", default="local,ray1,ray2", help="subset of local, ray1, ray2")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wanted = set(args.engines.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(args.run, Path(tmp) / "run", ignore=SKIP))
        users, histories, _ = read_histories(run, None)
        pairs = list(zip(users, histories))[: args.limit]
        if args.repeat > 1:
            pairs = [(f"{u}#{r}", h) for r in range(1, args.repeat + 1) for u, h in pairs]
        batch = args.batch_size or _run_settings(run)["batch_size"]
        rows = []
        for engine, workers in CONFIGS:
            if f"{engine}{workers if engine == 'ray' else ''}" not in wanted:
                continue
            small = pairs[: batch * workers]
            t_small = timed(run, small, Path(tmp) / f"{engine}{workers}-small", engine, workers, batch, args.device)
            t_all = timed(run, pairs, Path(tmp) / f"{engine}{workers}-all", engine, workers, batch, args.device)
            steady = (len(pairs) - len(small)) / (t_all - t_small) if len(pairs) > len(small) and t_all > t_small \
                else float("nan")
            rows.append({"engine": engine, "workers": workers, "users": len(pairs), "seconds": round(t_all, 2),
                         "users_per_s": round(len(pairs) / t_all, 2), "steady_users_per_s": round(steady, 2),
                         "startup_s": round(t_small - len(small) / steady, 2) if steady == steady else None})
    result = {"run": str(args.run), "repeat": args.repeat, "device": args.device, "batch_size": batch,
              "threads_per_worker": 1,
              "machine": f"{platform.node()} ({platform.processor() or platform.machine()})", "results": rows}
    if args.json:
        print(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("engine", "workers", "users", "seconds", "users/s", "steady users/s", "startup s",
                  title=f"llamarec score on {args.run} ({args.device}, batch {batch}, 1 thread per worker)")
    for r in rows:
        table.add_row(r["engine"], str(r["workers"]), str(r["users"]), f"{r['seconds']:.1f}", f"{r['users_per_s']:.2f}",
                      f"{r['steady_users_per_s']:.2f}", "" if r["startup_s"] is None else f"{r['startup_s']:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
