"""Shared pieces of the retrieval models: config, registry, base class and building blocks.

Every model reads LEFT-padded item-id sequences ``[B, L]`` (0 = padding, real items 1..n_items)
and returns one hidden state per position; items are scored by a dot product with the (shared)
item embedding table plus a per-item bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from llamarec.errors import LlamarecError


@dataclass
class RetrieverConfig:
    n_items: int  # real items have ids 1..n_items; 0 is padding
    max_len: int = 200
    hidden: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    attn_dropout: float = 0.2
    mask_prob: float = 0.2  # BERT4Rec only

    def __post_init__(self) -> None:
        if self.n_items < 1 or self.max_len < 1 or self.hidden < 1 or self.n_blocks < 1:
            raise LlamarecError(
                f"retriever config: n_items, max_len, hidden and n_blocks must be >= 1, got {self}"
            )
        if self.n_heads < 1 or self.hidden % self.n_heads:
            raise LlamarecError(
                f"retriever config: hidden ({self.hidden}) must be a multiple of n_heads ({self.n_heads})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetrieverConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlamarecError(
                f"retriever config: unknown field(s) {', '.join(unknown)}; "
                f"expected {', '.join(sorted(known))}"
            )
        return cls(**data)


MODELS: dict[str, type[SequentialRecommender]] = {}


def register_model(
    name: str,
) -> Callable[[type[SequentialRecommender]], type[SequentialRecommender]]:
    """Class decorator: make the model buildable as ``build_model(name, config)``."""

    def add(cls: type[SequentialRecommender]) -> type[SequentialRecommender]:
        MODELS[name] = cls
        return cls

    return add


def build_model(name: str, config: RetrieverConfig) -> SequentialRecommender:
    if name not in MODELS:
        raise LlamarecError(f"unknown retrieval model {name!r}; expected one of {', '.join(sorted(MODELS))}")
    return MODELS[name](config)


class SequentialRecommender(nn.Module):
    """Base class. Subclasses implement ``forward(items) -> [B, L, H]`` and usually call
    ``self.apply(init_weights)`` at the end of ``__init__``."""

    n_special_tokens = 0  # extra embedding rows after the real items (BERT4Rec's mask token)

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.config = config
        n_rows = config.n_items + 1 + self.n_special_tokens
        self.item_emb = nn.Embedding(n_rows, config.hidden, padding_idx=0)
        self.item_bias = nn.Parameter(torch.zeros(config.n_items + 1))

    def forward(self, items: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, hidden: Tensor) -> Tensor:
        """``[..., H] -> [..., n_items + 1]``; column 0 is padding and must be masked by the caller."""
        return F.linear(hidden, self.item_emb.weight[: self.config.n_items + 1], self.item_bias)

    def training_batch(
        self, window: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``window [B, L+1] -> (inputs [B, L], labels [B, L])``: next-item prediction."""
        return window[:, :-1], window[:, 1:]

    def loss(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """Full-softmax cross-entropy over the real items at positions where ``labels != 0``."""
        hidden = self(inputs)
        target = labels != 0
        if not bool(target.any()):
            return hidden.sum() * 0.0
        n = self.config.n_items
        # Logits only at labelled positions and only for real items (no padding column).
        return LinearCrossEntropy.apply(
            hidden[target], self.item_emb.weight[1 : n + 1], self.item_bias[1:], labels[target] - 1
        )

    def last_hidden(self, history: Tensor) -> Tensor:
        """Hidden state that predicts the item following ``history [B, L]``."""
        return self(history)[:, -1]

    def score_last(self, history: Tensor) -> Tensor:
        return self.scores(self.last_hidden(history))


class LinearCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` (mean), fused.

    The full softmax over every item dominates a training step. Autograd's version makes about
    twice as many passes over the ``[M, n_items]`` logits; this one saves the logits and turns
    them into ``softmax - one_hot`` in backward. Not autocast-aware: use float32 inputs.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor, target: Tensor) -> Tensor:
        logits = torch.addmm(bias, hidden, weight.T)
        lse = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(hidden, weight, target, logits, lse)
        return (lse - logits.gather(1, target[:, None]).squeeze(1)).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        hidden, weight, target, logits, lse = ctx.saved_tensors
        dlogits = torch.sub(logits, lse[:, None]).exp_()
        dlogits[torch.arange(len(target), device=target.device), target] -= 1
        scale = grad / len(target)  # scale the small products, not the big matrix
        return (dlogits @ weight) * scale, (dlogits.T @ hidden) * scale, dlogits.sum(0) * scale, None


def init_weights(module: nn.Module) -> None:
    """Small normal init (std 0.02) for linear and embedding layers, as in BERT."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def positions(items: Tensor, max_len: int) -> Tensor:
    """Index of each item within its real (unpadded) sequence, so adding left padding does not
    change the positional embeddings of real items. Padding positions get 0."""
    if items.shape[1] > max_len:
        raise ValueError(f"sequence length {items.shape[1]} exceeds max_len {max_len}")
    return ((items != 0).long().cumsum(1) - 1).clamp(min=0)


def attention_mask(items: Tensor, causal: bool) -> Tensor:
    """Boolean ``[B, 1, L, L]`` mask (True = may attend): real keys only (and, if causal, keys at
    or before the query). Every query may also attend to itself, so padding rows are never empty
    (an all-False row makes softmax NaN); real queries still never see padding."""
    length = items.shape[1]
    allowed = (items != 0)[:, None, None, :]
    eye = torch.eye(length, dtype=torch.bool, device=items.device)
    if causal:
        allowed = allowed & torch.ones_like(eye).tril()
    return allowed | eye


class SelfAttention(nn.Module):
    """Multi-head self-attention using ``scaled_dot_product_attention``."""

    def __init__(self, hidden: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, length, hidden = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.n_heads, hidden // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, head_dim]
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(y.transpose(1, 2).reshape(b, length, hidden))


class Dropout(nn.Module):
    """Inverted dropout drawing 16 random bits per element (four per random int64).

    On CPU, ``nn.Dropout`` spends most of its time generating one random number per element;
    this is about 3x faster there. Other devices use the fused ``F.dropout``. The keep
    probability is ``1 - p`` to within 2^-16.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep where the int16 draw is >= this

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * (1.0 / (1.0 - self.p))


class FeedForward(nn.Module):
    """Position-wise feed-forward: linear, activation, dropout, linear, dropout."""

    def __init__(self, hidden: int, inner: int, activation: nn.Module, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, inner),
            activation,
            Dropout(dropout),
            nn.Linear(inner, hidden),
            Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
