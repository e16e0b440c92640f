"""Retriever training on the tiny world: artifacts, metrics, re-reading, resume, config checks,
and history exclusion in evaluation (with a fake model of fixed scores)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from llamarec.checkpoint import load_tensors, save_tensors
from llamarec.data.split import eval_examples, train_sequence
from llamarec.errors import LlamarecError
from llamarec.retrieval.evaluate import evaluate, evaluate_ranks, top_k
from llamarec.retrieval.models.base import SequentialRecommender
from llamarec.retrieval.train import Trainer, load_retriever, train_retriever
from llamarec.retrieval.windows import training_windows

KEYS = {f"{m}@{k}" for m in ("Recall", "NDCG", "MRR") for k in (1, 5, 10, 20)}


class Interrupted(Exception):
    pass


def expected_steps(ds, cfg) -> int:
    windows = training_windows([train_sequence(s) for s in ds.sequences], cfg.max_len, cfg.window_step)
    return cfg.max_epochs * math.ceil(len(windows) / cfg.batch_size)


def interrupt_loss_after(monkeypatch, n: int) -> dict:
    """Make the model's loss raise on call ``n + 1`` (after ``n`` optimizer steps)."""
    calls = {"n": 0}
    original = SequentialRecommender.loss

    def loss(self, inputs, labels):
        calls["n"] += 1
        if calls["n"] > n:
            raise Interrupted(f"stopped before step {calls['n']}")
        return original(self, inputs, labels)

    monkeypatch.setattr(SequentialRecommender, "loss", loss)
    return calls


def hand_metrics(ranks: np.ndarray, k: int) -> dict[str, float]:
    hit = ranks < k
    return {f"Recall@{k}": hit.mean(),
            f"NDCG@{k}": np.where(hit, 1 / np.log2(ranks + 2.0), 0).mean(),
            f"MRR@{k}": np.where(hit, 1 / (ranks + 1.0), 0).mean()}


# --------------------------------------------------------------------------- a finished run

def test_run_writes_config_model_and_metrics(tiny_retriever_run, tiny_retrieval_config, tiny_dataset):
    cfg = tiny_retrieval_config()
    config = json.loads((tiny_retriever_run / "config.json").read_text())
    assert config["train"] == json.loads(cfg.model_dump_json())
    assert config["model"]["n_items"] == tiny_dataset.n_items and config["model"]["hidden"] == 8
    assert config["data"]["users"] == tiny_dataset.n_users
    tensors, meta = load_tensors(tiny_retriever_run / "model.safetensors")
    assert "item_emb.weight" in tensors

    metrics = json.loads((tiny_retriever_run / "metrics.json").read_text())
    assert set(metrics["val"]) == set(metrics["test"]) == KEYS
    steps = expected_steps(tiny_dataset, cfg)
    assert metrics["steps"] == steps and metrics["epochs"] == cfg.max_epochs
    assert [h["step"] for h in metrics["history"]] == list(range(3, steps + 1, 3))
    # the kept model is the first best validation, and its step is in the file's metadata
    values = [h[cfg.metric] for h in metrics["history"]]
    best = metrics["history"][int(np.argmax(values))]
    assert metrics["best_step"] == best["step"] == meta["step"]
    assert metrics["val"][cfg.metric] == pytest.approx(best[cfg.metric])
    assert (tiny_retriever_run / "last" / "state.json").is_file()
    assert json.loads((tiny_retriever_run / "last" / "state.json").read_text())["finished"] is True


@pytest.mark.parametrize("split", ["val", "test"])
def test_metrics_are_means_over_users_of_the_loaded_model(tiny_retriever_run, split):
    model, cfg, ds = load_retriever(tiny_retriever_run)
    assert not model.training
    histories, targets = eval_examples(ds, split)
    ranks = evaluate_ranks(model, histories, targets, cfg.max_len, batch_size=7)  # odd batches
    assert ranks.shape == (ds.n_users,) and (ranks >= 0).all()
    assert (ranks <= ds.n_items - 1 - np.array([len(h) for h in histories])).all()
    saved = json.loads((tiny_retriever_run / "metrics.json").read_text())[split]
    for k in (1, 5, 10, 20):
        for name, value in hand_metrics(ranks, k).items():
            assert saved[name] == pytest.approx(value, abs=1e-12)
    assert evaluate(model, histories, targets, cfg.max_len) == pytest.approx(saved)
    # the tiny world's pattern is learnable: better than a random order over ~37 items
    assert saved["Recall@10"] > 0.4


