"""Llama models of real sizes with random weights, for speed and memory checks without
downloading weights.

    python benchmarks/random_llama.py --shape llama-1b --tokenizer DIR --out DIR

saves one (with the tokenizer) as a Hugging Face checkpoint that ``llamarec rank train
--model DIR`` can load, e.g. with ``--load-in-4bit`` on a GPU. ``benchmarks/ranking.py
--random-shape llama-7b`` builds one in memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

SHAPES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # to check scripts quickly
                 num_attention_heads=4, num_key_value_heads=2),
}


def random_llama(shape: str, vocab_size: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """A randomly initialised Llama of ``shape`` built directly on ``device`` in ``dtype``."""
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--tokenizer", type=Path, required=True, help="directory of a saved tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_llama(args.shape, len(tokenizer), torch.bfloat16, device)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved a random {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters) "
          f"to {args.out}")


if __name__ == "__main__":
    main()
