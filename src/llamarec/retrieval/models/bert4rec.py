"""BERT4Rec (Sun et al., 2019): bidirectional transformer trained by masked-item prediction.

The mask token has id ``n_items + 1`` (one extra embedding row, never scored). At inference the
history is shifted left by one and the mask token appended; its hidden state predicts the next
item.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import (
    Dropout,
    FeedForward,
    RetrieverConfig,
    SelfAttention,
    SequentialRecommender,
    attention_mask,
    init_weights,
    positions,
    register_model,
)


class BERTBlock(nn.Module):
    """Post-LN transformer block, as in BERT."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config.hidden, config.n_heads, config.attn_dropout)
        self.drop = Dropout(config.dropout)
        self.norm1 = nn.LayerNorm(config.hidden)
        self.ffn = FeedForward(config.hidden, 4 * config.hidden, nn.GELU(), config.dropout)
        self.norm2 = nn.LayerNorm(config.hidden)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.ffn(x))


@register_model("bert4rec")
class BERT4Rec(SequentialRecommender):
    n_special_tokens = 1

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        self.mask_token = config.n_items + 1
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_norm = nn.LayerNorm(config.hidden)
        self.emb_drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(BERTBlock(config) for _ in range(config.n_blocks))
        # Output transform GELU(h W + b) before the dot product with item embeddings (eq. 7).
        self.head = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.GELU())
        self.apply(init_weights)

    def forward(self, items: Tensor) -> Tensor:
        x = self.item_emb(items) + self.pos_emb(positions(items, self.config.max_len))
        x = self.emb_drop(self.emb_norm(x))
        mask = attention_mask(items, causal=False)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)

    def training_batch(
        self, window: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Cloze masking of ``window[:, 1:]``: each real item is masked with prob ``mask_prob``.

        To match inference (mask at the end), a row instead masks only its last item with
        probability ``mask_prob`` (the paper's extra "mask the last item" samples), and a row that
        drew no mask at all gets its last item masked, so every non-empty row yields a loss term.
        Labels are the original items at masked positions and 0 elsewhere.
        """
        items = window[:, 1:]
        b, length = items.shape
        device = generator.device if generator is not None else items.device
        noise = torch.rand(b, length + 1, generator=generator, device=device).to(items.device)
        last = torch.zeros_like(items, dtype=torch.bool)
        last[:, -1] = True
        cloze = noise[:, :length] < self.config.mask_prob
        last_only = noise[:, length:] < self.config.mask_prob
        real = items != 0
        masked = torch.where(last_only, last, cloze) & real
        masked |= last & real & ~masked.any(1, keepdim=True)
        labels = torch.where(masked, items, torch.zeros_like(items))
        inputs = torch.where(masked, torch.full_like(items, self.mask_token), items)
        return inputs, labels

    def last_hidden(self, history: Tensor) -> Tensor:
        mask_column = torch.full_like(history[:, :1], self.mask_token)
        return self(torch.cat([history[:, 1:], mask_column], dim=1))[:, -1]
