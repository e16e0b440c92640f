"""Training configuration of a retriever, with the paper's per-dataset defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llamarec.data.preprocess import Ties

AMAZON = {"beauty", "games"}


class RetrievalConfig(BaseModel):
    """Everything a retriever run depends on. Unset ``max_len``/``batch_size`` follow the paper:
    200/16 for MovieLens, 50/64 for Amazon."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    data_dir: Path | None = None
    model: str = "lru"
    hidden: int = Field(64, ge=1)
    n_blocks: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    attn_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    mask_prob: float = Field(0.2, gt=0.0, lt=1.0)
    max_len: int | None = Field(None, ge=2)
    batch_size: int | None = Field(None, ge=1)
    window_step: int | None = Field(None, ge=1, description="sliding-window stride; default max_len")
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    max_epochs: int = Field(500, ge=1)
    eval_every: int = Field(500, ge=1, description="iterations between validations")
    patience: int = Field(20, ge=1, description="validations without improvement before stopping")
    metric: str = "Recall@10"
    eval_batch_size: int = Field(128, ge=1)
    seed: int = 42
    min_uc: int = Field(5, ge=3)
    min_sc: int = Field(5, ge=1)
    ties: Ties = Field(
        "item", description="order of a user's interactions with the same time: by item id, or a fixed "
                            "pseudo-random order (see llamarec.data.preprocess.TIES)")

    @model_validator(mode="after")
    def _paper_defaults(self) -> RetrievalConfig:
        amazon = self.dataset in AMAZON
        if self.max_len is None:
            self.max_len = 50 if amazon else 200
        if self.batch_size is None:
            self.batch_size = 64 if amazon else 16
        if self.window_step is None:
            self.window_step = self.max_len
        if self.window_step > self.max_len:
            raise ValueError(f"window_step ({self.window_step}) must not exceed max_len ({self.max_len}), "
                             "or some items would never be training labels")
        return self
