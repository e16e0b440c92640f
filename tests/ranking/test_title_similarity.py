"""The title_similarity ranker kind: title vectors built once by the LLM, candidates scored by
their similarity to the user's recent titles, fused, evaluated, served and batch-scored through
the same paths as the verbalizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llamarec.checkpoint import save_tensors
from llamarec.errors import LlamarecError
from llamarec.layout import RANKER_DIR, TITLE_VECTORS_FILE
from llamarec.ranking.config import RankConfig, verify_ranker_run
from llamarec.ranking.finetune import finetune_ranker
from llamarec.ranking.ranker import load_ranker
from llamarec.ranking.scoring import ScoringConfig, fuse
from llamarec.ranking.title_similarity import TitleSimilarityRanker, load_title_ranker
from llamarec.ranking.title_vectors import embed_titles


@pytest.fixture
def title_config(tiny_retriever_run: Path, tiny_llm_dir: Path):
    def make(**overrides) -> RankConfig:
        return RankConfig(**{"retriever": tiny_retriever_run, "model": str(tiny_llm_dir), "device": "cpu",
                             "kind": "title_similarity", "prompt": {"max_history": 3}, **overrides})

    return make


@pytest.fixture
def title_run(title_config, tmp_path: Path) -> Path:
    out = tmp_path / "titles"
    finetune_ranker(title_config(), out, progress=False)
    return out


def _titles(run: Path) -> list[str]:
    from llamarec.catalogue import Catalogue
    from llamarec.ranking.ranker import read_rank_config

    return Catalogue.load(read_rank_config(run).retriever / "items.parquet").titles


def test_title_vectors_are_centred_unit_rows_that_do_not_depend_on_the_batch(tiny_llm_dir: Path) -> None:
    from llamarec.ranking.llm import load_llm

    model, tokenizer = load_llm(str(tiny_llm_dir), dtype="float32", device="cpu")
    titles = ["", "Toy Story (1995)", "Heat", "A much longer title, with words (1999)", "Up"]
    batched = embed_titles(titles, model, tokenizer, batch_size=4)
    alone = embed_titles(titles, model, tokenizer, batch_size=1)
    assert not batched[0].any()
    np.testing.assert_allclose(np.linalg.norm(batched[1:], axis=1), 1.0, atol=1e-5)
    # the padding of the batch of four must not reach the short titles' vectors
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    # the decoder alone gives the causal LM's last hidden states (after the final norm)
    with torch.no_grad():
        enc = tokenizer(titles[1:], return_tensors="pt", padding=True)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    means = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    means -= means.mean(0)
    np.testing.assert_allclose(batched[1:], means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)


def test_scores_are_the_dot_product_with_the_mean_of_the_last_items() -> None:
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    ranker = TitleSimilarityRanker(vectors, ["", "a", "b", "c", "d"], max_history=2)
    history, candidates = [4, 1, 2], np.array([[1, 2, 3, 4]])
    profile = (vectors[1] + vectors[2]) / 2  # item 4 is older than the last two
    want = torch.stack([vectors[i] @ profile for i in candidates[0]])
    torch.testing.assert_close(ranker.score([history], candidates)[0], want)

    retriever = np.array([[3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    scoring = ScoringConfig(ranker_scale=10.0, fusion_weight=0.5, retriever_temperature=2.0)
    sim, final = ranker.rerank([history], candidates, retriever, scoring)
    torch.testing.assert_close(final, fuse(10.0 * sim, torch.from_numpy(retriever), 0.5, 2.0))
    # with the retriever's order (weight inf) the similarities only break ties
    _, served = ranker.rerank([history], candidates, retriever, ScoringConfig())
    assert torch.argsort(served[0], descending=True).tolist() == [0, 1, 2, 3]
    with pytest.raises(LlamarecError, match="at least one item"):
        ranker.rerank([[]], candidates, retriever, scoring)


def test_building_writes_the_catalogues_vectors_once(title_run: Path, title_config,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    titles = _titles(title_run)
    metrics = json.loads((title_run / "train_metrics.json").read_text())
    assert metrics["kind"] == "title_similarity" and metrics["items"] == len(titles) - 1
    ranker = load_ranker(title_run, titles)
    assert isinstance(ranker, TitleSimilarityRanker) and ranker.max_history == 3
    assert ranker.vectors.shape == (len(titles), metrics["dim"])
    verify_ranker_run(title_run)

    def no_llm(*args, **kwargs):
        raise AssertionError("a finished title_similarity run was built again")

    monkeypatch.setattr("llamarec.ranking.llm.load_llm", no_llm)
    again = finetune_ranker(title_config(), title_run, progress=False)
    assert again == metrics
    with pytest.raises(LlamarecError, match="different config"):
        finetune_ranker(title_config(prompt={"max_history": 5}), title_run, progress=False)


def test_one_process_builds_the_vectors(title_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LlamarecError, match="one process"):
        finetune_ranker(title_config(), tmp_path / "titles", progress=False)
    assert not (tmp_path / "titles").exists()


def test_options_of_the_other_kind_are_refused(title_config, tiny_rank_config) -> None:
    with pytest.raises(ValueError, match="dtype, loss, residual_weight, lr: options of a verbalizer"):
        title_config(loss="letters", residual_weight=1.0, dtype="bfloat16", lr=1e-3)
    with pytest.raises(ValueError, match="similarity_scale is an option of a title_similarity"):
        tiny_rank_config(similarity_scale=5.0)
    assert title_config(similarity_scale=5.0, device="auto", model=None).scoring_batch_size() == 256
    assert tiny_rank_config().scoring_batch_size() == 4 and tiny_rank_config().scoring_device() == "cpu"
    assert title_config(device="cuda").scoring_device() == "cpu"  # nothing to place on a GPU


def test_a_verbalizer_run_saved_before_kinds_still_loads_and_resumes(tiny_rank_run: Path, tiny_rank_config,
                                                                     tmp_path: Path) -> None:
    from llamarec.manifest import record
    from llamarec.ranking.ranker import Ranker

    run = Path(shutil.copytree(tiny_rank_run, tmp_path / "old"))
    config = json.loads((run / "rank_config.json").read_text())
    for name in ("kind", "similarity_scale"):
        del config[name]
    (run / "rank_config.json").write_text(json.dumps(config))
    record(run, run / "rank_config.json")
    verify_ranker_run(run)
    assert isinstance(load_ranker(run, _titles(run)), Ranker)
    finetune_ranker(tiny_rank_config(), run, progress=False)  # the same config: resumes (finished)


@pytest.mark.parametrize("damage, message", [
    (lambda v: v[:-1], "vectors for"),
    (lambda v: v.masked_fill(torch.arange(len(v)).unsqueeze(1) == 2, float("nan")), "NaN"),
    (lambda v: v[:, 0], "2-D float"),
])
def test_bad_vectors_are_one_line_errors(title_run: Path, damage, message) -> None:
    from llamarec.checkpoint import load_tensors

    path = title_run / TITLE_VECTORS_FILE
    vectors = load_tensors(path)[0]["vectors"]
    save_tensors(path, {"vectors": damage(vectors)})
    with pytest.raises(LlamarecError, match="manifest"):  # changed behind the run's back
        verify_ranker_run(title_run)
    with pytest.raises(LlamarecError, match=message) as err:
        load_title_ranker(title_run, _titles(title_run), 3)
    assert "\n" not in str(err.value)


def test_evaluation_scores_every_valid_user_and_tunes_the_fusion(title_run: Path) -> None:
    from llamarec.ranking.evaluate import evaluate_ranker

    results = evaluate_ranker(title_run, out=title_run / "eval")
    assert results["scoring"]["ranker_scale"] == 10.0 and results["dtype"] == "float32"
    assert results["test"]["evaluated_users"] == results["test"]["valid_subset_users"]
    assert set(results["test"]["comparisons"]) == {"ranker_vs_retriever", "fusion_vs_retriever"}
    for options in ({"zero_shot": True}, {"calibrate": True}, {"order": "shuffled"}, {"dtype": "bfloat16"}):
        with pytest.raises(LlamarecError, match="title_similarity"):
            evaluate_ranker(title_run, out=title_run / "other", **options)


def test_a_pipeline_run_serves_and_batch_scores_the_title_ranker(tiny_pipeline_values, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from llamarec.pipeline import Recommender
    from llamarec.runner import PipelineConfig, run_pipeline
    from llamarec.score import _run_settings, score

    values = tiny_pipeline_values(evaluation={"limit": None})
    values["ranker"] = {"kind": "title_similarity", "model": values["ranker"]["model"], "device": "cpu"}
    run_pipeline(PipelineConfig.model_validate(values), tmp_path / "run", progress=False)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "title similarity" in report
    moved = Path(shutil.move(tmp_path / "run", tmp_path / "moved"))
    monkeypatch.setattr("llamarec.ranking.llm.load_llm", lambda *a, **k: pytest.fail("serving loaded the LLM"))
    rec = Recommender.load(moved)
    assert isinstance(rec.ranker, TitleSimilarityRanker) and rec.prefix_cache is None
    metrics = json.loads((moved / "metrics.json").read_text())["ranker"]
    assert rec.scoring.fusion_weight == metrics["fusion"]["weight"] and rec.scoring.ranker_scale == 10.0
    history = rec.catalogue.raw_ids[1:4]
    result = rec.recommend(history, k=5)
    assert all(item.ranker_score is not None for item in result.items)
    table = score(moved, [("u1", history)], k=5)
    assert table["item_id"].tolist() == [item.item_id for item in result.items]
    np.testing.assert_allclose(table["ranker_score"], [item.ranker_score for item in result.items], rtol=1e-5)
    assert (moved / RANKER_DIR / TITLE_VECTORS_FILE).is_file() and _run_settings(moved)["batch_size"] == 256


def test_rank_train_prints_the_title_rankers_summary(tiny_retriever_run: Path, tiny_llm_dir: Path, tmp_path: Path,
                                                     run_llamarec) -> None:
    proc = run_llamarec("rank", "train", "--retriever", str(tiny_retriever_run), "--out", str(tmp_path / "t"),
                        "--kind", "title_similarity", "--model", str(tiny_llm_dir), "--device", "cpu", "--json",
                        OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["title vectors"] == len(_titles(tmp_path / "t")) - 1 and summary["dimensions"] > 0
    bad = run_llamarec("rank", "train", "--retriever", str(tiny_retriever_run), "--out", str(tmp_path / "u"),
                       "--kind", "title_similarity", "--lr", "0.001", OMP_NUM_THREADS="1")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "lr: options of a verbalizer" in bad.stderr
