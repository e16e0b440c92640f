"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence.

As in the paper, each sublayer is ``x + Dropout(f(LayerNorm(x)))`` (pre-LN) with a final
LayerNorm, positions are learned, and the feed-forward layer is two ``H x H`` linears with ReLU.
"""

from __future__ import annotations

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


class SASRecBlock(nn.Module):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden)
        self.attn = SelfAttention(config.hidden, config.n_heads, config.attn_dropout)
        self.drop = Dropout(config.dropout)
        self.norm2 = nn.LayerNorm(config.hidden)
        self.ffn = FeedForward(config.hidden, config.hidden, nn.ReLU(), config.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.ffn(self.norm2(x))


@register_model("sasrec")
class SASRec(SequentialRecommender):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        self.pos_emb = nn.Embedding(config.max_len, config.hidden)
        self.emb_drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.hidden)
        self.apply(init_weights)

    def forward(self, items: Tensor) -> Tensor:
        x = self.item_emb(items) + self.pos_emb(positions(items, self.config.max_len))
        x = self.emb_drop(x)
        mask = attention_mask(items, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)
