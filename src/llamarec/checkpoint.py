"""Saving and restoring training state without pickle: tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from llamarec.configs import read_json_file
from llamarec.errors import LlamarecError
from llamarec.io import atomic_dir, atomic_path, write_json

T = TypeVar("T")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Write tensors (made contiguous) to a safetensors file atomically, with JSON metadata."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"json": json.dumps(meta or {})})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise LlamarecError(f"{path}: file not found")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("json", "{}"))
    except Exception as exc:  # safetensors raises its own error types
        raise LlamarecError(f"{path}: not a valid safetensors file ({exc})") from None
    return tensors, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state dict into named tensors plus JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {f"{idx}.{name}": torch.as_tensor(value)
               for idx, slots in state["state"].items() for name, value in slots.items()}
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(directory: Path, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        rng: dict[str, torch.Tensor], state: dict) -> None:
    """A resumable checkpoint: trainable weights, optimizer state, RNG states and a JSON state.
    The three files replace the previous checkpoint together (a directory swap), so that an
    interruption never leaves the weights of one step with the state of another."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    with atomic_dir(directory) as tmp:
        save_tensors(tmp / "weights.safetensors", weights)
        save_tensors(tmp / "optimizer.safetensors",
                     {**opt_tensors, **{f"rng.{k}": v for k, v in rng.items()}}, opt_meta)
        write_json(tmp / "state.json", state)


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict] | None:
    """Restore the optimizer from a checkpoint of :func:`save_training_state`; returns
    ``(weights, rng, state)``, or None when there is no checkpoint."""
    previous = directory.with_name(f".{directory.name}.old")
    if not (directory / "state.json").is_file() and (previous / "state.json").is_file():
        directory = previous  # interrupted between the two renames of a checkpoint swap
    if not (directory / "state.json").is_file():
        return None
    try:
        state = read_json_file(directory / "state.json")
        weights, _ = load_tensors(directory / "weights.safetensors")
        tensors, meta = load_tensors(directory / "optimizer.safetensors")
    except LlamarecError as exc:
        raise LlamarecError(f"{exc}; delete {directory} to train from the start") from None
    rng = {k.removeprefix("rng."): tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    with restoring(directory):
        restore_optimizer(optimizer, tensors, meta)
    return weights, rng, state


@contextlib.contextmanager
def restoring(directory: Path) -> Iterator[None]:
    """Errors while restoring from the checkpoint in ``directory`` (an edited or foreign
    checkpoint) become one line that says how to start afresh."""
    try:
        yield
    except (TypeError, KeyError, ValueError, RuntimeError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise LlamarecError(f"{directory}: not a usable checkpoint of this run ({type(exc).__name__}: {reason}); "
                            f"delete {directory} to train from the start") from None


def restore_state(cls: type[T], state: dict, directory: Path) -> T:
    """The dataclass ``cls`` (a trainer's state) from the JSON state of a checkpoint, its
    fields type-checked."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(cls).validate_python(state)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "state"
        raise LlamarecError(f"{directory / 'state.json'}: {field}: {err['msg']}; delete {directory} to train "
                            "from the start") from None


def check_same_config(out: Path, saved: dict | None, cfg: BaseModel, what: str) -> dict:
    """Refuse to continue a run in ``out`` whose saved config differs from ``cfg``; returns
    ``cfg`` as JSON data. An option missing from ``saved`` (added to llamarec after the run
    started) counts as unchanged while it is at its default."""
    current = json.loads(cfg.model_dump_json())
    if saved is None:
        return current
    fields = type(cfg).model_fields

    def unchanged(key: str) -> bool:
        if key in saved:
            return key in current and saved[key] == current[key]
        field = fields.get(key)
        return (field is not None and not field.is_required()
                and getattr(cfg, key) == field.get_default(call_default_factory=True))

    diff = sorted(k for k in current.keys() | saved.keys() if not unchanged(k))
    if diff:
        raise LlamarecError(f"{out}: holds a {what} with a different config ({', '.join(diff)}); use another --out")
    return current
