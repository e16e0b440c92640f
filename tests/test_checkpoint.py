"""Pickle-free checkpoints: tensors in safetensors with JSON metadata, optimizer state round trip."""

import json
import struct

import pytest
import torch

from llamarec.checkpoint import load_tensors, optimizer_tensors, restore_optimizer, save_tensors
from llamarec.errors import LlamarecError


def safetensors_header(path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])


def test_tensors_and_metadata_round_trip(tmp_path):
    path = tmp_path / "sub" / "t.safetensors"
    tensors = {"a": torch.arange(6).view(2, 3).T, "b": torch.tensor(1.5)}  # a is not contiguous
    save_tensors(path, tensors, {"step": 7, "note": ["x"]})
    loaded, meta = load_tensors(path)
    assert meta == {"step": 7, "note": ["x"]}
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
    header = safetensors_header(path)
    assert header["a"]["shape"] == [3, 2] and json.loads(header["__metadata__"]["json"])["step"] == 7
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temporary left


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(LlamarecError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(LlamarecError, match="not a valid safetensors file"):
        load_tensors(bad)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, betas=(0.8, 0.95)),
    lambda p: torch.optim.AdamW(p, lr=0.05, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
], ids=["adamw", "adamw-amsgrad", "sgd-momentum"])
def test_optimizer_round_trip_gives_identical_next_steps(tmp_path, make_optimizer):
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model = _model(0)
    optimizer = make_optimizer(model.parameters())
    for _ in range(3):
        _step(model, optimizer, x)

    tensors, meta = optimizer_tensors(optimizer)
    save_tensors(tmp_path / "model.safetensors", model.state_dict())
    save_tensors(tmp_path / "opt.safetensors", tensors, meta)

    # a fresh model and optimizer (different init) restored from the files
    restored = _model(123)
    restored.load_state_dict(load_tensors(tmp_path / "model.safetensors")[0])
    opt2 = make_optimizer(restored.parameters())
    restore_optimizer(opt2, *load_tensors(tmp_path / "opt.safetensors"))

    for _ in range(3):
        _step(model, optimizer, x)
        _step(restored, opt2, x)
    for a, b in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(a, b)
    json.dumps(meta)  # the non-tensor part is plain JSON (no pickle needed)


def test_restored_adamw_differs_from_a_fresh_one(tmp_path):
    """The round trip matters: a fresh optimizer (no moments) takes a different step."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    model = _model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    for _ in range(3):
        _step(model, optimizer, x)
    fresh = _model(0)
    fresh.load_state_dict(model.state_dict())
    _step(model, optimizer, x)
    _step(fresh, torch.optim.AdamW(fresh.parameters(), lr=0.05), x)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_an_option_added_since_the_run_started_is_unchanged_while_at_its_default(tmp_path):
    from pydantic import BaseModel

    from llamarec.checkpoint import check_same_config

    class Config(BaseModel):
        lr: float = 1e-3
        new_option: bool = False
        new_list: list[int] = []

    saved = {"lr": 1e-3}  # written before new_option and new_list existed
    assert check_same_config(tmp_path, saved, Config(), "run") == {"lr": 1e-3, "new_option": False, "new_list": []}
    with pytest.raises(LlamarecError, match=r"different config \(new_option\)"):
        check_same_config(tmp_path, saved, Config(new_option=True), "run")
    with pytest.raises(LlamarecError, match=r"different config \(gone, lr\)"):
        check_same_config(tmp_path, {"lr": 1.0, "gone": 3}, Config(), "run")
