"""LRURec (Yue et al., 2023, arXiv 2310.02367): sequential recommendation with linear recurrent
units.

An LRU layer is a diagonal complex linear recurrence

    h_t = lambda * h_{t-1} + gamma * (B x_t),    y_t = Re(C h_t)

with ``lambda_j = exp(-exp(nu_j) + i exp(theta_j))``. Because the recurrence is linear with a
constant ``lambda``, all ``h_t`` are computed in parallel by a log-depth (Hillis-Steele) scan
with a hand-written backward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .base import (
    Dropout,
    FeedForward,
    RetrieverConfig,
    SequentialRecommender,
    init_weights,
    register_model,
)


def _scan(lam: Tensor, x: Tensor, reverse: bool = False) -> Tensor:
    """In place: ``x_t <- sum_{s<=t} lam^(t-s) x_s`` along dim 1 (``s>=t`` if ``reverse``).

    Hillis-Steele doubling: after the step with offset ``d``, ``x_t`` sums ``2d`` terms, so
    ``ceil(log2 L)`` tensor operations suffice. The right-hand side is materialised before the
    in-place add, so each step reads the previous step's values.
    """
    length = x.shape[1]
    power = lam  # lam^d
    d = 1
    while d < length:
        if reverse:
            x[:, :-d] += power * x[:, d:]
        else:
            x[:, d:] += power * x[:, :-d]
        power = power * power
        d *= 2
    return x


class LinearScan(torch.autograd.Function):
    """``h_t = lam * h_{t-1} + u_t`` (``h_{-1} = 0``) for complex ``lam [N]``, ``u [B, L, N]``.

    Hand-written backward (autograd through the scan steps is about 3x slower): the adjoint of a
    linear recurrence is the same recurrence run backwards with ``conj(lam)``, and
    ``dL/dlam = sum_t du_t * conj(h_{t-1})`` (torch's conjugate-Wirtinger convention).
    """

    @staticmethod
    def forward(ctx: Any, lam: Tensor, u: Tensor) -> Tensor:
        h = _scan(lam, u.clone())
        ctx.save_for_backward(lam, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_h: Tensor) -> tuple[Tensor, Tensor]:
        lam, h = ctx.saved_tensors
        grad_u = _scan(lam.conj(), grad_h.clone(), reverse=True)
        grad_lam = (grad_u[:, 1:] * h[:, :-1].conj()).sum((0, 1))
        return grad_lam, grad_u


def linear_scan(lam: Tensor, u: Tensor) -> Tensor:
    """Parallel evaluation of ``h_t = lam * h_{t-1} + u_t`` along dim 1 (see :class:`LinearScan`)."""
    return LinearScan.apply(lam, u)


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
        # B x as interleaved (real, imaginary) pairs, viewed as complex without a copy;
        # Re(C h) = Re(C) Re(h) - Im(C) Im(h) is a real linear map of those pairs (plus a bias).
        self.in_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.out_proj = nn.Linear(2 * hidden, hidden)

    def eigenvalues(self) -> Tensor:
        """Complex ``lambda``, ``[hidden]``."""
        return torch.polar(torch.exp(-torch.exp(self.nu_log)), torch.exp(self.theta_log))

    def forward(self, x: Tensor, real: Tensor) -> Tensor:
        """``x [B, L, H]``; ``real [B, L, 1]`` is 1.0 at real items and 0.0 at padding, whose
        input is zeroed so the state stays exactly 0 through the left-padding prefix."""
        b, length, _ = x.shape
        gamma = torch.exp(self.gamma_log).unsqueeze(-1)
        u = self.in_proj(x).view(b, length, -1, 2) * gamma * real.unsqueeze(-1)
        h = linear_scan(self.eigenvalues(), torch.view_as_complex(u))
        return self.out_proj(torch.view_as_real(h).flatten(2))


class LRUBlock(nn.Module):
    """LRU layer then feed-forward, each with dropout, residual and (post-)LayerNorm."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.lru = LRULayer(hidden)
        self.drop = Dropout(dropout)
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
        self.emb_drop = Dropout(config.dropout)
        self.blocks = nn.ModuleList(LRUBlock(config.hidden, config.dropout) for _ in range(config.n_blocks))
        self.apply(init_weights)

    def forward(self, items: Tensor) -> Tensor:
        real = (items != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.emb_drop(self.emb_norm(self.item_emb(items)))
        for block in self.blocks:
            x = block(x, real)
        return x
