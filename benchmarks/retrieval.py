"""Retriever speed on this machine: training throughput and candidate-generation time.

    python benchmarks/retrieval.py [--datasets ml-latest-small beauty] [--models lru sasrec ...]
                                   [--iters 40] [--data-root ../shared/data] [--device cpu]

For each (dataset, model) it times ``--iters`` training iterations at the paper's batch size
and sequence length (after a few warm-up iterations), derives seconds per epoch from the
number of sliding windows, and times top-20 candidate generation for every user's test
history. ``lru-naive`` is the straightforward implementation to compare against: the same
LRURec with its recurrence evaluated by a Python loop over time steps (autograd through each
step), ``nn.Dropout``, and cross-entropy over logits at every position (padding included,
then ignored). On a GPU (``--device cuda``) each timed iteration ends with a synchronisation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from llamarec.data import load_dataset
from llamarec.data.split import eval_examples, train_sequence
from llamarec.devices import resolve_device
from llamarec.retrieval.config import RetrievalConfig
from llamarec.retrieval.evaluate import top_k
from llamarec.retrieval.models import build_model, lru
from llamarec.retrieval.models.base import Dropout
from llamarec.retrieval.train import model_config
from llamarec.retrieval.windows import training_windows


def sequential_scan(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h_t = lam * h_{t-1} + u_t, one time step at a time."""
    h, out = torch.zeros_like(u[:, 0]), []
    for t in range(u.shape[1]):
        h = lam * h + u[:, t]
        out.append(h)
    return torch.stack(out, 1)


def make_naive(model: torch.nn.Module) -> None:
    """Turn ``model`` (an LRURec) into the straightforward version described above."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Dropout):
                setattr(module, child_name, torch.nn.Dropout(child.p))

    def full_loss(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model.scores(model(inputs))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)

    model.loss = full_loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(dataset: str, model_name: str, data_root: Path | None, iters: int, device: torch.device) -> dict:
    data_dir = data_root / dataset if data_root and (data_root / dataset).is_dir() else None
    cfg = RetrievalConfig(dataset=dataset, data_dir=data_dir,
                          model="lru" if model_name == "lru-naive" else model_name)
    ds = load_dataset(dataset, data_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, model_config(cfg, ds.n_items)).to(device)
    windows = torch.from_numpy(training_windows([train_sequence(s) for s in ds.sequences],
                                                cfg.max_len, cfg.window_step))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    naive = model_name == "lru-naive"
    original = lru.linear_scan
    if naive:
        lru.linear_scan = sequential_scan
        make_naive(model)
    try:
        model.train()
        perm = torch.randperm(len(windows))
        times = []
        for i in range(iters + 3):
            idx = perm[(i * cfg.batch_size) % len(windows):][: cfg.batch_size]
            t0 = time.perf_counter()
            inputs, labels = (t.to(device) for t in model.training_batch(windows[idx]))
            loss = model.loss(inputs, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        per_iter = sum(times) / len(times)
        histories, _ = eval_examples(ds, "test")
        t0 = time.perf_counter()
        top_k(model, histories, 20, cfg.max_len, cfg.eval_batch_size)
        cand = time.perf_counter() - t0
    finally:
        lru.linear_scan = original
    n_batches = -(-len(windows) // cfg.batch_size)
    return {"dataset": dataset, "model": model_name, "batch": f"{cfg.batch_size}x{cfg.max_len}",
            "it/s": 1 / per_iter, "seq/s": cfg.batch_size / per_iter,
            "s/epoch": per_iter * n_batches, "candidates s": cand, "users": ds.n_users}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["ml-latest-small", "beauty"])
    parser.add_argument("--models", nargs="+", default=["lru", "lru-naive", "sasrec", "bert4rec", "narm"])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    table = Table("dataset", "model", "batch", "it/s", "seq/s", "s/epoch", "top-20 candidates (s)",
                  title=f"Retriever speed, torch {torch.__version__}, {device.type}: {where}")
    rows = []
    for dataset in args.datasets:
        for model in args.models:
            row = bench(dataset, model, args.data_root, args.iters, device)
            rows.append(row)
            table.add_row(row["dataset"], row["model"], row["batch"], f"{row['it/s']:.2f}",
                          f"{row['seq/s']:.0f}", f"{row['s/epoch']:.1f}",
                          f"{row['candidates s']:.2f} ({row['users']} users)")
    Console().print(table)
    by = {(r["dataset"], r["model"]): r for r in rows}
    for dataset in args.datasets:
        if (dataset, "lru") in by and (dataset, "lru-naive") in by:
            ratio = by[(dataset, "lru")]["it/s"] / by[(dataset, "lru-naive")]["it/s"]
            print(f"{dataset}: LRURec is {ratio:.1f}x faster per iteration than the straightforward version")


if __name__ == "__main__":
    main()