def test_rerunning_a_finished_run_rereads_it_without_training(tiny_retriever_run, tiny_retrieval_config,
                                                              tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(tiny_retriever_run, out)
    before = json.loads((out / "metrics.json").read_text())
    interrupt_loss_after(monkeypatch, 0)  # any training step would raise
    state = json.loads((out / "last" / "state.json").read_text())
    (out / "last" / "state.json").write_text(json.dumps({**state, "device": "cuda"}))  # as if trained on a GPU
    again = train_retriever(tiny_retrieval_config(), out, progress=False, device="cpu")
    assert again["device"] == "cuda"  # where it trained, not where it was re-read
    assert {k: again[k] for k in ("val", "test", "best_step", "steps", "history")} == \
        {k: before[k] for k in ("val", "test", "best_step", "steps", "history")}
    assert json.loads((out / "metrics.json").read_text())["test"] == before["test"]


@pytest.mark.parametrize("model,stop_after", [("lru", 6), ("lru", 7), ("bert4rec", 7)],
                         ids=["at-validation", "between-validations", "bert4rec-masking"])
def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(
        tiny_retriever_run, tiny_retrieval_config, tiny_dataset, tmp_path, monkeypatch, model, stop_after):
    cfg = tiny_retrieval_config(model=model)
    if model == "lru":
        reference_run = tiny_retriever_run
    else:  # BERT4Rec also draws its masks from a generator that the checkpoint must restore
        reference_run = tmp_path / "reference"
        train_retriever(cfg, reference_run, progress=False)
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        interrupt_loss_after(mp, stop_after)
        with pytest.raises(Interrupted):
            train_retriever(cfg, out, progress=False)
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["step"] == 6 and not state["finished"]  # the last validation (eval_every=3)
    assert not (out / "metrics.json").exists()

    resumed_at = []
    original_resume = Trainer._resume

    def spy(self):
        ok = original_resume(self)
        resumed_at.append((ok, self.state.step))
        return ok

    monkeypatch.setattr(Trainer, "_resume", spy)
    calls = interrupt_loss_after(monkeypatch, 10_000)
    metrics = train_retriever(cfg, out, progress=False)
    steps = expected_steps(tiny_dataset, cfg)
    assert resumed_at == [(True, 6)]
    assert calls["n"] == steps - 6  # only the remaining steps were trained
    assert metrics["steps"] == steps

    # the checkpoint holds model, optimizer and RNG states, so the result is the same as
    # an uninterrupted run with the same config and seed
    reference = json.loads((reference_run / "metrics.json").read_text())
    for key in ("val", "test", "best_step", "history"):
        assert metrics[key] == reference[key], key
    for name in ("model.safetensors", "last/weights.safetensors"):
        got, ref = load_tensors(out / name)[0], load_tensors(reference_run / name)[0]
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), (name, key)


def test_a_checkpoint_from_a_gpu_resumes_on_the_cpu(tiny_retrieval_config, tmp_path, monkeypatch):
    """A GPU run's checkpoint also holds the CUDA generator's state; the CPU ignores it."""
    cfg = tiny_retrieval_config()
    reference = train_retriever(cfg, tmp_path / "reference", progress=False, device="cpu")
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        interrupt_loss_after(mp, 6)
        with pytest.raises(Interrupted):
            train_retriever(cfg, out, progress=False, device="cpu")
    path = out / "last" / "optimizer.safetensors"
    tensors, meta = load_tensors(path)
    save_tensors(path, {**tensors, "rng.cuda": torch.zeros(16, dtype=torch.uint8)}, meta)
    metrics = train_retriever(cfg, out, progress=False, device="cpu")
    assert metrics["device"] == "cpu"
    for key in ("val", "test", "best_step", "history"):
        assert metrics[key] == reference[key], key


