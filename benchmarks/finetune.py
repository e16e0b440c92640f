"""Ranker fine-tuning speed on this machine: training examples per second for several recipes.

    python benchmarks/finetune.py --retriever RUN/retriever [--steps 6] [--batch 4] [--threads 1] [--only 4 5] [--json]

``RUN/retriever`` is a retriever run with training-prefix candidates (``llamarec retrieve
candidates --train-prefixes N``). Each recipe builds a fine-tuner on the same data, warms up
with one step, then times ``--steps`` optimizer steps of ``--batch`` examples (forward,
backward, AdamW). The rows differ only in what the row names: dtype of the frozen weights, LoRA
targets, prompt history length and the loss. Prompt tokens are counted on the timed examples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from llamarec.ranking.config import RankConfig
from llamarec.ranking.finetune import Finetuner

RECIPES: dict[str, dict] = {
    "fp32, q/v LoRA r8, history 20, vocab loss": dict(dtype="float32", autocast_bf16=False, loss="vocab"),
    "bf16, q/v LoRA r8, history 20, vocab loss (old default)": dict(dtype="bfloat16", loss="vocab"),
    "bf16, all-linear LoRA r16, history 20, letter loss": dict(
        dtype="bfloat16", target_modules=["all-linear"], lora_r=16, loss="letters"),
    "bf16, all-linear LoRA r16, history 10, letter loss (cpu-quality)": dict(
        dtype="bfloat16", target_modules=["all-linear"], lora_r=16, loss="letters", prompt={"max_history": 10}),
    "as cpu-quality, LoRA in the last 10 of 30 layers": dict(
        dtype="bfloat16", target_modules=["all-linear"], lora_r=16, loss="letters", prompt={"max_history": 10},
        lora_layers=10),
    "as above, length-bucketed batches": dict(
        dtype="bfloat16", target_modules=["all-linear"], lora_r=16, loss="letters", prompt={"max_history": 10},
        lora_layers=10, length_buckets=True),
}


def measure(retriever: Path, recipe: dict, steps: int, batch: int) -> dict:
    cfg = RankConfig(retriever=retriever, device="cpu", examples="hard", train_order="retriever",
                     max_examples=batch * (steps + 1), batch_size=batch, val_users=1, **recipe)
    with tempfile.TemporaryDirectory() as tmp:
        ft = Finetuner(cfg, Path(tmp), progress=False)
        ft.model.train()

        def step(examples) -> None:
            ft._batch_loss(examples).backward()
            ft.optimizer.step()
            ft.optimizer.zero_grad(set_to_none=True)

        step(ft.train[:batch])  # warm-up
        timed = ft.train[batch:batch * (steps + 1)]
        tokens = [len(ft.tokenizer(ft.ranker.prompt(ex.history, ex.candidates))["input_ids"]) for ex in timed]
        start = time.perf_counter()
        for i in range(0, len(timed), batch):
            step(timed[i:i + batch])
        seconds = time.perf_counter() - start
    return {"examples_per_s": len(timed) / seconds, "s_per_example": seconds / len(timed),
            "mean_prompt_tokens": sum(tokens) / len(tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", type=int, help="row numbers (1-based) to run; all by default")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [(i, name) for i, name in enumerate(RECIPES, 1) if not args.only or i in args.only]
    results = {name: measure(args.retriever, RECIPES[name], args.steps, args.batch) for _, name in chosen}
    first = next(iter(results.values()))["examples_per_s"]
    if args.json:
        print(json.dumps({"threads": args.threads, "batch": args.batch, "recipes": results}))
        return
    table = Table("recipe", "prompt tokens", "examples/s", "s/example", "speed-up", title=f"{args.threads} thread(s)")
    for name, r in results.items():
        table.add_row(name, f"{r['mean_prompt_tokens']:.0f}", f"{r['examples_per_s']:.3f}",
                      f"{r['s_per_example']:.2f}", f"{r['examples_per_s'] / first:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
