"""Ranking examples: the paper's random negatives, hard negatives and evaluation examples."""

import signal
from contextlib import contextmanager

import numpy as np
import pytest

from llamarec.candidates import Candidates, load_candidates, load_train_candidates
from llamarec.data.dataset import Dataset
from llamarec.data.split import history_and_target, training_prefixes
from llamarec.errors import LlamarecError
from llamarec.ranking.examples import (
    evaluation_examples,
    hard_negative_examples,
    paper_examples,
)


def make_dataset(sequences: list[list[int]], n_items: int) -> Dataset:
    return Dataset(name="hand", sequences=[np.array(s, dtype=np.int64) for s in sequences],
                   titles=["", *(f"t{i}" for i in range(1, n_items + 1))],
                   item_raw_ids=["", *map(str, range(1, n_items + 1))],
                   user_raw_ids=[str(u) for u in range(len(sequences))], params={})


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (sampling loops that cannot end)."""

    def fail(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------- paper examples

def test_training_prefixes_are_training_positions_after_the_first():
    ds = make_dataset([[1, 2, 3, 4, 5], [6, 7, 8], [1, 2, 3, 4]], n_items=8)
    assert training_prefixes(ds.sequences).tolist() == [[0, 1], [0, 2], [2, 1]]
    assert training_prefixes(make_dataset([[1, 2, 3]], 3).sequences).shape == (0, 2)


def test_paper_examples(tiny_dataset):
    examples = paper_examples(tiny_dataset, 40, max_history=100, seed=5)
    assert len(examples) == 40
    assert len({(ex.user, len(ex.history)) for ex in examples}) == 40  # distinct prefixes
    for ex in examples:
        seq = tiny_dataset.sequences[ex.user]
        pos = len(ex.history)  # the whole history is kept with max_history=100
        assert 1 <= pos <= len(seq) - 3
        assert list(ex.history) == seq[:pos].tolist()
        assert len(ex.candidates) == len(set(ex.candidates)) == 20
        assert ex.candidates[ex.target] == seq[pos]
        assert all(1 <= c <= tiny_dataset.n_items for c in ex.candidates)
        assert not set(ex.candidates) & set(ex.history)
        assert ex.retriever_scores == ()
    # the target is shuffled into different positions
    assert len({ex.target for ex in examples}) > 5


def test_paper_examples_are_deterministic_and_cut_history(tiny_dataset):
    a = paper_examples(tiny_dataset, 10, max_history=3, seed=1)
    assert a == paper_examples(tiny_dataset, 10, max_history=3, seed=1)
    assert a != paper_examples(tiny_dataset, 10, max_history=3, seed=2)
    for ex in a:
        assert 1 <= len(ex.history) <= 3
        seq = tiny_dataset.sequences[ex.user].tolist()
        target = ex.candidates[ex.target]
        pos = next(p for p in range(1, len(seq)) if seq[p] == target)
        assert list(ex.history) == seq[max(0, pos - 3):pos]


def test_paper_examples_all_prefixes_when_fewer_than_asked():
    ds = make_dataset([list(range(1, 8)), list(range(10, 16))], n_items=25)
    examples = paper_examples(ds, 100, seed=0)
    assert sorted([ex.user, len(ex.history)] for ex in examples) == training_prefixes(ds.sequences).tolist()


def test_paper_examples_need_enough_items():
    with pytest.raises(LlamarecError, match="fewer than 20 candidates"):
        paper_examples(make_dataset([list(range(1, 8))], n_items=19), 5)


def test_paper_examples_skip_prefixes_without_enough_unseen_items():
    # 22 items: a history of 3+ items leaves fewer than 19 unseen items besides the target
    ds = make_dataset([list(range(1, 13)), [20, 21, 22, 1, 2]], n_items=22)
    with time_limit(10):
        examples = paper_examples(ds, 100, seed=0)
    assert sorted((ex.user, len(ex.history)) for ex in examples) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for ex in examples:
        assert len(set(ex.candidates)) == 20 and not set(ex.candidates) & set(ex.history)


# --------------------------------------------------------------------------- hard negatives

def test_hard_negatives_insert_a_missing_target():
    ds = make_dataset([list(range(1, 30)), list(range(30, 60))], n_items=60)
    items = np.arange(31, 51).reshape(1, 20).repeat(3, 0)  # the same 20 retrieved items per row
    train = {"users": np.array([0, 1, 1]), "positions": np.array([5, 3, 6]), "items": items,
             "scores": np.zeros((3, 20), dtype=np.float32), "targets": np.array([6, 33, 36])}
    examples = hard_negative_examples(ds, train, max_history=4, seed=0)
    assert len(examples) == 3
    by_row = {(ex.user, len(ex.history), ex.history[-1]): ex for ex in examples}
    # row 0: user 0 at position 5 (target 6): the target replaces the last candidate (50)
    ex0 = by_row[(0, 4, 5)]
    assert list(ex0.history) == [2, 3, 4, 5]
    assert sorted(ex0.candidates) == sorted([*range(31, 50), 6]) and ex0.candidates[ex0.target] == 6
    # row 1: target present, the set is unchanged
    ex1 = by_row[(1, 3, 32)]
    assert list(ex1.history) == [30, 31, 32]
    assert sorted(ex1.candidates) == list(range(31, 51)) and ex1.candidates[ex1.target] == 33
    ex2 = by_row[(1, 4, 35)]
    assert ex2.candidates[ex2.target] == 36 and sorted(ex2.candidates) == list(range(31, 51))
    assert train["items"].tolist() == items.tolist()  # the caller's arrays are not modified
    assert hard_negative_examples(ds, train, max_history=4, seed=0) == examples
    assert [e.user for e in hard_negative_examples(ds, train, seed=0, n_examples=2)] == \
        [e.user for e in examples[:2]]


def test_hard_negatives_from_the_tiny_run(tiny_retriever_run, tiny_dataset):
    train = load_train_candidates(tiny_retriever_run)
    examples = hard_negative_examples(tiny_dataset, train, max_history=20, seed=3, n_examples=30)
    assert len(examples) == 30
    rows = {(int(u), int(p)): r for r, (u, p) in enumerate(zip(train["users"], train["positions"]))}
    for ex in examples:
        row = rows[(ex.user, len(ex.history))]  # tiny histories are shorter than 20
        target = int(train["targets"][row])
        retrieved = train["items"][row].tolist()
        assert len(set(ex.candidates)) == 20 and ex.candidates[ex.target] == target
        expected = retrieved if target in retrieved else [*retrieved[:-1], target]
        assert sorted(ex.candidates) == sorted(expected)
        assert list(ex.history) == tiny_dataset.sequences[ex.user][:len(ex.history)].tolist()


# --------------------------------------------------------------------------- evaluation

def test_evaluation_examples_by_hand():
    ds = make_dataset([[1, 2, 3, 4, 5], [6, 7, 8, 9], [1, 3, 5, 7]], n_items=12)
    cands = Candidates(items=np.array([[10, 5, 11], [1, 2, 3], [9, 7, 2]]),
                       scores=np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [5.0, 4.0, 0.5]]),
                       targets=np.array([5, 9, 7]), ranks=np.array([1, 40, 1]))
    examples = evaluation_examples(ds, cands, "test", max_history=3)
    assert [ex.user for ex in examples] == [0, 2]  # user 1's target is not a candidate
    assert examples[0].history == (2, 3, 4) and examples[0].candidates == (10, 5, 11)
    assert examples[0].target == 1 and examples[0].retriever_scores == (3.0, 2.0, 1.0)
    assert examples[1].history == (1, 3, 5) and examples[1].target == 1
    val_cands = Candidates(items=np.array([[4, 5, 6], [1, 2, 3], [9, 7, 2]]), scores=cands.scores,
                           targets=np.array([4, 8, 5]), ranks=np.array([0, 30, 7]))
    val = evaluation_examples(ds, val_cands, "val")
    assert [ex.user for ex in val] == [0]
    assert val[0].history == (1, 2, 3) and val[0].target == 0  # history stops before the last two
    assert evaluation_examples(ds, cands, "test", max_history=3, limit=1) == examples[:1]


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_examples_on_the_tiny_run(tiny_retriever_run, tiny_dataset, split):
    cands = load_candidates(tiny_retriever_run, split)
    examples = evaluation_examples(tiny_dataset, cands, split, max_history=20)
    assert [ex.user for ex in examples] == np.flatnonzero(cands.valid()).tolist()
    for ex in examples:
        history, target = history_and_target(tiny_dataset.sequences[ex.user], split)
        assert list(ex.history) == history[-20:].tolist()
        assert list(ex.candidates) == cands.items[ex.user].tolist()
        assert ex.candidates[ex.target] == target and ex.target == cands.ranks[ex.user]
        assert list(ex.retriever_scores) == sorted(ex.retriever_scores, reverse=True)


def three_prefixes_one_missed():
    """Two users, three training prefixes with the same 20 candidates (items 31..50, scores
    falling); the first prefix's target (item 6) is not among them."""
    ds = make_dataset([list(range(1, 30)), list(range(30, 60))], n_items=60)
    items = np.arange(31, 51).reshape(1, 20).repeat(3, 0)
    scores = np.linspace(5.0, 1.0, 20, dtype=np.float32).reshape(1, 20).repeat(3, 0)
    train = {"users": np.array([0, 1, 1]), "positions": np.array([5, 3, 6]), "items": items,
             "scores": scores, "targets": np.array([6, 33, 36])}
    return ds, train, scores


