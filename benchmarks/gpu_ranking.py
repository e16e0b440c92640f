"""GPU ranking forward against the hardware limit: a Llama-2-7B-shaped model with random bf16
weights (built from its config: nothing is downloaded) scores a realistic mix of prompt lengths.

    python benchmarks/gpu_ranking.py [--prompts 256] [--min-len 300] [--max-len 1000] [--batch 32]
                                     [--compile] [--json]

(``--device cpu --shape tiny --peak-size 256`` runs every code path in seconds on a CPU, to
check the script; its figures mean nothing.)

One run prints, side by side:

- **limit**: the practical bf16 matmul peak measured in this process (8192^3 matmuls);
- **plain transformers**: batches in arrival order padded to the longest prompt, logits at every
  position (what ``model(**batch).logits[:, -1]`` costs);
- **llamarec**: ``LetterScorer`` as the ranker runs it: batches of similar length (little
  padding), the LM head on the answer position only, the 20 letter logits copied back;
- with ``--compile``: the same after ``torch.compile(dynamic=True)``, compile time reported
  apart and amortised over the measured prompts.

The fraction is useful FLOPs (the prompt tokens only: no padding, one LM-head row per prompt,
causal attention) per second over the measured peak. Without a CUDA device it says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from random_llama import SHAPES, random_llama  # noqa: E402

from llamarec.ranking.verbalizer import LetterScorer, pad_batch  # noqa: E402

VOCAB = 32000


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, repeats: int = 1) -> float:
    """Seconds per call of ``fn`` (synchronised), after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak(device: str, n: int, repeats: int = 20) -> float:
    """Practical bf16 matmul TFLOP/s of this device."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats) / 1e12


def useful_flops(lengths: list[int], shape: dict) -> float:
    """Forward FLOPs of the prompts' own tokens: weight matmuls, causal attention, one LM-head row."""
    d, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_token = 2 * layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    return float(sum(per_token * t + 2 * layers * d * t * t + 2 * d * VOCAB for t in lengths))


def plain_forward(model: torch.nn.Module, prompts: list[list[int]], batch: int, device: str) -> None:
    """The baseline: arrival order, padded to the longest, logits at every position."""
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            ids, mask = pad_batch(prompts[start:start + batch], 0)
            model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float().cpu()


def row(name: str, seconds: float, n: int, flops: float, peak: float, **extra) -> dict:
    tflops = flops / seconds / 1e12
    return {"method": name, "prompts_per_s": round(n / seconds, 2), "ms_per_prompt": round(1000 * seconds / n, 2),
            "useful_tflops": round(tflops, 1), "fraction_of_peak": round(tflops / peak, 3), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-7b", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=300)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile(dynamic=True)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--peak-size", type=int, default=8192, help="matrix size of the peak measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        message = "no CUDA device here: gpu_ranking.py has not run"
        print(json.dumps({"skipped": message}) if args.json else message)
        return

    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.prompts).tolist()
    prompts = [rng.integers(3, VOCAB, t).tolist() for t in lengths]
    peak = matmul_peak(device, args.peak_size)
    model = random_llama(args.shape, VOCAB, torch.bfloat16, device)
    flops = useful_flops(lengths, SHAPES[args.shape])
    scorer = LetterScorer(model, SimpleNamespace(pad_token_id=0), list(range(3, 23)), batch_size=args.batch)

    rows = [row("plain transformers (arrival order, padded, full logits)",
                timed(lambda: plain_forward(model, prompts, args.batch, device), device), len(prompts), flops, peak),
            row("llamarec LetterScorer (length buckets, answer-position head)",
                timed(lambda: scorer.score_ids(prompts), device), len(prompts), flops, peak)]
    if args.compile:
        start = time.perf_counter()
        scorer.model = torch.compile(model, dynamic=True)
        scorer.score_ids(prompts)  # compiles (and recompiles for new shapes) here
        sync(device)
        compile_s = time.perf_counter() - start
        seconds = timed(lambda: scorer.score_ids(prompts), device)
        rows.append(row("llamarec + torch.compile(dynamic=True)", seconds, len(prompts), flops, peak,
                        compile_seconds=round(compile_s, 1),
                        prompts_to_amortise=round(compile_s / max(1e-9, rows[1]["ms_per_prompt"] / 1000
                                                                     - seconds / len(prompts)))))
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{device} (check run)"
    report = {"gpu": name, "shape": args.shape, "prompts": args.prompts,
              "mean_prompt_tokens": round(float(np.mean(lengths)), 1), "batch": args.batch,
              "matmul_peak_tflops": round(peak, 1), "results": rows}
    if args.json:
        print(json.dumps(report))
        return
    table = Table("method", "prompts/s", "ms/prompt", "useful TFLOP/s", "of peak",
                  title=f"{report['gpu']}: {args.shape}, {args.prompts} prompts of {args.min_len}-{args.max_len} "
                        f"tokens, batch {args.batch}; bf16 matmul peak {peak:.0f} TFLOP/s")
    for r in rows:
        table.add_row(r["method"], str(r["prompts_per_s"]), str(r["ms_per_prompt"]), str(r["useful_tflops"]),
                      f"{100 * r['fraction_of_peak']:.0f} %")
    Console().print(table)


if __name__ == "__main__":
    main()
