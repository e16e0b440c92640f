"""Load test of ``llamarec serve``: throughput, latency and memory, micro-batching on and off.

    python benchmarks/serve_load.py --run DIR [--clients 1 4 16] [--seconds 60] [--batching on off]
                                    [--max-batch 8] [--max-wait-ms 5] [--history-len 10] [--k 10]
                                    [--warmup-seconds 20] [--baseline-calls 30] [--device cpu]
                                    [--prefix-cache-mb 256] [--json]

For each batching mode the server is started on 127.0.0.1 (a subprocess, ``llamarec serve``;
``off`` is ``--max-batch 1``), warmed up at the largest client count (so batches of every size
have been allocated once), then driven by N concurrent asyncio httpx clients for T seconds per
client count, each sending ``POST /recommend`` back to back with random histories of the run's
items. It prints, per mode and client count: requests per second, p50/p95/p99 latency, the mean
number of histories per ranker forward (from the server's ``/stats``), errors (any answer but
200, or no answer), the server's resident memory after warm-up and after the row, and the
growth between the two (the memory target is growth under 5 % over a long row; the JSON also
has the memory every 30 s of the row). The baseline is
``Recommender.recommend`` called directly in this process (before any server starts): its p50.

Every loop is bounded: by time (``--seconds``) and by ``--max-requests`` per measurement. All
traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil

RSS_EVERY = 30  # seconds between samples of the server's memory during a row
SERVE = "import sys; from llamarec.cli import main; sys.argv[0] = 'llamarec'; main()"


def percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


def make_histories(run: Path, n: int, length: int, seed: int) -> list[list[str]]:
    """``n`` random histories of ``length`` distinct item ids of the run's catalogue."""
    from llamarec.catalogue import Catalogue
    from llamarec.layout import CATALOGUE_FILE, RETRIEVER_DIR

    retriever = run / RETRIEVER_DIR if (run / RETRIEVER_DIR).is_dir() else run
    if not (retriever / CATALOGUE_FILE).is_file():
        sys.exit(f"error: {retriever / CATALOGUE_FILE} missing: load the run once (llamarec recommend) to write it")
    ids = Catalogue.load(retriever / CATALOGUE_FILE).raw_ids[1:]
    rng = np.random.default_rng(seed)
    return [[ids[i] for i in rng.choice(len(ids), min(length, len(ids)), replace=False)] for _ in range(n)]


