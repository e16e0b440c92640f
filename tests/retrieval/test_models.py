"""Tests of the retrieval models: scan correctness, padding and causality, losses, masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from llamarec.errors import LlamarecError
from llamarec.retrieval.models import MODELS, RetrieverConfig, build_model
from llamarec.retrieval.models.base import Dropout, LinearCrossEntropy
from llamarec.retrieval.models.lru import LinearScan, LRULayer, linear_scan

CAUSAL = ["lru", "sasrec", "narm"]
ALL = sorted(MODELS)
N_ITEMS = 30


def tiny_config(**overrides) -> RetrieverConfig:
    values = dict(n_items=N_ITEMS, max_len=16, hidden=16, n_blocks=2, n_heads=2)
    return RetrieverConfig(**{**values, **overrides})


def make(name: str, **overrides):
    torch.manual_seed(0)
    return build_model(name, tiny_config(**overrides)).eval()


def left_padded(generator: torch.Generator, batch: int = 3, length: int = 9) -> torch.Tensor:
    """Random items with a different number of left pads per row (at least one real item)."""
    items = torch.randint(1, N_ITEMS + 1, (batch, length), generator=generator)
    for row in range(batch):
        items[row, : row * 2] = 0
    return items


def test_registry_has_the_four_models():
    assert ALL == ["bert4rec", "lru", "narm", "sasrec"]


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(LlamarecError, match="bert4rec, lru, narm, sasrec"):
        build_model("gru4rec", tiny_config())


def test_config_round_trip_and_unknown_field():
    config = tiny_config(dropout=0.1)
    assert RetrieverConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LlamarecError, match="unknown field"):
        RetrieverConfig.from_dict({**config.to_dict(), "hiden": 8})
    with pytest.raises(LlamarecError, match="multiple of n_heads"):
        tiny_config(hidden=15)


def test_linear_scan_matches_sequential_loop():
    g = torch.Generator().manual_seed(1)
    lam = torch.polar(0.5 + 0.5 * torch.rand(6, generator=g), 2 * math.pi * torch.rand(6, generator=g))
    u = torch.randn(4, 13, 6, dtype=torch.complex64, generator=g)
    state = torch.zeros(4, 6, dtype=torch.complex64)
    expected = []
    for t in range(u.shape[1]):
        state = lam * state + u[:, t]
        expected.append(state)
    torch.testing.assert_close(linear_scan(lam, u), torch.stack(expected, 1), rtol=0, atol=1e-5)


def test_linear_scan_gradient():
    g = torch.Generator().manual_seed(2)
    modulus, angle = torch.rand(2, 3, generator=g, dtype=torch.float64)
    lam = torch.polar(modulus, 6 * angle).requires_grad_()
    u = torch.randn(2, 7, 3, dtype=torch.complex128, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(LinearScan.apply, (lam, u))


def test_lru_init():
    torch.manual_seed(0)
    layer = LRULayer(256)
    modulus = layer.eigenvalues().abs()
    assert modulus.min() >= 0.8 - 1e-6 and modulus.max() <= 0.99 + 1e-6
    torch.testing.assert_close(torch.exp(layer.gamma_log), torch.sqrt(1 - modulus**2))
    phase = torch.exp(layer.theta_log)
    assert phase.min() >= 0 and phase.max() <= 2 * math.pi


@pytest.mark.parametrize("name", ALL)
def test_left_padding_does_not_leak(name):
    model = make(name)
    items = left_padded(torch.Generator().manual_seed(3))
    padded = F.pad(items, (4, 0))
    real = items != 0
    with torch.no_grad():
        out, out_padded = model(items), model(padded)[:, 4:]
        torch.testing.assert_close(out_padded[real], out[real], rtol=0, atol=1e-5)
        # BERT4Rec drops the first item of a full history to make room for the mask token.
        rows = items[:, 0] == 0 if name == "bert4rec" else slice(None)
        torch.testing.assert_close(
            model.score_last(padded)[rows], model.score_last(items)[rows], rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_models_do_not_look_ahead(name):
    """Also at padding positions: the one just before the first item is trained to predict it."""
    model = make(name)
    items = left_padded(torch.Generator().manual_seed(4))
    t = 5
    changed = items.clone()
    changed[:, t + 1 :] = changed[:, t + 1 :] % N_ITEMS + 1
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, : t + 1], model(items)[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(model(changed)[:, t + 1 :], model(items)[:, t + 1 :])


@pytest.mark.parametrize("name", ALL)
def test_shapes(name):
    model = make(name)
    items = left_padded(torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert model(items).shape == (3, 9, 16)
        assert model.last_hidden(items).shape == (3, 16)
        assert model.score_last(items).shape == (3, N_ITEMS + 1)
        assert model.scores(torch.zeros(2, 5, 16)).shape == (2, 5, N_ITEMS + 1)


@pytest.mark.parametrize("name", ALL)
def test_loss_is_cross_entropy_at_labelled_positions(name):
    model = make(name)
    g = torch.Generator().manual_seed(6)
    inputs = left_padded(g)
    labels = torch.randint(1, N_ITEMS + 1, inputs.shape, generator=g)
    labels[torch.rand(inputs.shape, generator=g) < 0.5] = 0
    with torch.no_grad():
        loss = model.loss(inputs, labels)
        logits = model.scores(model(inputs))[..., 1:]
        keep = labels != 0
        expected = F.cross_entropy(logits[keep], labels[keep] - 1)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    assert model.loss(inputs, torch.zeros_like(labels)).item() == 0.0


def test_fused_cross_entropy_gradients():
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (7,), generator=g)
    assert torch.autograd.gradcheck(LinearCrossEntropy.apply, (hidden, weight, bias, target))
    expected = F.cross_entropy(F.linear(hidden, weight, bias), target)
    torch.testing.assert_close(LinearCrossEntropy.apply(hidden, weight, bias, target), expected)


@pytest.mark.parametrize("name", ALL)
def test_training_reduces_loss_on_a_repeated_pattern(name):
    torch.manual_seed(0)
    model = build_model(name, tiny_config(dropout=0.0, attn_dropout=0.0, mask_prob=0.3))
    pattern = torch.tensor([3, 7, 1, 9, 4])
    window = pattern.repeat(4)[None, :13].repeat(8, 1)
    window[:4, :3] = 0
    g = torch.Generator().manual_seed(7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(*model.training_batch(window, g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_causal_training_batch_shifts_by_one():
    model = make("sasrec")
    window = torch.tensor([[0, 0, 5, 6, 7]])
    inputs, labels = model.training_batch(window, None)
    assert inputs.tolist() == [[0, 0, 5, 6]] and labels.tolist() == [[0, 5, 6, 7]]


def test_bert4rec_masks_real_positions_and_labels_them():
    model = make("bert4rec", mask_prob=0.2)
    g = torch.Generator().manual_seed(8)
    window = torch.randint(1, N_ITEMS + 1, (500, 11), generator=g)
    window[::2, :6] = 0
    window[1, :] = 0  # an empty row must stay empty
    inputs, labels = model.training_batch(window, g)
    original = window[:, 1:]
    masked = inputs == model.mask_token
    assert not (masked & (original == 0)).any()
    assert torch.equal(labels != 0, masked)
    assert torch.equal(labels[masked], original[masked])
    assert torch.equal(inputs[~masked], original[~masked])
    non_empty = (original != 0).any(1)
    assert masked[non_empty].any(1).all() and not masked[1].any()
    rate = masked[:, :-1][original[:, :-1] != 0].float().mean().item()
    assert 0.1 < rate < 0.25
    assert masked[non_empty, -1].float().mean().item() > 0.3


def test_bert4rec_predicts_from_an_appended_mask_token():
    model = make("bert4rec")
    history = torch.tensor([[0, 4, 5, 6], [1, 2, 3, 4]])
    shifted = torch.tensor([[4, 5, 6, model.mask_token], [2, 3, 4, model.mask_token]])
    with torch.no_grad():
        torch.testing.assert_close(model.last_hidden(history), model(shifted)[:, -1])


def test_dropout_keeps_the_expected_fraction():
    torch.manual_seed(0)
    dropout = Dropout(0.2)
    x = torch.ones(100_000)
    y = dropout(x)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.01
    assert set(y.unique().tolist()) == {0.0, 1.25}
    assert torch.equal(dropout.eval()(x), x)


def test_narm_chunked_attention_matches_the_full_formula():
    """Queries are processed in chunks against causal, non-padding keys only; the result must be
    the paper's ``c_t = sum_{j<=t, j real} v^T sigmoid(A1 h_t + A2 h_j) h_j`` for every query."""
    model = make("narm", max_len=80)
    g = torch.Generator().manual_seed(10)
    items = torch.randint(1, N_ITEMS + 1, (3, 75), generator=g)  # > 2 chunks of 32 queries
    items[0, :40], items[1, :3] = 0, 0
    with torch.no_grad():
        states = model._encode(items)
        pre = model.a1(states).unsqueeze(2) + model.a2(states).unsqueeze(1)
        causal = torch.ones(75, 75, dtype=torch.bool).tril()
        alpha = model.v(torch.sigmoid(pre)).squeeze(-1) * (causal & (items != 0)[:, None, :])
        expected = model.proj(torch.cat([states, alpha @ states], dim=-1))
        torch.testing.assert_close(model(items), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.last_hidden(items), expected[:, -1], rtol=0, atol=1e-5)
