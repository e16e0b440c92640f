"""Candidate generation on the tiny world: shapes, order, exclusions, ranks, file format,
training prefixes and errors."""

import json
import shutil
import struct

import numpy as np
import pytest

from llamarec.candidates import Candidates, load_candidates, load_train_candidates
from llamarec.data.split import eval_examples, history_and_target
from llamarec.errors import LlamarecError
from llamarec.metrics import metrics_from_ranks
from llamarec.retrieval.candidates import generate_candidates
from llamarec.retrieval.evaluate import evaluate_ranks
from llamarec.retrieval.train import load_retriever, train_retriever


@pytest.fixture
def run_copy(tiny_retriever_run, tmp_path):
    """A writable copy of the tiny retriever run (model and config, no candidates)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_retriever_run, out,
                    ignore=shutil.ignore_patterns("candidates.safetensors", "candidates.json"))
    return out


@pytest.mark.parametrize("split", ["val", "test"])
def test_candidates_are_top_k_without_history_or_padding(tiny_retriever_run, tiny_dataset, split):
    cands = load_candidates(tiny_retriever_run, split)
    n = tiny_dataset.n_users
    assert cands.items.shape == cands.scores.shape == (n, 20) and cands.k == 20
    assert cands.targets.shape == cands.ranks.shape == (n,)
    assert np.all(np.diff(cands.scores, axis=1) <= 0)  # best first
    assert np.isfinite(cands.scores).all()
    for user, seq in enumerate(tiny_dataset.sequences):
        history, target = history_and_target(seq, split)
        items = cands.items[user]
        assert len(set(items.tolist())) == 20
        assert ((items >= 1) & (items <= tiny_dataset.n_items)).all()  # no padding (0)
        assert not set(items.tolist()) & set(history.tolist())
        assert cands.targets[user] == target


@pytest.mark.parametrize("split", ["val", "test"])
def test_ranks_agree_with_the_candidates_and_the_full_ranking(tiny_retriever_run, split):
    cands = load_candidates(tiny_retriever_run, split)
    inside = (cands.items == cands.targets[:, None]).any(1)
    assert (inside == cands.valid()).all()  # target among the candidates <=> rank < k
    assert 0 < cands.valid().sum() < len(cands.ranks)  # the tiny world has hits and misses
    for user in np.flatnonzero(inside):  # a hit's rank is its position among the candidates
        assert np.flatnonzero(cands.items[user] == cands.targets[user])[0] == cands.ranks[user]
    model, cfg, ds = load_retriever(tiny_retriever_run)
    histories, targets = eval_examples(ds, split)
    assert (evaluate_ranks(model, histories, targets, cfg.max_len) == cands.ranks).all()
    summary = json.loads((tiny_retriever_run / "candidates.json").read_text())
    assert summary["k"] == 20 and summary[split]["users"] == len(targets)
    assert summary[split]["valid_subset"] == int(cands.valid().sum())
    assert summary[split]["metrics"] == pytest.approx(metrics_from_ranks(cands.ranks, (1, 5, 10, 20)))
    # the run's own test metrics come from the same ranks
    if split == "test":
        run_metrics = json.loads((tiny_retriever_run / "metrics.json").read_text())["test"]
        assert summary[split]["metrics"] == pytest.approx(run_metrics)


def test_candidates_file_is_safetensors(tiny_retriever_run):
    raw = (tiny_retriever_run / "candidates.safetensors").read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    names = {f"{s}.{n}" for s in ("val", "test") for n in ("items", "scores", "targets", "ranks")}
    names |= {f"train.{n}" for n in ("users", "positions", "items", "scores", "targets")}
    assert set(header) - {"__metadata__"} == names
    assert header["val.items"]["dtype"] == "I64" and header["val.scores"]["dtype"] == "F32"
    assert header["train.items"]["shape"] == [50, 20]


def test_training_prefixes(tiny_retriever_run, tiny_dataset):
    train = load_train_candidates(tiny_retriever_run)
    assert set(train) == {"users", "positions", "items", "scores", "targets"}
    assert len(train["users"]) == 50 and train["items"].shape == (50, 20)
    pairs = list(zip(train["users"].tolist(), train["positions"].tolist(), strict=True))
    assert len(set(pairs)) == 50 and pairs == sorted(pairs)
    for row, (user, pos) in enumerate(pairs):
        seq = tiny_dataset.sequences[user]
        assert 1 <= pos <= len(seq) - 3  # a training position (the last two are val/test)
        assert train["targets"][row] == seq[pos]
        items = train["items"][row]
        assert not set(items.tolist()) & set(seq[:pos].tolist()) and (items > 0).all()
        assert np.all(np.diff(train["scores"][row]) <= 0)
    summary = json.loads((tiny_retriever_run / "candidates.json").read_text())["train"]
    hits = (train["items"] == train["targets"][:, None]).any(1).mean()
    assert summary == {"prefixes": 50, "target_in_candidates": pytest.approx(hits)}


def test_all_training_prefixes_when_fewer_than_asked(run_copy, tiny_dataset):
    generate_candidates(run_copy, k=5, train_prefixes=10_000, seed=3)
    train = load_train_candidates(run_copy)
    expected = [(u, p) for u, s in enumerate(tiny_dataset.sequences) for p in range(1, len(s) - 2)]
    assert list(zip(train["users"].tolist(), train["positions"].tolist(), strict=True)) == expected
    assert train["items"].shape == (len(expected), 5)


def test_no_training_prefixes_is_a_clear_error(run_copy):
    summary = generate_candidates(run_copy, k=7)
    assert "train" not in summary and load_candidates(run_copy, "val").k == 7
    with pytest.raises(LlamarecError, match=r"k=7\) hold no training prefixes.*--train-prefixes"):
        load_train_candidates(run_copy)


def test_missing_candidates_is_a_clear_error(run_copy):
    with pytest.raises(LlamarecError, match="no candidates"):
        load_candidates(run_copy, "val")


def test_k_out_of_range(run_copy, tiny_dataset):
    longest = max(len(s) - 1 for s in tiny_dataset.sequences)  # the longest test history
    room = tiny_dataset.n_items - longest
    for k in (0, room + 1, tiny_dataset.n_items + 1):
        with pytest.raises(LlamarecError, match=f"--k {k}: must be between 1 and {room}"):
            generate_candidates(run_copy, k=k)
    assert not (run_copy / "candidates.safetensors").exists()
    # the largest allowed k still has only real, unseen items for every user
    generate_candidates(run_copy, k=room)
    cands = load_candidates(run_copy, "test")
    for user, seq in enumerate(tiny_dataset.sequences):
        assert not set(cands.items[user].tolist()) & set(seq[:-1].tolist())
    assert (cands.items > 0).all() and np.isfinite(cands.scores).all()


def test_reconsumed_target_is_a_miss(tiny_retrieval_config, make_tiny_world, tmp_path):
    """A target already in the history is never a candidate (history is excluded), so it must
    not count as a hit: valid() would otherwise select users whose target is missing."""

    def reconsume(sequences):
        for user in ("1", "2", "3"):  # dense users 0, 1, 2
            sequences[user][-1] = sequences[user][-3]  # the test item was consumed before

    data = make_tiny_world(tmp_path / "data", reconsume)
    run = tmp_path / "run"
    train_retriever(tiny_retrieval_config(data_dir=data, max_epochs=1), run, progress=False)
    generate_candidates(run, k=20)
    cands = load_candidates(run, "test")
    inside = (cands.items == cands.targets[:, None]).any(1)
    assert (inside == cands.valid()).all()
    assert not inside[:3].any() and (cands.ranks[:3] >= 20).all()


def test_candidates_dataclass_valid():
    cands = Candidates(items=np.array([[3, 1], [4, 5], [2, 6]]), scores=np.zeros((3, 2)),
                       targets=np.array([1, 7, 2]), ranks=np.array([1, 9, 0]))
    assert cands.k == 2 and cands.valid().tolist() == [True, False, True]
