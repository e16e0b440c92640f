"""Ranker evaluation: fusion by hand, and the full evaluation of the tiny run (valid subset,
overall view, ranks.csv, zero-shot)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llamarec.candidates import load_candidates
from llamarec.errors import LlamarecError
from llamarec.metrics import metrics_from_ranks, target_ranks
from llamarec.ranking.evaluate import evaluate_ranker, rerank_chunk
from llamarec.ranking.examples import evaluation_examples
from llamarec.ranking.llm import load_llm
from llamarec.ranking.ranker import Ranker
from llamarec.ranking.scoring import FUSION_WEIGHTS, KS, fuse, tune_fusion
from llamarec.retrieval.train import load_retriever

INF = float("inf")
METHODS = ("retriever", "ranker", "fusion")


def order(scores: torch.Tensor) -> list[list[int]]:
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices.tolist()


# --------------------------------------------------------------------------- fusion by hand

def test_fuse_weight_zero_is_the_ranker_and_inf_the_retriever():
    llm = torch.tensor([[-50.0, 0.0, 50.0, 10.0], [3.0, 2.0, 1.0, 0.0]])
    ret = torch.tensor([[3.0, 2.9, 2.8, 2.7], [0.0, 1.0, 2.0, 3.0]])
    assert order(fuse(llm, ret, 0.0)) == [[2, 3, 1, 0], [0, 1, 2, 3]]
    assert order(fuse(llm, ret, INF)) == [[0, 1, 2, 3], [3, 2, 1, 0]]  # however sure the LLM is
    torch.testing.assert_close(fuse(llm, ret, 0.0), llm.log_softmax(-1))
    torch.testing.assert_close(fuse(llm, ret, 2.0), llm.log_softmax(-1) + 2 * ret.log_softmax(-1))


def test_fuse_inf_lets_the_ranker_break_retriever_ties():
    llm = torch.tensor([[0.0, 5.0, 9.0]])
    ret = torch.tensor([[1.0, 1.0, 0.0]])
    assert order(fuse(llm, ret, INF)) == [[1, 0, 2]]


def test_fuse_equal_weight_adds_log_probabilities():
    # log-softmax of [0, 1, 2] plus that of [2, 1, 0]: every candidate gets the same total
    fused = fuse(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 0.0]]), 1.0)
    assert torch.allclose(fused, fused[:, :1].expand_as(fused))


def test_tune_fusion_picks_the_ranker_when_it_is_right():
    labels = torch.tensor([2, 0])
    llm = torch.tensor([[0.0, 1.0, 9.0], [9.0, 1.0, 0.0]])  # the LLM finds both targets
    ret = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # the retriever ranks them last
    weight, grid = tune_fusion(llm, ret, labels)
    assert set(grid) == set(FUSION_WEIGHTS)
    assert grid[0.0] == 1.0 and grid[INF] == pytest.approx(0.5)  # NDCG@10 of rank 2 = 1/log2(4)
    assert grid[weight] == 1.0
    assert weight == max(w for w, v in grid.items() if v == 1.0)  # ties go to the larger weight


def test_tune_fusion_prefers_the_retriever_when_the_ranker_is_useless():
    labels = torch.tensor([0, 1])
    ret = torch.tensor([[5.0, 1.0, 0.0], [1.0, 5.0, 0.0]])
    llm = torch.tensor([[0.0, 0.0, 9.0], [0.0, 0.0, 9.0]])
    weight, grid = tune_fusion(llm, ret, labels)
    assert weight == INF and grid[INF] == 1.0 and grid[0.0] < 1.0
    # equal quality everywhere: the tie goes to the retriever
    assert tune_fusion(ret.clone(), ret, labels)[0] == INF


@pytest.mark.parametrize("seed", range(5))
def test_tuned_fusion_is_never_worse_than_the_retriever(seed):
    g = torch.Generator().manual_seed(seed)
    llm, ret = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    ret[:5, :3] = 0.0  # some retriever ties
    labels = torch.randint(0, 20, (30,), generator=g)
    weight, grid = tune_fusion(llm, ret, labels)
    retriever = metrics_from_ranks(target_ranks(ret, labels), KS)["NDCG@10"]
    tuned = metrics_from_ranks(target_ranks(fuse(llm, ret, weight), labels), KS)["NDCG@10"]
    assert tuned == pytest.approx(grid[weight]) and tuned >= retriever - 1e-12
    assert tuned == pytest.approx(max(grid.values()))


# --------------------------------------------------------------------------- the tiny run

@pytest.fixture
def finetuned_eval(tiny_rank_run, tmp_path):
    out = tmp_path / "eval"
    return evaluate_ranker(tiny_rank_run, out=out), out


def check_views(results: dict, run, evaluated: int | None = None) -> None:
    """Valid-subset and overall metrics against the candidates, computed independently.
    ``evaluated``: how many valid users were scored (``limit``), all by default."""
    for split in ("val", "test"):
        cands = load_candidates(run, split)
        valid = cands.valid()
        n, n_valid = len(valid), int(valid.sum())
        res = results[split]
        assert res["users"] == n and res["valid_subset_users"] == n_valid
        assert res["evaluated_users"] == (n_valid if evaluated is None else evaluated)
        rest = metrics_from_ranks(torch.from_numpy(cands.ranks[~valid]), KS)
        for method in METHODS:
            subset, overall = res["valid_subset"][method], res["overall"][method]
            assert set(subset) == set(overall) == {f"{m}@{k}" for m in ("Recall", "NDCG", "MRR") for k in KS}
            for key, value in subset.items():
                assert overall[key] == pytest.approx((value * n_valid + rest[key] * (n - n_valid)) / n)
                # misses of the retriever rank >= k = 20, beyond every k of the metrics
                assert overall[key] == pytest.approx(value * n_valid / n)
        # within the candidates the retriever keeps its full-ranking ranks, so its overall view
        # is its own full-ranking metrics
        if evaluated is None:
            assert res["overall"]["retriever"] == pytest.approx(metrics_from_ranks(cands.ranks, KS))


def test_evaluate_ranker_writes_metrics_and_ranks(finetuned_eval, tiny_rank_run, tiny_retriever_run,
                                                  tiny_dataset):
    results, out = finetuned_eval
    assert json.loads((out / "metrics.json").read_text()) == results
    assert results["zero_shot"] is False and results["order"] == "retriever"
    assert results["fusion"]["weight"] in FUSION_WEIGHTS
    assert set(results["fusion"]["val_NDCG@10_by_weight"]) == {str(w) for w in FUSION_WEIGHTS}
    check_views(results, tiny_retriever_run)

    rows = pd.read_csv(out / "ranks.csv")
    assert list(rows.columns) == ["split", "user", "user_raw_id", "target_item", "retriever_full_rank",
                                  "retriever_rank", "ranker_rank", "fusion_rank"]
    for split in ("val", "test"):
        cands = load_candidates(tiny_retriever_run, split)
        part = rows[rows["split"] == split]
        assert part["user"].tolist() == np.flatnonzero(cands.valid()).tolist()
        assert (part["target_item"].to_numpy() == cands.targets[part["user"]]).all()
        assert (part["retriever_full_rank"].to_numpy() == cands.ranks[part["user"]]).all()
        assert (part["retriever_rank"] == part["retriever_full_rank"]).all()
        assert part["user_raw_id"].astype(str).tolist() == \
            [tiny_dataset.user_raw_ids[u] for u in part["user"]]
        for method in METHODS:
            ranks = torch.tensor(part[f"{method}_rank"].to_numpy())
            assert results[split]["valid_subset"][method] == pytest.approx(metrics_from_ranks(ranks, KS))


def test_zero_shot_needs_no_adapter_and_scores_with_the_base_model(tiny_rank_config, tiny_retriever_run,
                                                                    tmp_path):
    cfg = tiny_rank_config()
    rank_dir = tmp_path / "rank"  # a ranker directory holding only its config
    rank_dir.mkdir()
    (rank_dir / "rank_config.json").write_text(cfg.model_dump_json())
    with pytest.raises(LlamarecError, match="no adapter saved yet"):
        evaluate_ranker(rank_dir)

    results = evaluate_ranker(rank_dir, zero_shot=True)
    out = rank_dir / "eval-zero-shot-retriever"  # the default output directory
    assert results["zero_shot"] is True and (out / "metrics.json").is_file()
    check_views(results, tiny_retriever_run)

    # the ranker's ranks are those of the plain LLM on the valid-subset examples
    model, tokenizer = load_llm(cfg.model, dtype="float32", device="cpu")
    ds = load_retriever(tiny_retriever_run)[2]
    ranker = Ranker(model, tokenizer, ds.titles, batch_size=5)
    rows = pd.read_csv(out / "ranks.csv")
    examples = evaluation_examples(ds, load_candidates(tiny_retriever_run, "test"), "test")
    scores = ranker.score(examples)
    labels = torch.tensor([ex.target for ex in examples])
    assert rows[rows["split"] == "test"]["ranker_rank"].tolist() == target_ranks(scores, labels).tolist()


def test_limit_and_shuffled_order(tiny_rank_run, tiny_retriever_run, tmp_path):
    results = evaluate_ranker(tiny_rank_run, order="shuffled", limit=3, out=tmp_path, seed=1)
    # the 3 scored users stand for the whole valid subset in the overall view
    check_views(results, tiny_retriever_run, evaluated=3)
    rows = pd.read_csv(tmp_path / "ranks.csv")
    for split in ("val", "test"):
        valid = load_candidates(tiny_retriever_run, split).valid()
        users = rows[rows["split"] == split]["user"].tolist()
        assert users == np.flatnonzero(valid)[:3].tolist()
    # shuffled candidates: the retriever's rank within them still follows its scores
    assert (rows["retriever_rank"] == rows["retriever_full_rank"]).all()


def test_average_order_uses_permutations(tiny_rank_run, tmp_path):
    results = evaluate_ranker(tiny_rank_run, order="average", permutations=2, limit=2, out=tmp_path)
    assert results["order"] == "average" and results["permutations"] == 2
    assert results["test"]["evaluated_users"] == 2


def test_not_a_ranker_run(tmp_path):
    with pytest.raises(LlamarecError, match="not a ranker run"):
        evaluate_ranker(tmp_path)


def test_comparisons_give_paired_differences_with_intervals(finetuned_eval, tiny_retriever_run):
    from llamarec.metrics import per_user_metric

    results, out = finetuned_eval
    rows = pd.read_csv(out / "ranks.csv")
    for split in ("val", "test"):
        comp = results[split]["comparisons"]
        assert set(comp) == {"ranker_vs_retriever", "fusion_vs_retriever"}
        share = load_candidates(tiny_retriever_run, split).valid().mean()
        part = rows[rows["split"] == split]
        for name, method in (("ranker_vs_retriever", "ranker"), ("fusion_vs_retriever", "fusion")):
            for metric in ("NDCG@10", "Recall@10", "MRR@10"):
                sub, overall = comp[name]["valid_subset"][metric], comp[name]["overall"][metric]
                diff = (per_user_metric(torch.tensor(part[f"{method}_rank"].to_numpy()), metric)
                        - per_user_metric(torch.tensor(part["retriever_rank"].to_numpy()), metric)).mean()
                assert sub["diff"] == pytest.approx(diff.item())
                assert sub["ci_low"] <= sub["diff"] <= sub["ci_high"]
                assert overall["diff"] == pytest.approx(sub["diff"] * share)
                # the overall view's difference is the overall metrics' difference
                views = results[split]["overall"]
                assert overall["diff"] == pytest.approx(views[method][metric] - views["retriever"][metric])


def test_evaluation_scores_are_the_served_scores(tiny_pipeline_run):
    """Evaluation and the Recommender rerank the same users to the same scores and ranks."""
    from llamarec.data import load_run_dataset
    from llamarec.data.split import history_and_target
    from llamarec.pipeline import Recommender

    rec = Recommender.load(tiny_pipeline_run)
    rows = pd.read_csv(tiny_pipeline_run / "ranker" / "eval" / "ranks.csv")
    retriever_dir = tiny_pipeline_run / "retriever"
    ds = load_run_dataset(retriever_dir)
    for split in ("val", "test"):
        part = rows[rows["split"] == split]
        examples = evaluation_examples(ds, load_candidates(retriever_dir, split), split)[:len(part)]
        assert part["user"].tolist() == [ex.user for ex in examples]
        histories = [history_and_target(ds.sequences[ex.user], split)[0] for ex in examples]
        items, scores = rec.retrieve(histories)
        assert items.tolist() == [list(ex.candidates) for ex in examples]
        llm, final = rec.rerank(histories, items, scores)
        labels = torch.tensor([ex.target for ex in examples])
        assert target_ranks(llm, labels).tolist() == part["ranker_rank"].tolist()
        assert target_ranks(final, labels).tolist() == part["fusion_rank"].tolist()


# --------------------------------------------------------------------------- engines

def test_the_local_engine_reranks_planned_chunks_in_input_order(tiny_rank_run, tiny_retriever_run, tiny_dataset,
                                                               monkeypatch):
    from llamarec.ranking.evaluate import LocalScores, plan_chunks
    from llamarec.ranking.ranker import load_ranker
    from llamarec.ranking.scoring import ScoringConfig

    examples = evaluation_examples(tiny_dataset, load_candidates(tiny_retriever_run, "test"), "test")[:7]
    chunks = plan_chunks(examples, tiny_dataset.titles, 3)
    sizes = [sum(len(tiny_dataset.titles[i]) for i in (*ex.history, *ex.candidates)) for ex in examples]
    assert sorted(i for c in chunks for i in c) == list(range(7)) and [len(c) for c in chunks] == [3, 3, 1]
    assert [sizes[i] for c in chunks for i in c] == sorted(sizes, reverse=True)  # longest prompts first

    ranker = load_ranker(tiny_rank_run, tiny_dataset.titles, batch_size=3)
    calls, rerank = [], ranker.rerank

    def counting(histories, *args):
        calls.append(len(histories))
        return rerank(histories, *args)

    monkeypatch.setattr(ranker, "rerank", counting)
    scores = LocalScores(ranker)(examples, ScoringConfig())
    assert calls == [3, 3, 1]  # one rerank per chunk
    torch.testing.assert_close(scores, ranker.score(examples), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "spark"}, r"engine 'spark': use local or ray"),
    ({"workers": 2}, r"workers=2: the local engine runs one process; use engine ray"),
    ({"engine": "ray", "workers": 0}, r"workers=0: must be a whole number of at least 1"),
])
def test_bad_engine_options(tiny_rank_run, tmp_path, kwargs, message):
    with pytest.raises(LlamarecError, match=message):
        evaluate_ranker(tiny_rank_run, out=tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


def test_the_cli_passes_the_engine_options(tiny_pipeline_run, tmp_path, run_llamarec):
    result = run_llamarec("rank", "evaluate", "--ranker", str(tiny_pipeline_run / "ranker"), "--out", str(tmp_path),
                          "--engine", "local", "--workers", "2")
    assert result.returncode == 1
    assert result.stderr == "error: workers=2: the local engine runs one process; use engine ray\n"


# --------------------------------------------------------------------------- resuming

class Interrupted(Exception):
    pass


RERANK_CHUNK = rerank_chunk  # the real one, whatever a test patched in its place


def interrupt_after(monkeypatch, calls: int) -> list[int]:
    """Make the evaluation's chunk scoring fail after ``calls`` chunks; returns the counter."""
    from llamarec.ranking import evaluate

    done, rerank = [], RERANK_CHUNK

    def counting(ranker, examples, scoring):
        if len(done) == calls:
            raise Interrupted
        done.append(len(examples))
        return rerank(ranker, examples, scoring)

    monkeypatch.setattr(evaluate, "rerank_chunk", counting)
    return done


