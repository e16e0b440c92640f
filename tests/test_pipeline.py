"""The Recommender: loading a run, resolving history entries, recommending with and without the ranker."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llamarec.errors import LlamarecError
from llamarec.pipeline import Recommender
from llamarec.ranking.scoring import ScoringConfig, fuse
from llamarec.retrieval.evaluate import top_k

HISTORY = ["3", "Item 4", "item 5"]  # a raw id, an exact title, a title in another case


@pytest.fixture
def rec(tiny_pipeline_run: Path) -> Recommender:
    return Recommender.load(tiny_pipeline_run)


def ids(result) -> list[str]:
    return [r.item_id for r in result.items]


def test_load_finds_the_ranker_and_the_tuned_fusion_weight(rec: Recommender, tiny_pipeline_run: Path) -> None:
    assert rec.ranker is not None
    assert rec.n_candidates == 20
    metrics = json.loads((tiny_pipeline_run / "metrics.json").read_text())
    assert rec.scoring.fusion_weight == metrics["ranker"]["fusion"]["weight"]
    assert rec.scoring == ScoringConfig.model_validate(metrics["ranker"]["scoring"])


def test_recommend_returns_k_new_items_best_first(rec: Recommender) -> None:
    result = rec.recommend(HISTORY, k=7)
    assert len(result.items) == 7
    assert len(set(ids(result))) == 7
    assert not set(ids(result)) & {"3", "4", "5"}
    assert all(r.title == f"Item {r.item_id}" for r in result.items)
    scores = [r.score for r in result.items]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(r.ranker_score, float) and isinstance(r.retriever_score, float) for r in result.items)
    assert all(np.isfinite([r.score, r.retriever_score, r.ranker_score]).all() for r in result.items)
    assert result.retrieval_ms > 0 and result.ranking_ms > 0


def test_the_final_score_fuses_ranker_and_retriever_over_the_candidates(rec: Recommender) -> None:
    """With k = all 20 candidates the scores are exactly fuse(ranker, retriever, weight)."""
    result = rec.recommend(HISTORY, k=20)
    llm = torch.tensor([[r.ranker_score for r in result.items]])
    ret = torch.tensor([[r.retriever_score for r in result.items]])
    expected = fuse(llm, ret, rec.scoring.fusion_weight, rec.scoring.retriever_temperature)[0]
    assert [r.score for r in result.items] == pytest.approx(expected.tolist(), abs=1e-5)


def test_with_fusion_weight_zero_the_ranker_alone_orders_the_candidates(rec: Recommender) -> None:
    ranker_only = Recommender(rec.retriever, rec.max_len, rec.catalogue, rec.ranker, ScoringConfig(fusion_weight=0.0))
    result = ranker_only.recommend(HISTORY, k=20)
    llm = [r.ranker_score for r in result.items]
    assert llm == sorted(llm, reverse=True)
    assert sorted(ids(result)) == sorted(ids(rec.recommend(HISTORY, k=20)))  # the same candidates


def test_history_entries_resolve_by_id_title_or_case_insensitive_title(rec: Recommender) -> None:
    assert rec.resolve_item("3") == rec.resolve_item(3) == rec.resolve_item("Item 3") == rec.resolve_item(" item 3 ")
    assert rec.catalogue.raw_ids[rec.resolve_item("Item 3")] == "3"
    by_id = rec.recommend(["3", "4", "5"], k=5)
    by_title = rec.recommend(["ITEM 3", "Item 4", "item 5"], k=5)
    assert ids(by_id) == ids(by_title)


def test_an_ambiguous_title_lists_the_item_ids(rec: Recommender) -> None:
    titles = list(rec.catalogue.titles)
    titles[6] = "ITEM 5"  # item "6" now differs from item "5" only in case
    twin = Recommender(rec.retriever, rec.max_len, dataclasses.replace(rec.catalogue, titles=titles))
    assert rec.catalogue.titles[6] == "Item 6"  # the loaded dataset is untouched
    assert twin.resolve_item("Item 5") == 5  # an exact title wins
    assert twin.resolve_item("ITEM 5") == 6
    with pytest.raises(LlamarecError, match=r"'item 5' matches several items \(ids 5, 6\)"):
        twin.recommend(["item 5"])


def test_an_unknown_title_suggests_close_matches(rec: Recommender) -> None:
    with pytest.raises(LlamarecError, match="close matches: .*Item 41") as info:
        rec.recommend(["Itme 41"])
    assert "'Itme 41' is neither an item id nor a title" in str(info.value)
    with pytest.raises(LlamarecError, match="neither an item id nor a title") as info:
        rec.recommend(["Casablanca"])
    assert "close matches" not in str(info.value)


@pytest.mark.parametrize("k", [0, 21])
def test_k_must_fit_the_candidates(rec: Recommender, k: int) -> None:
    with pytest.raises(LlamarecError, match=f"k={k}: must be between 1 and the number of candidates \\(20\\)"):
        rec.recommend(HISTORY, k=k)


def test_an_empty_history_is_an_error(rec: Recommender) -> None:
    with pytest.raises(LlamarecError, match="at least one item"):
        rec.recommend([])
    good, bad = rec.recommend_batch([["3"], []])
    assert good.error is None and len(good.items) == 10
    assert bad.items == [] and "at least one item" in bad.error


def test_recommend_batch_equals_single_calls(rec: Recommender) -> None:
    histories = [["1"], ["Item 10", "11", "item 12", "13", "14", "15", "16", "17", "18", "19", "20", "21"],
                 ["40", "Item 2"]]
    batch = rec.recommend_batch(histories, k=8)
    assert len(batch) == 3
    for history, got in zip(histories, batch):
        single = rec.recommend(history, k=8)
        assert ids(got) == ids(single)
        for a, b in zip(got.items, single.items):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert a.ranker_score == pytest.approx(b.ranker_score, abs=1e-5)
            assert a.retriever_score == pytest.approx(b.retriever_score, abs=1e-5)
    assert rec.recommend_batch([], k=8) == []


def test_without_the_ranker_the_retriever_orders_the_items(rec: Recommender, tiny_pipeline_run: Path) -> None:
    plain = Recommender.load(tiny_pipeline_run, with_ranker=False)
    assert plain.ranker is None
    result = plain.recommend(HISTORY, k=20)
    assert all(r.ranker_score is None and r.score == r.retriever_score for r in result.items)
    dense = np.array([plain.resolve_item(e) for e in HISTORY])
    items, scores = top_k(plain.retriever, [dense], 20, plain.max_len)
    assert ids(result) == [plain.catalogue.raw_ids[i] for i in items[0]]
    assert [r.score for r in result.items] == pytest.approx(scores[0].tolist(), abs=1e-6)
    # The ranker reorders the same candidates.
    assert sorted(ids(result)) == sorted(ids(rec.recommend(HISTORY, k=20)))


def test_a_bare_retriever_run_loads(tiny_pipeline_run: Path) -> None:
    bare = Recommender.load(tiny_pipeline_run / "retriever")
    assert bare.ranker is None
    plain = Recommender.load(tiny_pipeline_run, with_ranker=False)
    assert ids(bare.recommend(HISTORY, k=10)) == ids(plain.recommend(HISTORY, k=10))


def test_not_a_run_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LlamarecError, match="not a retriever run"):
        Recommender.load(tmp_path)


def test_a_run_with_fewer_candidates_recommends_among_those(
        copy_tiny_run, tiny_pipeline_values, tmp_path: Path) -> None:
    """The ranker was fine-tuned and its fusion weight tuned on k candidates: it ranks k."""
    from llamarec.runner import PipelineConfig, run_pipeline

    run = copy_tiny_run()
    run_pipeline(PipelineConfig.model_validate(tiny_pipeline_values(candidates={"k": 10})), run, progress=False)
    rec = Recommender.load(run)
    assert rec.n_candidates == 10
    assert len(rec.recommend(HISTORY, k=10).items) == 10
    with pytest.raises(LlamarecError, match="number of candidates \\(10\\)"):
        rec.recommend(HISTORY, k=11)
    # The retriever alone is not limited by the ranker's candidates.
    assert len(Recommender.load(run, with_ranker=False).recommend(HISTORY, k=20).items) == 20


def test_a_copied_run_loads_without_the_dataset(copy_tiny_run, tiny_pipeline_run: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A run moved elsewhere, with no dataset, no processed data and an empty cache, serves the
    same recommendations offline: it carries its catalogue and reads no path stored inside it."""
    import shutil

    import llamarec.data

    expected = Recommender.load(tiny_pipeline_run).recommend_batch([HISTORY, ["Item 7"]], k=10)
    moved = Path(shutil.move(copy_tiny_run(), tmp_path / "elsewhere" / "run"))
    empty_cache = tmp_path / "empty-cache"
    monkeypatch.setenv("LLAMAREC_CACHE", str(empty_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(llamarec.data, "load_dataset", no_dataset)
    monkeypatch.setattr(llamarec.data, "processed_dir", no_dataset)
    got = Recommender.load(moved).recommend_batch([HISTORY, ["Item 7"]], k=10)
    assert [ids(r) for r in got] == [ids(r) for r in expected]
    assert [[x.score for x in r.items] for r in got] == [[x.score for x in r.items] for r in expected]
    assert not empty_cache.exists() or not any(empty_cache.rglob("*.parquet"))


def test_one_bad_history_fails_alone(rec: Recommender) -> None:
    good, unknown, text, empty = rec.recommend_batch([HISTORY, ["no such item"], "356", []], k=5)
    assert good.error is None and len(good.items) == 5 and good.history == ["3", "4", "5"]
    assert "'no such item' is neither an item id nor a title" in unknown.error and unknown.items == []
    assert "not one string" in text.error and "at least one item" in empty.error
    assert ids(good) == ids(rec.recommend(HISTORY, k=5))


@pytest.mark.parametrize(("history", "message"), [
    ("356", "not one string"),
    ({"3", "4"}, "not set"),
    ([3.5], "expected an item id or a title, not float"),
    ([None], "not NoneType"),
])
def test_histories_of_the_wrong_type_are_refused(rec: Recommender, history, message: str) -> None:
    with pytest.raises(LlamarecError, match=message):
        rec.recommend(history)


def test_a_numpy_history_of_ids_is_fine(rec: Recommender) -> None:
    assert ids(rec.recommend(np.array([3, 4, 5]), k=5)) == ids(rec.recommend(["3", "4", "5"], k=5))


@pytest.mark.parametrize("k", [True, 2.0, "3", None])
def test_k_must_be_a_whole_number(rec: Recommender, k) -> None:
    with pytest.raises(LlamarecError, match="must be a whole number"):
        rec.recommend(HISTORY, k=k)


def test_load_honours_device_and_dtype(tiny_pipeline_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recommender.load(tiny_pipeline_run, device="cpu", dtype="bfloat16")
    assert next(rec.ranker.model.parameters()).dtype == torch.bfloat16
    # LRURec's complex recurrence has no bfloat16 kernels: it stays in float32, and says so
    assert next(rec.retriever.parameters()).dtype == torch.float32
    assert "cannot run in bfloat16" in caplog.text
    assert len(rec.recommend(HISTORY, k=5).items) == 5


def test_damaged_weights_are_an_error_not_nan_scores(copy_tiny_run) -> None:
    from safetensors.torch import load_file, save_file

    run = copy_tiny_run()
    path = run / "retriever" / "model.safetensors"
    tensors = load_file(path)
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
              path)
    with pytest.raises(LlamarecError, match="model.safetensors: .* mismatch with manifest.json"):
        Recommender.load(run)
    (run / "retriever" / "manifest.json").unlink()  # a run from before manifests: the scores are checked
    with pytest.raises(LlamarecError, match="NaN or infinite scores"):
        Recommender.load(run).recommend(HISTORY)


def test_serving_imports_no_training_code(tiny_pipeline_run: Path) -> None:
    """Loading a run and recommending never imports the trainers, evaluation or the runner."""
    import os
    import subprocess
    import sys

    training = ("llamarec.ranking.finetune", "llamarec.retrieval.train", "llamarec.ranking.evaluate",
                "llamarec.retrieval.candidates", "llamarec.runner")
    code = (
        "import sys\n"
        "from llamarec.pipeline import Recommender\n"
        f"Recommender.load({str(tiny_pipeline_run)!r}).recommend(['3', 'Item 4'], k=3)\n"
        f"print(' '.join(m for m in {training!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_a_prefix_cache_serves_repeated_histories_with_the_same_scores(rec: Recommender,
                                                                         tiny_pipeline_run: Path) -> None:
    cached = Recommender.load(tiny_pipeline_run, prefix_cache_mb=1)
    assert rec.prefix_cache is None and cached.prefix_cache.max_bytes == 2**20
    histories = [HISTORY, ["1", "2"], ["Item 10", "11", "12"]]
    expected = rec.recommend_batch(histories, k=8)
    first = cached.recommend_batch(histories[:2], k=8)  # misses: stored
    again = cached.recommend_batch(histories, k=8)  # two hits and a miss in one batch
    assert cached.prefix_cache.stats()["hits"] == 2 and cached.prefix_cache.stats()["misses"] == 3
    for got in (first, again):
        for a, b in zip(got, expected):
            assert ids(a) == ids(b)
            assert [r.ranker_score for r in a.items] == pytest.approx([r.ranker_score for r in b.items], abs=1e-5)
    with pytest.raises(LlamarecError, match="prefix_cache_mb must be at least 0"):
        Recommender.load(tiny_pipeline_run, prefix_cache_mb=-1)


def test_dtype_auto_is_the_hardwares_fast_dtype(tiny_pipeline_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llamarec.pipeline

    monkeypatch.setattr(llamarec.pipeline, "auto_dtype", lambda device: torch.bfloat16)
    assert next(Recommender.load(tiny_pipeline_run, dtype="auto").ranker.model.parameters()).dtype == torch.bfloat16
