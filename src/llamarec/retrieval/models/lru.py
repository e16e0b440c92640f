"""LRURec (Yue et al., 2023, arXiv 2310.02367): sequential recommendation with linear recurrent
units.

An LRU layer is a diagonal complex linear recurrence

    h_t = lambda * h_{t-1} + gamma * (B x_t),    y_t = Re(C h_t)

with ``lambda_j = exp(-exp(nu_j) + i exp(theta_j))``. Because the recurrence is linear with a
constant ``lambda``, all ``h_t`` are computed in parallel by a log-depth (Hillis-Steele) scan.
Complex numbers are kept as separate real and imaginary float tensors, which is faster on CPU
than torch's complex dtype under autograd.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import (
    FeedForward,
    RetrieverConfig,
    SequentialRecommender,
    init_weights,
    register_model,
)


def lru_scan(lam_re: Tensor, lam_im: Tensor, u_re: Tensor, u_im: Tensor) -> tuple[Tensor, Tensor]:
    """All states of ``h_t = lambda * h_{t-1} + u_t`` (``h_{-1} = 0``) along dim 1.

    ``lam_*``: ``[N]``; ``u_*``: ``[B, L, N]``. After the step with offset ``d``, ``h_t`` holds
    ``sum_{s=t-2d+1..t} lambda^(t-s) u_s``; doubling ``d`` needs ``ceil(log2 L)`` steps.
    """
    length = u_re.shape[1]
    p_re, p_im = lam_re, lam_im  # lambda^d
    h_re, h_im = u_re, u_im
    d = 1
    while d < length:
        s_re, s_im = h_re[:, :-d], h_im[:, :-d]
        h_re = torch.cat([h_re[:, :d], h_re[:, d:] + (p_re * s_re - p_im * s_im)], dim=1)
        h_im = torch.cat([h_im[:, :d], h_im[:, d:] + (p_re * s_im + p_im * s_re)], dim=1)
        p_re, p_im = p_re * p_re - p_im * p_im, 2 * p_re * p_im
        d *= 2
    return h_re, h_im


class LRULayer(nn.Module):
    """One LRU over ``hidden`` complex state dimensions."""

    def __init__(
        self,
        hidden: int,
        r_min: float = 0.8,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        radius = torch.empty(hidden).uniform_(r_min, r_max)
        phase = torch.empty(hidden).uniform_(0.0, max_phase).clamp(min=1e-4)  # log(0) = -inf
        self.nu_log = nn.Parameter(torch.log(-torch.log(radius)))
        self.theta_log = nn.Parameter(torch.log(phase))
        # Normalisation gamma = sqrt(1 - |lambda|^2), learned in log space from its initial value.
        self.gamma_log = nn.Parameter(0.5 * torch.log(1 - radius**2))
        self.in_proj = nn.Linear(hidden, 2 * hidden, bias=False)  # B as [Re B; Im B]
        self.out_proj = nn.Linear(2 * hidden, hidden)  # Re(C h) = [Re C, -Im C] @ [Re h; Im h]

    def eigenvalues(self) -> tuple[Tensor, Tensor]:
        """``(Re lambda, Im lambda)``, each ``[hidden]``."""
        modulus = torch.exp(-torch.exp(self.nu_log))
        angle = torch.exp(self.theta_log)
        return modulus * torch.cos(angle), modulus * torch.sin(angle)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """``x [B, L, H]``; ``real [B, L, 1]`` is 1.0 at real items and 0.0 at padding, whose
        input is zeroed so the state stays exactly 0 through the left-padding prefix."""
        gamma = torch.exp(self.gamma_log).repeat(2)
        u = self.in_proj(x) * gamma * real
        u_re, u_im = u.chunk(2, dim=-1)
        h_re, h_im = lru_scan(*self.eigenvalues(), u_re, u_im)
        return self.out_proj(torch.cat([h_re, h_im], dim=-1))


class LRUBlock(nn.Module):
    """LRU layer then feed-forward, each with dropout, residual and (post-)LayerNorm."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.lru = LRULayer(hidden)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.ffn = FeedForward(hidden, 4 * hidden, nn.GELU(), dropout)
        self.norm2 = nn.LayerNorm(hidden)

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        x = self.norm1(x + self.drop(self.lru(x, real)))
        return self.norm2(x + self.ffn(x))


@register_model("lru")
class LRURec(SequentialRecommender):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__(config)
        self.emb_norm = nn.LayerNorm(config.hidden)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            LRUBlock(config.hidden, config.dropout) for _ in range(config.n_blocks)
        )
        self.apply(init_weights)

    def forward(self, items: Tensor) -> Tensor:
        real = (items != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.emb_drop(self.emb_norm(self.item_emb(items)))
        for block in self.blocks:
            x = block(x, real)
        return x