def test_an_interrupted_evaluation_resumes_from_its_saved_chunks(tiny_rank_run, tmp_path, monkeypatch):
    """Letter scores are saved chunk by chunk: a rerun scores only the chunks left and ends
    with the results of an uninterrupted run; the partial scores are removed at the end."""
    from llamarec.ranking.evaluate import PARTIAL_PREFIX

    whole = tmp_path / "whole"
    counted = interrupt_after(monkeypatch, 10**9)
    want = evaluate_ranker(tiny_rank_run, out=whole, order="shuffled")
    n_chunks = len(counted)
    assert n_chunks >= 3

    out = tmp_path / "resumed"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        evaluate_ranker(tiny_rank_run, out=out, order="shuffled")
    assert len(list(out.glob(f"{PARTIAL_PREFIX}*.safetensors"))) == 1
    assert not (out / "metrics.json").exists()

    counted = interrupt_after(monkeypatch, 10**9)
    got = evaluate_ranker(tiny_rank_run, out=out, order="shuffled")
    assert len(counted) == n_chunks - 2
    assert got == want
    pd.testing.assert_frame_equal(pd.read_csv(out / "ranks.csv"), pd.read_csv(whole / "ranks.csv"))
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))


def test_saved_chunks_of_another_evaluation_or_an_unreadable_file_are_not_used(tiny_rank_run, tmp_path,
                                                                              monkeypatch):
    from llamarec.ranking.evaluate import PARTIAL_PREFIX

    want = evaluate_ranker(tiny_rank_run, out=tmp_path / "whole")
    out = tmp_path / "eval"
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Interrupted):
        evaluate_ranker(tiny_rank_run, out=out, order="shuffled")  # another order: other scores
    counted = interrupt_after(monkeypatch, 10**9)
    assert evaluate_ranker(tiny_rank_run, out=out) == {**want}
    n_chunks = len(counted)

    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        evaluate_ranker(tiny_rank_run, out=out)
    [partial] = out.glob(f"{PARTIAL_PREFIX}*.safetensors")
    partial.write_bytes(b"not safetensors")
    counted = interrupt_after(monkeypatch, 10**9)
    with pytest.warns(UserWarning, match=r"not a valid safetensors file.*scoring its chunks again"):
        assert evaluate_ranker(tiny_rank_run, out=out) == want
    assert len(counted) == n_chunks


def test_the_ray_engine_starts_no_actor_when_every_chunk_is_saved(tiny_rank_run, tmp_path, monkeypatch):
    """A rerun whose chunks are all in the partial file (here: saved by the local engine, whose
    scores the Ray engine shares) ends without a cluster or an actor: the scores and their
    dtype come from the file."""
    import contextlib

    from llamarec import score_ray
    from llamarec.ranking import evaluate

    out = tmp_path / "eval"
    monkeypatch.setattr(evaluate, "remove_partial_scores", lambda directory: None)
    want = evaluate_ranker(tiny_rank_run, out=out)
    assert list(out.glob(f"{evaluate.PARTIAL_PREFIX}*.safetensors"))

    def no_actor(*args, **kwargs):
        raise AssertionError("an actor was asked to score")

    monkeypatch.setattr(score_ray, "session", lambda workers, address: contextlib.nullcontext())
    monkeypatch.setattr(score_ray, "rerank_ray", no_actor)
    assert evaluate_ranker(tiny_rank_run, out=out, engine="ray", workers=2) == want
