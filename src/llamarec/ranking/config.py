"""Configuration of ranker fine-tuning and evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llamarec.configs import read_json_config, read_json_file, validate
from llamarec.errors import LlamarecError
from llamarec.layout import ADAPTER_DIR, PROMPT_FILE, RANK_CONFIG, TITLE_VECTORS_FILE
from llamarec.ranking.prompt import PromptConfig

RankerKind = Literal["verbalizer", "title_similarity"]
TITLE_SIMILARITY_BATCH = 256
"""Histories per scoring call of a title_similarity ranker (a matrix product, no LLM)."""
VERBALIZER_ONLY = (
    "dtype", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lora_layers", "full_layers",
    "loss", "examples", "train_order", "recent_prefixes", "residual_weight", "residual_mode", "val_order",
    "max_examples", "epochs", "batch_size", "length_buckets", "grad_accum", "lr", "warmup_steps", "eval_every",
    "val_users", "patience", "autocast_bf16", "eval_batch_size", "seed")
"""Options a title_similarity ranker does not use: it is not trained, and embeds in float32."""


class RankConfig(BaseModel):
    """Everything a ranker run depends on (the paper's LoRA settings by default)."""

    model_config = ConfigDict(extra="forbid")

    retriever: Path = Field(description="retriever run directory (with candidates)")
    kind: RankerKind = Field(
        "verbalizer", description="verbalizer: the LLM reads one prompt per user and its letter logits score the "
                                  "candidates (fine-tuned with LoRA); title_similarity: the LLM embeds every title "
                                  "once and a candidate scores its similarity to the user's last prompt.max_history "
                                  "items (no training; served without the LLM)")
    similarity_scale: float = Field(
        10.0, gt=0.0, description="title_similarity: factor on the similarities (cosines) before fusion")
    model: str | None = Field(None, description="hub id, local dir or None for SmolLM2-135M-Instruct")
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    prompt_file: Path | None = None
    prompt: dict[str, Any] = Field(default_factory=dict,
                                   description="prompt options over prompt_file's (e.g. max_history)")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"],
                                      description='module names, or ["all-linear"]')
    lora_layers: int | None = Field(
        None, ge=1, description="LoRA in the last N transformer layers only: backward stops below them")
    full_layers: int | None = Field(
        None, ge=1, description="instead of LoRA: train every weight of the last N transformer layers (fp32)")
    loss: Literal["vocab", "letters"] = Field(
        "vocab", description="cross-entropy over the whole vocabulary, or over the candidates' letters only")
    examples: Literal["hard", "paper"] = Field("hard", description="how training candidates are chosen")
    train_order: Literal["shuffled", "retriever", "shuffled_hits", "mix"] = Field(
        "shuffled", description="candidate order of hard training examples (shuffled_hits: only prefixes whose "
                                "target the retriever found, shuffled; mix: half shuffled, half retriever)")
    recent_prefixes: int | None = Field(
        None, ge=1, description="train only on each user's last N training prefixes (targets next to the "
                                "validation and test targets in time); default: every prefix")
    residual_weight: float = Field(
        0.0, ge=0.0, description="w > 0: train and rank with letter logits + w x calibrated retriever log-probs")
    residual_mode: Literal["gate", "delta"] = Field(
        "gate", description="how the LLM enters the residual: gate x letter logits (the gate learned from 0), or "
                            "delta: the adapter's change of the letter logits (adapted minus base model: two "
                            "forward passes, LoRA only)")
    val_order: Literal["shuffled", "retriever"] = Field(
        "shuffled", description="candidate order of the validation users (use the evaluation order)")
    max_examples: int = Field(1000, ge=1, description="training examples (one epoch over them)")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    length_buckets: bool = Field(
        False, description="batch training prompts of similar length together (less padding), batches shuffled")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(100, ge=1, description="optimizer steps between validations")
    val_users: int = Field(100, ge=1, description="validation users scored at each validation")
    patience: int = Field(3, ge=1, description="validations without improvement before stopping")
    autocast_bf16: bool = Field(True, description="bf16 autocast for the forward pass on CPU")
    eval_batch_size: int = Field(8, ge=1)
    seed: int = 42

    @model_validator(mode="after")
    def _check_options(self) -> RankConfig:
        changed = [name for name in VERBALIZER_ONLY if not self._default(name)]
        if self.kind == "title_similarity" and changed:
            raise ValueError(f"{', '.join(changed)}: options of a verbalizer ranker; a title_similarity ranker is "
                             "not trained and embeds in float32 (drop them)")
        if self.kind == "verbalizer" and not self._default("similarity_scale"):
            raise ValueError("similarity_scale is an option of a title_similarity ranker (kind: title_similarity)")
        if self.residual_weight > 0 and self.loss != "letters":
            raise ValueError("residual_weight needs loss: letters (the residual is a softmax over the letters)")
        if self.full_layers is not None and (self.lora_layers is not None or self.load_in_4bit):
            raise ValueError("full_layers trains whole layers without LoRA: drop lora_layers and load_in_4bit")
        if self.residual_mode == "delta" and (self.residual_weight <= 0 or self.full_layers is not None):
            raise ValueError("residual_mode: delta needs residual_weight > 0 and a LoRA adapter (no full_layers)")
        return self

    def _default(self, name: str) -> bool:
        return getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True)

    def scoring_batch_size(self) -> int:
        """Histories per scoring call: prompts per forward pass for a verbalizer."""
        return TITLE_SIMILARITY_BATCH if self.kind == "title_similarity" else self.eval_batch_size

    def scoring_device(self) -> str:
        """Where the ranker scores: a title_similarity ranker has no model to place on a GPU."""
        return "cpu" if self.kind == "title_similarity" else self.device

    def prompt_config(self) -> PromptConfig:
        """The prompt options: ``prompt_file``'s, then those of ``prompt`` over them."""
        base = PromptConfig.from_file(self.prompt_file) if self.prompt_file else PromptConfig()
        return validate(PromptConfig, {**base.model_dump(), **self.prompt}, "ranker config prompt")

    def lora_targets(self) -> list[str] | str:
        """``target_modules`` as peft takes it (``["all-linear"]`` becomes peft's keyword)."""
        return "all-linear" if self.target_modules == ["all-linear"] else self.target_modules


