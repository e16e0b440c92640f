import pytest
import torch

from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LlamarecError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_missing_cuda_device_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(LlamarecError, match=r"device 'cuda:1': no such CUDA device here \(0 visible\)"):
        resolve_device("cuda:1")
