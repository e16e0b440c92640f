"""LLM ranking speed on this machine: the verbalizer against the generation baseline.

    python benchmarks/ranking.py [--n 20] [--batch 8] [--n-gen 3] [--dtype float32|bfloat16]
                                 [--compare-dtypes] [--model smollm2] [--data-dir DIR] [--seed 0]

Prompts are built from MovieLens (ml-latest-small) titles: a random window of 20 consecutive
items of a random user as the history, and the next item plus 19 random items outside the
history as the shuffled candidates. Each method is warmed up on one prompt, then timed on its
prompts: the verbalizer (one forward pass per prompt) at batch 1 and batched, and the
generation baseline (greedy decoding of the ranked titles, batch 1) on the first ``--n-gen``
prompts only, since it is much slower. Recall@1 and NDCG@5 of the true item are shown too, but
on this few prompts with an untuned model they are noise. ``--compare-dtypes`` also scores all
prompts in float32 and bfloat16 and reports how far the letter logits move.
"""

from __future__ import annotations

import argparse
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
from llamarec.errors import LlamarecError
from llamarec.metrics import metrics_from_ranks, target_ranks
from llamarec.ranking.examples import RankExample
from llamarec.ranking.generate import GenerationRanker
from llamarec.ranking.llm import load_llm
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model to load (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
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
    args = parser.parse_args()
    if args.n < 1 or args.batch < 1 or args.n_gen < 0:
        parser.error("--n and --batch must be at least 1, --n-gen at least 0")
    return args


def main() -> None:
    args = parse_args()
    console = Console()
    try:
        ds = load_dataset("ml-latest-small", args.data_dir)
        examples = benchmark_examples(ds, args.n, args.seed)
        if args.random_shape:
            model, tokenizer = random_model(args)
            args.model = f"random {args.random_shape}"
        else:
            model, tokenizer = load_llm(args.model, dtype=args.dtype, device=args.device)
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