def test_hard_negatives_in_retriever_order_keep_only_hits_with_their_scores():
    ds, train, scores = three_prefixes_one_missed()
    examples = hard_negative_examples(ds, train, max_history=4, seed=0, order="retriever")
    assert sorted(ex.candidates[ex.target] for ex in examples) == [33, 36]  # row 0 (target 6) missed
    for ex in examples:
        assert list(ex.candidates) == list(range(31, 51))  # the retriever's order
        assert list(ex.retriever_scores) == pytest.approx(scores[0].tolist())
    shuffled = hard_negative_examples(ds, train, max_history=4, seed=0, order="shuffled")
    for ex in shuffled:  # scores travel with their items; an inserted target takes the last score
        expected = dict(zip(range(31, 51), scores[0].tolist()))
        expected[ex.candidates[ex.target]] = expected.pop(50) if ex.candidates[ex.target] == 6 else \
            expected[ex.candidates[ex.target]]
        assert dict(zip(ex.candidates, ex.retriever_scores)) == pytest.approx(expected)


def test_mixed_order_holds_both_kinds(tiny_retriever_run, tiny_dataset):
    train = load_train_candidates(tiny_retriever_run)
    mixed = hard_negative_examples(tiny_dataset, train, seed=1, order="mix")
    in_order = [list(ex.retriever_scores) == sorted(ex.retriever_scores, reverse=True) for ex in mixed]
    assert any(in_order) and not all(in_order)
    assert len(mixed) < len(train["users"])  # retriever-order draws skip the misses


