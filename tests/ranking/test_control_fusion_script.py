"""scripts/control_fusion.py: the non-LLM controls and the LLM title-similarity probe."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llamarec.candidates import Candidates, load_candidates, load_train_candidates
from llamarec.data import load_run_dataset

SCRIPT = Path(__file__).parents[2] / "scripts" / "control_fusion.py"
spec = importlib.util.spec_from_file_location("control_fusion", SCRIPT)
control = importlib.util.module_from_spec(spec)
spec.loader.exec_module(control)


@pytest.mark.parametrize("split", ["val", "test"])
def test_profile_scores_follow_the_users_latest_items(tiny_retriever_run, split):
    ds = load_run_dataset(tiny_retriever_run)
    cands = load_candidates(tiny_retriever_run, split)
    emb = np.zeros((ds.n_items + 1, ds.n_items + 1), dtype=np.float32)
    emb[1:, 1:] = np.eye(ds.n_items)  # each item orthogonal to every other
    u = 0
    last = ds.sequences[u][-3 if split == "val" else -2]  # the latest history item before the target
    items = cands.items.copy()
    items[u, 3] = last
    planted = Candidates(items=items, scores=cands.scores, targets=cands.targets, ranks=cands.ranks)
    scores = control.profile_scores(ds, emb, planted, split, last=1)
    assert scores[u, 3] == 1.0 and np.count_nonzero(scores[u]) == (items[u] == last).sum()


def test_title_embeddings_are_unit_rows_over_a_zero_padding_row(tiny_llm_dir):
    titles = ["", "Alien", "Aliens (1986)", "Heat"]
    emb = control.title_embeddings(titles, str(tiny_llm_dir), batch=2)
    assert emb.shape[0] == 4 and not emb[0].any()
    np.testing.assert_allclose(np.linalg.norm(emb[1:], axis=1), 1.0, rtol=1e-5)
    # padding does not leak into a title's embedding: the batch size does not matter
    np.testing.assert_allclose(control.title_embeddings(titles, str(tiny_llm_dir), batch=1), emb, atol=1e-4)


def test_a_signal_alone_scores_as_the_retriever_when_it_is_the_retriever(tiny_retriever_run):
    cands = {s: load_candidates(tiny_retriever_run, s) for s in ("val", "test")}
    labels = {s: torch.from_numpy((c.items == c.targets[:, None]).argmax(1)) for s, c in cands.items()}
    retriever = {s: torch.from_numpy(c.scores).float() for s, c in cands.items()}
    valid = {s: torch.from_numpy(c.valid()) for s, c in cands.items()}
    report = control.compare(retriever, retriever, labels, valid, temperature=1.0)
    for split in ("val", "test"):
        assert report[split]["alone_NDCG@10"] == pytest.approx(report[split]["retriever_NDCG@10"])
        assert report[split]["retriever_NDCG@10"] > 0
    flipped = control.compare({s: -x for s, x in retriever.items()}, retriever, labels, valid, temperature=1.0)
    assert flipped["test"]["alone_NDCG@10"] < report["test"]["alone_NDCG@10"]


def test_history_matrix_keeps_the_latest_items_left_padded():
    out = control.history_matrix([np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(1, 15)], length=4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [11, 12, 13, 14]]


def test_histories_end_just_before_each_target(tiny_retriever_run):
    ds = load_run_dataset(tiny_retriever_run)
    for split, cut in (("val", 2), ("test", 1)):
        rows = control.split_histories(ds, split)
        for u, seq in enumerate(ds.sequences):
            assert rows[u, -1] == seq[-cut - 1] and seq[-cut] not in rows[u, -1:].tolist()
    train = control.training_prefixes(ds, tiny_retriever_run)
    raw = load_train_candidates(tiny_retriever_run)
    hits = (raw["items"] == raw["targets"][:, None]).any(1)
    users, positions, targets = raw["users"][hits], raw["positions"][hits], raw["targets"][hits]
    assert len(train["labels"]) == hits.sum() > 0
    for row, (u, p) in enumerate(zip(users, positions)):
        seq = ds.sequences[u]
        assert train["history"][row, -1] == seq[p - 1] and seq[p] == targets[row]  # the target is not shown
        assert train["items"][row, train["labels"][row]] == targets[row]
    torch.testing.assert_close(train["log_probs"].exp().sum(1), torch.ones(len(users)))


def test_random_control_vectors_have_the_embeddings_scale_and_a_zero_padding_row():
    vectors = control.random_unit_vectors((6, 4), seed=3)
    assert not vectors[0].any()
    np.testing.assert_allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(vectors, control.random_unit_vectors((6, 4), seed=3))
    assert not np.array_equal(vectors, control.random_unit_vectors((6, 4), seed=4))


def test_padding_does_not_reach_the_users_vector():
    vectors = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    scorer = control.FeatureScorer(vectors).eval()
    history = torch.tensor([[0] * (control.HISTORY - 2) + [3, 5]])
    candidates = torch.tensor([[1, 2, 4, 6]])
    with torch.no_grad():
        before = scorer(history, candidates)
        scorer.vectors[0] = 100.0  # whatever the padding row holds
        after = scorer(history, candidates)
    torch.testing.assert_close(before, after)


def _planted(n: int, rng: np.random.Generator, items: int = 30, k: int = 5) -> dict[str, torch.Tensor]:
    """Prefixes whose answer is always the candidate equal to the user's last item; the
    retriever's log-probs carry no information (uniform)."""
    history = torch.from_numpy(rng.integers(1, items + 1, size=(n, control.HISTORY)))
    candidates = torch.from_numpy(np.stack([rng.choice(np.arange(1, items + 1), size=k, replace=False)
                                            for _ in range(n)]))
    labels = torch.from_numpy(rng.integers(0, k, size=n))
    candidates[torch.arange(n), labels] = history[:, -1]
    for row in range(n):  # the last item appears once among the candidates
        others = [i for i in range(k) if i != labels[row]]
        candidates[row, others] = torch.from_numpy(
            rng.choice([x for x in range(1, items + 1) if x != history[row, -1]], size=k - 1, replace=False))
    return {"history": history, "items": candidates, "labels": labels,
            "log_probs": torch.full((n, k), 1.0 / k).log()}


