"""Configuration of ranker fine-tuning and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RankConfig(BaseModel):
    """Everything a ranker run depends on (the paper's LoRA settings by default)."""

    model_config = ConfigDict(extra="forbid")

    retriever: Path = Field(description="retriever run directory (with candidates)")
    model: str | None = Field(None, description="hub id, local dir or None for SmolLM2-135M-Instruct")
    gguf_file: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    prompt_file: Path | None = None
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    examples: Literal["hard", "paper"] = Field("hard", description="how training candidates are chosen")
    max_examples: int = Field(1000, ge=1, description="training examples (one epoch over them)")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    eval_every: int = Field(100, ge=1, description="optimizer steps between validations")
    val_users: int = Field(100, ge=1, description="validation users scored at each validation")
    patience: int = Field(3, ge=1, description="validations without improvement before stopping")
    autocast_bf16: bool = Field(True, description="bf16 autocast for the forward pass on CPU")
    eval_batch_size: int = Field(8, ge=1)
    seed: int = 42
