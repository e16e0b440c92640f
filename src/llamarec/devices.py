"""Choosing the torch device a model runs on."""

from __future__ import annotations

import torch

from llamarec.errors import LlamarecError


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is taken as given,
    and a CUDA device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise LlamarecError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise LlamarecError(f"device {device!r}: no such CUDA device here "
                            f"({torch.cuda.device_count()} visible); use --device cpu or auto")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise LlamarecError(f"device {device!r}: Apple MPS is not available here; use --device cpu or auto")
    return target