def test_shuffled_hits_keep_only_found_targets_in_a_random_order():
    ds, train, scores = three_prefixes_one_missed()
    examples = hard_negative_examples(ds, train, max_history=4, seed=0, order="shuffled_hits")
    assert sorted(ex.candidates[ex.target] for ex in examples) == [33, 36]  # the missed target 6 is dropped
    assert all(sorted(ex.candidates) == list(range(31, 51)) for ex in examples)  # nothing inserted
    assert any(list(ex.candidates) != list(range(31, 51)) for ex in examples)  # shown shuffled
    for ex in examples:
        assert dict(zip(ex.candidates, ex.retriever_scores)) == pytest.approx(dict(zip(range(31, 51), scores[0])))


# --------------------------------------------------------------------------- recent prefixes

def test_recent_prefixes_keep_each_users_last_training_prefixes(tiny_retriever_run, tiny_dataset):
    """With ``recent_prefixes: n`` a user's training examples come from its last n training
    prefixes (of those the candidates file holds): their targets are the training items just
    before the validation and test targets."""
    train = load_train_candidates(tiny_retriever_run)
    every = hard_negative_examples(tiny_dataset, train, max_history=100, seed=3, order="shuffled")
    for n in (1, 2):
        examples = hard_negative_examples(tiny_dataset, train, max_history=100, seed=3, order="shuffled",
                                          recent_prefixes=n)
        want = {(ex.user, len(ex.history)) for ex in every
                if len(ex.history) > len(tiny_dataset.sequences[ex.user]) - 3 - n}
        assert want and {(ex.user, len(ex.history)) for ex in examples} == want
        assert len(examples) == len(want) < len(every)
        assert all(ex.candidates[ex.target] == tiny_dataset.sequences[ex.user][len(ex.history)]
                   for ex in examples)
    paper = paper_examples(tiny_dataset, 10**6, max_history=100, seed=0, recent_prefixes=1)
    assert sorted((ex.user, len(ex.history)) for ex in paper) == \
        sorted((u, p) for u, p in training_prefixes(tiny_dataset.sequences)
               if p == len(tiny_dataset.sequences[u]) - 3)
