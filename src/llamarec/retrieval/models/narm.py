"""NARM (Li et al., 2017): GRU encoder with a global and a local (attentive) representation.

At step ``t`` the global representation is the GRU state ``h_t``; the local one is
``sum_{j<=t} alpha_tj h_j`` with ``alpha_tj = v^T sigmoid(A1 h_t + A2 h_j)`` (unnormalised, as in
the paper). The bilinear decoder ``emb_i^T B [h_t; c_t]`` is a projection to ``H`` followed by
the shared dot-product ``scores``.

Unlike the transformer models this keeps torch's default initialisation (unit-variance item
embeddings): with BERT's std-0.02 embeddings the GRU input is tiny and training stalls.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Dropout, RetrieverConfig, SequentialRecommender, register_model

QUERY_CHUNK = 32


@register_model("narm")
class NARM(SequentialRecommender):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        h = config.hidden
        self.emb_drop = Dropout(config.dropout)
        self.gru = nn.GRU(h, h, num_layers=1, batch_first=True)
        self.a1 = nn.Linear(h, h, bias=False)
        self.a2 = nn.Linear(h, h, bias=False)
        self.v = nn.Linear(h, 1, bias=False)
        self.ctx_drop = Dropout(config.dropout)
        self.proj = nn.Linear(2 * h, h, bias=False)

    def _encode(self, items: Tensor) -> Tensor:
        """GRU states ``[B, L, H]`` at each position, unaffected by the left padding.

        Each row is rotated so its real items come first, run through the GRU (which is causal,
        so the trailing padding cannot reach them) and rotated back. Padding positions get 0.
        """
        b, length = items.shape
        shift = length - (items != 0).sum(1, keepdim=True)
        steps = torch.arange(length, device=items.device)
        to_left = ((steps + shift) % length).unsqueeze(-1).expand(b, length, self.config.hidden)
        to_right = ((steps - shift) % length).unsqueeze(-1).expand(b, length, self.config.hidden)
        x = self.emb_drop(self.item_emb(items)).gather(1, to_left)
        states, _ = self.gru(x)
        # Rotated back, padding positions hold states computed after the whole sequence: zero
        # them, or a padding input whose label is the first item would see the future.
        return states.gather(1, to_right) * (items != 0).unsqueeze(-1)

    def _decode(self, states: Tensor, items: Tensor, start: int) -> Tensor:
        """Outputs ``[B, L - start, H]`` for the queries at positions ``start..L-1``.

        The pairwise attention term is ``[B, Lq, L, H]``, so queries are taken in chunks of
        ``QUERY_CHUNK`` and each chunk only meets the keys it may attend to: those at or before
        its last query, from the first position that is real in some row. That is about half the
        work and memory of the full square, and each chunk's intermediates stay cache-sized.
        """
        length = items.shape[1]
        real = items != 0
        first = int(real.any(0).int().argmax())  # 0 when all is padding: every key is masked anyway
        keys = self.a2(states)
        locals_ = []
        for q0 in range(start, length, QUERY_CHUNK):
            q1 = min(q0 + QUERY_CHUNK, length)
            k0 = min(first, q0)
            positions = torch.arange(k0, q1, device=items.device)
            allowed = (positions <= positions[q0 - k0:, None]) & real[:, None, k0:q1]  # [B, c, k]
            pre = self.a1(states[:, q0:q1]).unsqueeze(2) + keys[:, None, k0:q1]  # [B, c, k, H]
            alpha = self.v(torch.sigmoid(pre)).squeeze(-1) * allowed
            locals_.append(alpha @ states[:, k0:q1])
        local = torch.cat(locals_, dim=1)
        return self.proj(self.ctx_drop(torch.cat([states[:, start:], local], dim=-1)))

    def forward(self, items: Tensor) -> Tensor:
        return self._decode(self._encode(items), items, 0)

    def last_hidden(self, history: Tensor) -> Tensor:
        """Only the last query attends, which avoids the ``L x L`` attention at inference."""
        return self._decode(self._encode(history), history, history.shape[1] - 1)[:, 0]