def test_a_different_config_in_the_same_directory_is_refused(tiny_retriever_run, tiny_retrieval_config,
                                                             tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_retriever_run / "config.json", out / "config.json")
    with pytest.raises(LlamarecError, match=r"different config \(hidden, lr\)"):
        train_retriever(tiny_retrieval_config(hidden=16, lr=0.01), out, progress=False)
    assert json.loads((out / "config.json").read_text())["train"]["hidden"] == 8  # untouched


def test_load_retriever_needs_a_run(tmp_path):
    with pytest.raises(LlamarecError, match="not a retriever run"):
        load_retriever(tmp_path)


def test_run_shorter_than_eval_every_validates_once_at_the_end(tiny_retrieval_config, tiny_dataset,
                                                                tmp_path):
    cfg = tiny_retrieval_config(max_epochs=1, eval_every=1000)
    metrics = train_retriever(cfg, tmp_path / "run", progress=False)
    steps = expected_steps(tiny_dataset, cfg)
    assert [h["step"] for h in metrics["history"]] == [steps]
    assert metrics["best_step"] == steps and (tmp_path / "run" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- history exclusion

class FixedScores(torch.nn.Module):
    """A stand-in retriever whose scores for items 0..n do not depend on the history."""

    def __init__(self, scores: list[float]) -> None:
        super().__init__()
        self.register_buffer("fixed", torch.tensor(scores))
        self.seen: list[torch.Tensor] = []

    def score_last(self, history: torch.Tensor) -> torch.Tensor:
        self.seen.append(history.clone())
        return self.fixed.expand(len(history), -1).clone()


# item:   0 (pad)  1    2    3    4    5
SCORES = [100.0, 9.0, 1.0, 8.0, 2.0, 3.0]


def hists(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(r, dtype=np.int64) for r in rows]


def test_evaluation_never_ranks_a_history_item_above_the_target():
    model = FixedScores(SCORES)
    ranks = evaluate_ranks(model, hists([1, 3], [1, 3], [4], [1, 3]), np.array([5, 2, 5, 3]), max_len=4)
    # row 0: items 1 and 3 (and padding) score highest but are history: 5 is first of {2, 4, 5}
    # row 1: target 2 is last of {2, 4, 5}; row 2: {1, 2, 3, 5} -> 1, 3, 5: rank 2
    # row 3: a re-consumed target (3, in the history) stays scorable: first of {2, 3, 4, 5}
    assert ranks.tolist() == [0, 2, 2, 0]
    for training in (True, False):  # evaluation runs in eval mode and restores the mode
        model.train(training)
        evaluate_ranks(model, hists([1]), np.array([2]), max_len=4)
        assert model.training is training


def test_exclusion_uses_the_whole_history_while_the_model_sees_the_last_max_len():
    model = FixedScores(SCORES)
    ranks = evaluate_ranks(model, hists([1, 3, 5, 4], [2]), np.array([2, 5]), max_len=2, batch_size=8)
    assert ranks.tolist() == [0, 2]  # row 0: only item 2 is left; row 1: 1, 3, then 5
    assert model.seen[0].tolist() == [[5, 4], [0, 2]]  # left-padded, last max_len items


def test_top_k_skips_history_and_padding():
    model = FixedScores(SCORES)
    items, scores = top_k(model, hists([1, 3], [5], [1, 2, 3]), k=2, max_len=3, batch_size=2)
    assert items.tolist() == [[5, 4], [1, 3], [5, 4]]
    assert scores.tolist() == [[3.0, 2.0], [9.0, 8.0], [3.0, 2.0]]


def test_evaluate_means_over_users():
    model = FixedScores(SCORES)
    metrics = evaluate(model, hists([1, 3], [1, 3], [4]), np.array([5, 2, 5]), max_len=4, ks=(1, 3))
    # ranks 0, 2, 2
    assert metrics["Recall@1"] == pytest.approx(1 / 3)
    assert metrics["Recall@3"] == pytest.approx(1.0)
    assert metrics["NDCG@3"] == pytest.approx((1 + 2 / np.log2(4)) / 3)
    assert metrics["MRR@3"] == pytest.approx((1 + 2 / 3) / 3)