def baseline(run: Path, histories: list[list[str]], k: int, calls: int, device: str) -> dict:
    """p50 of ``Recommender.recommend`` called directly (after 3 warm-up calls)."""
    from llamarec.pipeline import Recommender

    rec = Recommender.load(run, device=device)
    for history in histories[:3]:
        rec.recommend(history, k)
    ms = []
    for i in range(calls):
        start = time.perf_counter()
        rec.recommend(histories[i % len(histories)], k)
        ms.append((time.perf_counter() - start) * 1000)
    del rec
    gc.collect()
    return {"calls": calls, **percentiles(ms)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``llamarec serve`` in a subprocess on a free loopback port."""

    def __init__(self, run: Path, max_batch: int, max_wait_ms: float, device: str, prefix_cache_mb: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--run", str(run), "--port", str(self.port),
             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--device", device,
             "--prefix-cache-mb", str(prefix_cache_mb)],
            stdout=subprocess.DEVNULL, stderr=self.log, env={k: v for k, v in os.environ.items()
                                                             if k != "LLAMAREC_API_KEY"})

    def wait_ready(self, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.log.seek(0)
                sys.exit(f"error: the server exited ({self.proc.returncode}): {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit(f"error: the server was not ready within {timeout:.0f} s")

    def rss_mb(self) -> float:
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def drive(url: str, clients: int, seconds: float, histories: list[list[str]], k: int,
                max_requests: int, rss: Callable[[], float] | None = None) -> dict:
    """``clients`` loops sending requests back to back until ``seconds`` pass or
    ``max_requests`` were sent; latencies of the 200 answers, count of the others; with
    ``rss``, the server's memory every RSS_EVERY seconds meanwhile."""
    latencies: list[float] = []
    timeline: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def one(c: int) -> None:
            nonlocal sent
            i = c
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/recommend", json={"history": histories[i % len(histories)], "k": k})
                    if r.status_code == 200:
                        latencies.append((time.perf_counter() - t0) * 1000)
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                i += clients

        async def sample() -> None:
            while rss is not None and time.perf_counter() < end:
                await asyncio.sleep(RSS_EVERY)
                timeline.append(rss())

        await asyncio.gather(sample(), *(one(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 2), **percentiles(latencies),
            "errors": sum(errors.values()), "error_kinds": errors, "rss_every_30s_mb": timeline}


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "device": device, "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="Run directory to serve.")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrent clients, in turn.")
    p.add_argument("--seconds", type=float, default=60, help="Duration of each client count.")
    p.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--max-batch", type=int, default=8, help="Micro-batch size when batching is on.")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--history-len", type=int, default=10, help="Items per random history.")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--warmup-seconds", type=float, default=20,
                   help="Load at the largest client count before measuring.")
    p.add_argument("--baseline-calls", type=int, default=30, help="Direct Recommender.recommend calls (0: skip).")
    p.add_argument("--max-requests", type=int, default=100_000, help="Cap per measurement.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prefix-cache-mb", type=int, default=256,
                   help="The server's prefix cache (0: off). Random histories rarely repeat, so the cache "
                        "only fills: with it on, memory grows by up to this much after warm-up.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = p.parse_args()
    if any(c < 1 for c in args.clients) or args.seconds <= 0:
        p.error("--clients must be at least 1 and --seconds positive")

    histories = make_histories(args.run, 500, args.history_len, args.seed)
    report: dict = {"run": str(args.run), "machine": machine(args.device), "seconds": args.seconds,
                    "prefix_cache_mb": args.prefix_cache_mb,
                    "history_len": args.history_len, "k": args.k, "results": []}
    if args.baseline_calls:
        report["baseline_direct"] = baseline(args.run, histories, args.k, args.baseline_calls, args.device)
    for mode in args.batching:
        max_batch = args.max_batch if mode == "on" else 1
        server = Server(args.run, max_batch, args.max_wait_ms, args.device, args.prefix_cache_mb)
        try:
            server.wait_ready()
            asyncio.run(drive(server.url, max(args.clients), args.warmup_seconds, histories[::-1], args.k,
                              args.max_requests))
            rss_warm = server.rss_mb()
            for clients in args.clients:
                before = server.stats()
                result = asyncio.run(drive(server.url, clients, args.seconds, histories, args.k, args.max_requests,
                                           server.rss_mb))
                after = server.stats()
                batches = after["batches"] - before["batches"]
                mean_batch = (after["batched_histories"] - before["batched_histories"]) / batches if batches else 0.0
                rss_end = server.rss_mb()
                report["results"].append({"batching": mode, "max_batch": max_batch, "clients": clients, **result,
                                          "mean_batch": round(mean_batch, 2), "rss_after_warmup_mb": rss_warm,
                                          "rss_end_mb": rss_end,
                                          "rss_growth_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2)})
                if not args.json:
                    print(f"batching {mode}, {clients} client(s): {result['throughput_rps']} req/s, "
                          f"p50 {result['p50_ms']} ms, mean batch {mean_batch:.2f}, errors {result['errors']}",
                          file=sys.stderr)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"run {report['run']} on {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"device {args.device}; {args.seconds:g} s per row, histories of {args.history_len}, k={args.k}")
    if "baseline_direct" in report:
        print(f"Recommender.recommend directly: p50 {report['baseline_direct']['p50_ms']} ms "
              f"({report['baseline_direct']['calls']} calls)")
    header = ("batching", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors",
              "RSS MB after warm-up→end of row", "growth %")
    print(" | ".join(header))
    for r in report["results"]:
        print(" | ".join(str(x) for x in (r["batching"], r["clients"], r["throughput_rps"], r["p50_ms"], r["p95_ms"],
                                          r["p99_ms"], r["mean_batch"], r["errors"],
                                          f"{r['rss_after_warmup_mb']}→{r['rss_end_mb']}", r["rss_growth_pct"])))


if __name__ == "__main__":
    main()