def retriever_for_config(rank_dir: Path, retriever: Path) -> str:
    """How a ranker run's config names its retriever: relative to the ranker directory when the
    retriever lies in the same run directory (``../retriever`` for ``llamarec run``), so the run
    can be moved and used from any working directory; elsewhere, its absolute path."""
    plain = os.path.relpath(os.path.abspath(retriever), os.path.abspath(rank_dir))
    if (rank_dir / plain).resolve() != retriever.resolve():  # symlinks on the way
        plain = os.path.relpath(retriever.resolve(), rank_dir.resolve())
    return str(retriever.resolve()) if Path(plain).parts[:2] == (os.pardir, os.pardir) else plain


def retriever_from_config(rank_dir: Path, saved: Path) -> Path:
    """The retriever a ranker run's saved config names (see :func:`retriever_for_config`).
    Configs saved before paths became relative to the ranker directory named it relative to
    the working directory; such a path (one that does not start with ``..``) is tried there
    when it is not found from the ranker directory."""
    inside = rank_dir / saved
    legacy = not saved.is_absolute() and saved.parts[:1] != (os.pardir,)
    return saved if legacy and not inside.exists() and saved.exists() else inside


def trained_artifact(kind: RankerKind) -> str:
    """What training leaves in a ranker run: a verbalizer's adapter, or the title vectors."""
    return ADAPTER_DIR if kind == "verbalizer" else TITLE_VECTORS_FILE


def ranker_saved(rank_dir: Path) -> bool:
    """Whether ``rank_dir`` holds a trained ranker to serve (of the kind its config names)."""
    return (rank_dir / trained_artifact(saved_kind(rank_dir))).exists()


def saved_kind(rank_dir: Path) -> RankerKind:
    """The kind of ranker a ranker run's saved config describes (runs before kinds: verbalizer)."""
    path = rank_dir / RANK_CONFIG
    kind = read_json_file(path).get("kind", "verbalizer") if path.is_file() else "verbalizer"
    if kind not in get_args(RankerKind):
        raise LlamarecError(f"{path}: kind {kind!r} is not a ranker kind ({', '.join(get_args(RankerKind))})")
    return kind


def verify_ranker_run(rank_dir: Path, adapter: bool = True) -> None:
    """Before a ranker run is loaded: its config, prompt and (with ``adapter``) trained files
    (a verbalizer's adapter, or title vectors) match its manifest, and its prompt file
    validates; one line naming the file otherwise."""
    from llamarec.manifest import verify

    verify(rank_dir, RANK_CONFIG)
    verify(rank_dir, PROMPT_FILE, *((trained_artifact(saved_kind(rank_dir)),) if adapter else ()))
    if (rank_dir / PROMPT_FILE).is_file():
        read_json_config(PromptConfig, rank_dir / PROMPT_FILE)


def check_rank_config(out: Path, cfg: RankConfig, prompt_cfg: PromptConfig, write: bool = True) -> None:
    """Refuse to continue a ranker run in ``out`` made with another config; with ``write``,
    save the config (its retriever named as :func:`retriever_for_config` does) and the
    resolved prompt config, listed in the manifest."""
    from llamarec.checkpoint import check_same_config
    from llamarec.io import write_json
    from llamarec.manifest import record

    path = out / RANK_CONFIG
    saved = read_json_file(path) if path.is_file() else None
    # The retriever compared as a place, however it is named (relative to the ranker
    # directory when saved, to the working directory when given).
    if saved is not None and isinstance(saved.get("retriever"), str):
        saved = {**saved, "retriever": str(retriever_from_config(out, Path(saved["retriever"])).resolve())}
    here = cfg.model_copy(update={"retriever": cfg.retriever.resolve()})
    current = check_same_config(out, saved, here, "ranker run")
    if write:
        write_json(path, {**current, "retriever": retriever_for_config(out, cfg.retriever)})
        record(out, path)
        write_json(out / PROMPT_FILE, prompt_cfg.model_dump())
        record(out, out / PROMPT_FILE)