def test_a_trained_scorer_learns_a_planted_rule_and_keeps_its_best_epoch():
    rng = np.random.default_rng(0)
    vectors = np.zeros((31, 31), dtype=np.float32)
    vectors[1:, 1:] = 5 * np.eye(30)  # every item distinguishable
    train, val = _planted(2000, rng), _planted(200, rng)
    scorer, fit = control.train_scorer(vectors, train, val, epochs=10, batch=32)
    assert fit["val_retriever_loss"] == pytest.approx(np.log(5))
    assert fit["val_residual_loss"] < 0.5 * fit["val_retriever_loss"]
    with torch.no_grad():
        scores = scorer(val["history"], val["items"])
    assert (scores.argmax(1) == val["labels"]).float().mean() > 0.9
    assert control.residual_loss(scores, val["log_probs"], val["labels"]) == pytest.approx(fit["val_residual_loss"])
    # validation users for whom the rule is wrong: the first epoch is the best, and its weights are kept
    contrary = dict(val, labels=(val["labels"] + 1) % 5)
    scorer, fit = control.train_scorer(vectors, train, contrary, epochs=4, batch=32)
    assert fit["best_epoch"] == 0
    with torch.no_grad():
        scores = scorer(contrary["history"], contrary["items"])
    kept = control.residual_loss(scores, contrary["log_probs"], contrary["labels"])
    assert kept == pytest.approx(fit["val_residual_loss"])


def test_the_script_reports_every_signal_with_its_interval(tiny_retriever_run, tiny_llm_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_retriever_run), "--llm", str(tiny_llm_dir),
                          "--trained", "--epochs", "2", "--seed", "1"],
                         capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout)
    names = [k for k in report if k != "temperature"]
    assert names == ["popular first", "unpopular first", "knn last 1", "knn last 20",
                     "llm titles last 1", "llm titles last 5", "llm titles last 20",
                     "trained on llm titles", "trained on random vectors"]
    titles, controls = report[names[-2]], report[names[-1]]
    for fit in (titles, controls):
        assert fit["best_epoch"] in (0, 1) and 0 < fit["training_prefixes"] <= 50
        assert fit["val_residual_loss"] > 0 and fit["test_residual_loss"] > 0
    # both are measured against the same retriever on the same users
    assert titles["test_retriever_loss"] == controls["test_retriever_loss"] > 0
    assert titles["val_retriever_loss"] == controls["val_retriever_loss"] > 0
    for name in names:
        for split in ("val", "test"):
            r = report[name][split]
            diff = r["fused_vs_retriever"]
            assert diff["ci_low"] <= diff["diff"] <= diff["ci_high"]
            assert abs(r["fused_NDCG@10"] - r["retriever_NDCG@10"] - diff["diff"]) < 1e-6


def test_trained_without_llm_is_one_error_line(tiny_retriever_run):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_retriever_run), "--trained"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr == "error: --trained needs --llm (the title embeddings it trains on)\n"


def test_no_epochs_is_one_error_line(tiny_retriever_run, tiny_llm_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_retriever_run), "--llm", str(tiny_llm_dir),
                          "--trained", "--epochs", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr == "error: --epochs 0: at least 1\n"


def test_a_run_without_candidates_is_one_error_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
