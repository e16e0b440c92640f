"""A resume checkpoint is replaced as a whole: an interruption while it is written leaves the
previous one, never the weights of one step with the state of another (found by the
fault-injection suite: a kill between the weights and state.json of a checkpoint made the
resumed ranker replay a step on weights that had already taken it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llamarec import io
from llamarec.checkpoint import load_training_state, save_training_state


def save(directory: Path, step: int) -> torch.optim.Optimizer:
    weight = torch.nn.Parameter(torch.full((3,), float(step)))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    save_training_state(directory, {"w": weight.detach()}, optimizer, {"torch": torch.get_rng_state()},
                        {"step": step})
    return optimizer


def test_a_checkpoint_interrupted_mid_write_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    last = tmp_path / "last"
    optimizer = save(last, 1)
    real_replace = os.replace

    def interrupted(src, dst):
        if str(dst).endswith("state.json"):
            raise KeyboardInterrupt  # stands for a kill after the weights, before the state
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(last, 2)
    monkeypatch.setattr(io.os, "replace", real_replace)
    weights, _, state = load_training_state(last, optimizer)
    assert state == {"step": 1} and weights["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_kill_between_the_two_renames_of_the_swap_resumes_from_the_previous_one(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    last = tmp_path / "last"
    optimizer = save(last, 1)
    real_replace = os.replace

    def interrupted(src, dst):
        real_replace(src, dst)
        if Path(dst).name == ".last.old":  # the old checkpoint moved aside, the new one not yet in place
            raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(last, 2)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not last.exists()
    weights, _, state = load_training_state(last, optimizer)
    assert state == {"step": 1} and weights["w"].tolist() == [1.0, 1.0, 1.0]
    save(last, 3)  # the next checkpoint takes its place as usual
    assert load_training_state(last, optimizer)[2] == {"step": 3}
