"""LLM ranking speed on this machine: the verbalizer against the generation baseline.

    python benchmarks/ranking.py [--n 20] [--batch 8] [--n-gen 3] [--dtype float32|bfloat16|auto]
                                 [--threads N] [--compare-dtypes] [--model smollm2] [--data-dir DIR] [--seed 0]
    python benchmarks/ranking.py --limits [--busy-neighbour] [--json] [--n 8] [--dtype bfloat16]

Prompts are built from MovieLens (ml-latest-small) titles: a random window of 20 consecutive
items of a random user as the history, and the next item plus 19 random items outside the
history as the shuffled candidates. Each method is warmed up on one prompt, then timed on its
prompts: the verbalizer (one forward pass per prompt) at batch 1 and batched, and the
generation baseline (greedy decoding of the ranked titles, batch 1) on the first ``--n-gen``
prompts only, since it is much slower. Recall@1 and NDCG@5 of the true item are shown too, but
on this few prompts with an untuned model they are noise. ``--compare-dtypes`` also scores all
prompts in float32 and bfloat16 and reports how far the letter logits move.

``--limits`` instead compares llamarec's forward pass with the hardware in one run: the matmul
peak of this process (GFLOP/s of a square matmul in ``--dtype`` at the current thread count),
the ranker's useful FLOPs per prompt (2 x non-embedding parameters x tokens, plus causal
attention and the LM head on one position) per second as a fraction of that peak, a plain
transformers baseline (float32, full logits at every position, batch 1), and permutation
averaging over 1, 3 and 5 candidate orders with and without reusing the shared prefix's
key/value cache, and a request whose history the server's prefix cache has not seen (miss:
the prefix runs and is stored) against the same request again (hit: only the candidates run),
batch 1. ``--busy-neighbour`` repeats it while a second process multiplies matrices on one
thread.

``--threads`` (default: ``OMP_NUM_THREADS``, else the physical cores this process may use) and
``--dtype auto`` (bfloat16 where the CPU or GPU has bf16 instructions, else float32) follow
:mod:`llamarec.devices`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.table import Table

from llamarec.data import Dataset, load_dataset
from llamarec.devices import auto_dtype, resolve_device, set_threads
from llamarec.errors import LlamarecError
from llamarec.metrics import metrics_from_ranks, target_ranks
from llamarec.ranking.examples import RankExample
from llamarec.ranking.generate import GenerationRanker
from llamarec.ranking.llm import load_llm
from llamarec.ranking.prefix_cache import PrefixCache
from llamarec.ranking.prompt import encode
from llamarec.ranking.ranker import Ranker

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def benchmark_examples(ds: Dataset, n: int, seed: int, n_history: int = 20,
                       n_candidates: int = 20) -> list[RankExample]:
    """``n`` examples with full ``n_history``-item histories and random negatives."""
    users = [u for u, seq in enumerate(ds.sequences) if len(seq) > n_history]
    if not users or ds.n_items < n_history + n_candidates:
        raise LlamarecError(f"{ds.name}: too few long sequences or items for the benchmark prompts")
    rng = np.random.default_rng(seed)
    examples = []
    for user in rng.choice(users, n, replace=n > len(users)):
        seq = ds.sequences[user]
        pos = int(rng.integers(n_history, len(seq)))
        history, target = [int(i) for i in seq[pos - n_history : pos]], int(seq[pos])
        taken, candidates = set(history) | {target}, [target]
        while len(candidates) < n_candidates:
            item = int(rng.integers(1, ds.n_items + 1))
            if item not in taken:
                taken.add(item)
                candidates.append(item)
        rng.shuffle(candidates)
        examples.append(RankExample(int(user), tuple(history), tuple(candidates), candidates.index(target)))
    return examples


def ms_per_prompt(run: Callable[[Sequence[RankExample]], T],
                  examples: Sequence[RankExample]) -> tuple[float, T]:
    """Run once on the first example (warm-up), then time ``run(examples)``; ``(ms, output)``."""
    run(examples[:1])
    start = time.perf_counter()
    output = run(examples)
    return 1000 * (time.perf_counter() - start) / len(examples), output


def quality(scores: torch.Tensor, examples: Sequence[RankExample]) -> dict[str, float]:
    ranks = target_ranks(scores, torch.tensor([ex.target for ex in examples]))
    metrics = metrics_from_ranks(ranks, (1, 5))
    return {"R@1": metrics["Recall@1"], "N@5": metrics["NDCG@5"]}


def mean_tokens(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> float:
    return float(np.mean([len(encode(tokenizer, prompt)) for prompt in prompts]))


def speed_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
               examples: Sequence[RankExample], batch: int, n_gen: int) -> list[dict]:
    """One row per method: verbalizer at batch 1 and ``batch``, then generation (if ``n_gen``)."""
    rows = []
    for batch_size in (1, batch):
        ranker = Ranker(model, tokenizer, titles, batch_size=batch_size)
        ms, scores = ms_per_prompt(ranker.score, examples)
        prompts = [ranker.prompt(ex.history, ex.candidates) for ex in examples]
        rows.append({"method": "verbalizer", "batch": batch_size, "prompts": len(examples), "ms": ms,
                     "prompt tokens": mean_tokens(tokenizer, prompts), "new tokens": 0.0,
                     "named": None, **quality(scores, examples)})
    if n_gen > 0:
        generator = GenerationRanker(model, tokenizer, titles)
        subset = examples[:n_gen]
        ms, results = ms_per_prompt(generator.generate, subset)
        rows.append({"method": "generation", "batch": 1, "prompts": len(subset), "ms": ms,
                     "prompt tokens": mean_tokens(tokenizer, [generator.prompt(ex) for ex in subset]),
                     "new tokens": float(np.mean([r.n_tokens for r in results])),
                     "named": float(np.mean([r.n_matched for r in results])),
                     **quality(torch.stack([r.scores for r in results]), subset)})
    return rows


LEGEND = ("per prompt: ms; vs b1: time / verbalizer batch 1; in/out tok: prompt / generated tokens; "
          "named: candidates the generated text named")


def speed_table(rows: list[dict], title: str) -> Table:
    base = rows[0]["ms"]
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("method")
    for column in ("batch", "n", "ms", "vs b1", "in tok", "out tok", "named", "R@1", "N@5"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["method"], str(row["batch"]), str(row["prompts"]), f"{row['ms']:.0f}",
                      f"{row['ms'] / base:.1f}", f"{row['prompt tokens']:.0f}", f"{row['new tokens']:.0f}",
                      "-" if row["named"] is None else f"{row['named']:.1f}",
                      f"{row['R@1']:.2f}", f"{row['N@5']:.2f}")
    return table


def dtype_drift(model_name: str | None, device: str, loaded: dict[str, tuple], titles: Sequence[str],
                examples: Sequence[RankExample], batch: int) -> str:
    """How far bfloat16 letter logits are from float32 ones on the same prompts; ``loaded`` maps
    a dtype to an already loaded ``(model, tokenizer)``."""
    scores = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = loaded.get(dtype) or load_llm(model_name, dtype=dtype, device=device)
        scores[dtype] = Ranker(model, tokenizer, titles, batch_size=batch).score(examples)
    diff = (scores["bfloat16"] - scores["float32"]).abs().max().item()
    changed = (scores["bfloat16"].argmax(-1) != scores["float32"].argmax(-1)).float().mean().item()
    return (f"bfloat16 vs float32 letter logits on {len(examples)} prompts: max |diff| {diff:.3f}, "
            f"top-1 letter changed on {changed:.0%} of prompts")


def random_model(args: argparse.Namespace) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A random Llama of ``--random-shape`` with the tokenizer in ``--tokenizer``."""
    from random_llama import random_llama
    from transformers import AutoTokenizer

    if args.tokenizer is None:
        raise LlamarecError("--random-shape needs --tokenizer DIR")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    return random_llama(args.random_shape, len(tokenizer), getattr(torch, args.dtype), device), tokenizer


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1536, seconds: float = 1.5) -> float:
    """GFLOP/s of repeated ``size`` x ``size`` matmuls in ``dtype`` in this process."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def prompt_flops(model: torch.nn.Module, tokens: int) -> float:
    """Useful FLOPs of one verbalizer forward: linear layers on every token, causal attention,
    and the LM head on the last position only."""
    config = model.config
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    attention = 2 * config.num_hidden_layers * tokens * tokens * config.hidden_size
    return 2 * linear * tokens + attention + 2 * config.hidden_size * config.vocab_size


def prefix_cache_ms(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
                    examples: Sequence[RankExample]) -> dict[str, float]:
    """ms per request (batch 1) for each history's first request, which the server's prefix cache
    misses (the prefix runs and is stored), and for the same request again (a hit), with the
    mean prefix length and the memory of one cached prefix."""
    ranker = Ranker(model, tokenizer, titles, batch_size=1, prefix_cache=PrefixCache(1 << 40))
    ranker.score(examples[:1])  # warm-up: a miss, then a hit
    ranker.score(examples[:1])
    ranker.scorer.prefix_cache = cache = PrefixCache(1 << 40)

    def request_ms(example: RankExample) -> float:
        start = time.perf_counter()
        ranker.score([example])
        return 1000 * (time.perf_counter() - start)

    miss = [request_ms(ex) for ex in examples]
    hit = [request_ms(ex) for ex in examples]
    prefix = [ranker.prefix_length(ex.history, ex.candidates) for ex in examples]
    return {"miss_ms": float(np.mean(miss)), "hit_ms": float(np.mean(hit)), "prefix_tokens": float(np.mean(prefix)),
            "entry_mib": cache.bytes / len(cache) / 2**20}


def limits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, titles: Sequence[str],
           examples: Sequence[RankExample], dtype: torch.dtype, model_name: str | None) -> dict:
    """Peak, llamarec, the plain baseline and permutation averaging, measured in one run."""
    peak = matmul_peak_gflops(dtype)
    ranker = Ranker(model, tokenizer, titles, batch_size=1)
    ms, _ = ms_per_prompt(ranker.score, examples)
    tokens = float(np.mean([len(ranker.prompt_ids(ex.history, ex.candidates)) for ex in examples]))
    achieved = prompt_flops(model, int(tokens)) / (ms / 1000) / 1e9
    plain, plain_tokenizer = load_llm(model_name, dtype="float32", device="cpu")
    prompts = [ranker.prompt(ex.history, ex.candidates) for ex in examples]

    def baseline(batch: Sequence[str]) -> None:
        with torch.inference_mode():
            for text in batch:
                plain(**plain_tokenizer(text, return_tensors="pt"))  # full logits, every position

    baseline_ms, _ = ms_per_prompt(baseline, prompts)
    permutations = {}
    for reuse in (False, True):
        timed = Ranker(model, tokenizer, titles, batch_size=len(examples), reuse_prefix=reuse)
        for count in (1, 3, 5):
            ms_count, _ = ms_per_prompt(lambda exs, r=timed, c=count: r.score(exs, "average", c), examples)
            permutations[f"{count}{' reuse' if reuse else ''}"] = ms_count
    return {"threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
            "prompt_tokens": tokens, "peak_gflops": peak, "ms_per_prompt": ms, "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak, "baseline_ms_per_prompt": baseline_ms,
            "permutations": {"without_reuse": {c: permutations[str(c)] for c in (1, 3, 5)},
                             "with_reuse": {c: permutations[f"{c} reuse"] for c in (1, 3, 5)}},
            "prefix_cache": prefix_cache_ms(model, tokenizer, titles, examples)}


def busy_neighbour() -> subprocess.Popen:
    """A second process multiplying matrices on one thread until it is killed."""
    code = ("import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)\n"
            "while True: a @ a")
    return subprocess.Popen([sys.executable, "-c", code])


def limits_table(result: dict, title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("what", "ms / prompt", "GFLOP/s", "of peak"):
        table.add_column(column, justify="right" if column != "what" else "left")
    table.add_row(f"matmul peak ({result['dtype']}, {result['threads']} thread(s))", "-",
                  f"{result['peak_gflops']:.0f}", "100%")
    table.add_row(f"llamarec ({result['prompt_tokens']:.0f} tokens)", f"{result['ms_per_prompt']:.0f}",
                  f"{result['achieved_gflops']:.0f}", f"{result['fraction_of_peak']:.0%}")
    table.add_row("plain transformers (float32, full logits)", f"{result['baseline_ms_per_prompt']:.0f}", "-", "-")
    for count in (1, 3, 5):
        without, with_reuse = (result["permutations"][k][count] for k in ("without_reuse", "with_reuse"))
        table.add_row(f"{count} order(s): without / with prefix reuse", f"{without:.0f} / {with_reuse:.0f}", "-", "-")
    cache = result["prefix_cache"]
    table.add_row(f"repeated history, prefix cache miss / hit ({cache['prefix_tokens']:.0f}-token prefix, "
                  f"{cache['entry_mib']:.1f} MiB)", f"{cache['miss_ms']:.0f} / {cache['hit_ms']:.0f}", "-", "-")
    return table


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to load (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: OMP_NUM_THREADS, else the physical cores available)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--n", type=int, default=20, help="prompts for the verbalizer")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched verbalizer")
    parser.add_argument("--n-gen", type=int, default=3, help="prompts for the generation baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-dtypes", action="store_true")
    parser.add_argument("--random-shape", choices=["llama-7b", "llama-1b"], default=None,
                        help="time a randomly initialised Llama of this size instead of --model")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory for --random-shape")
    parser.add_argument("--limits", action="store_true", help="peak / llamarec / baseline / prefix reuse")
    parser.add_argument("--busy-neighbour", action="store_true", help="with --limits: also with a busy neighbour")
    parser.add_argument("--json", action="store_true", help="with --limits: print one JSON object")
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1 or args.n_gen < 0:
        parser.error("--n and --batch must be at least 1, --n-gen at least 0")
    if args.dtype == "auto":
        args.dtype = str(auto_dtype(resolve_device(args.device))).removeprefix("torch.")
    return args


def main() -> None:
    args = parse_args()
    console = Console()
    try:
        set_threads(args.threads)
        ds = load_dataset("ml-latest-small", args.data_dir)
        examples = benchmark_examples(ds, args.n, args.seed)
        if args.random_shape:
            model, tokenizer = random_model(args)
            args.model = f"random {args.random_shape}"
        else:
            model, tokenizer = load_llm(args.model, dtype=args.dtype, device=args.device)
        if args.limits:
            dtype = getattr(torch, args.dtype)
            result = {"idle": limits(model, tokenizer, ds.titles, examples, dtype, args.model)}
            if args.busy_neighbour:
                neighbour = busy_neighbour()
                try:
                    result["busy_neighbour"] = limits(model, tokenizer, ds.titles, examples, dtype, args.model)
                finally:
                    neighbour.kill()
            if args.json:
                print(json.dumps(result))
            for name, part in result.items():
                if not args.json:
                    console.print(limits_table(part, f"{args.model or 'SmolLM2-135M-Instruct'}, {name}"))
            return
        rows = speed_rows(model, tokenizer, ds.titles, examples, args.batch, min(args.n_gen, args.n))
        device = next(model.parameters()).device
        console.print(speed_table(rows, f"{args.model or 'SmolLM2-135M-Instruct'}, {args.dtype}, {device}, "
                                        f"{torch.get_num_threads()} thread(s)"))
        console.print(LEGEND)
        if len(rows) == 3:
            console.print(f"generation / verbalizer batch 1: {rows[2]['ms'] / rows[0]['ms']:.1f}x per prompt")
        if args.compare_dtypes:
            loaded = {args.dtype: (model, tokenizer)}
            console.print(dtype_drift(args.model, args.device, loaded, ds.titles, examples, args.batch))
    except LlamarecError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
