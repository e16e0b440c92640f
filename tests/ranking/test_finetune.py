"""LoRA fine-tuning of the ranker on the tiny world: the loss, the saved run, adapter round
trip, resume and config checks."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from llamarec.candidates import load_candidates
from llamarec.checkpoint import load_tensors
from llamarec.errors import LlamarecError
from llamarec.ranking.config import retriever_for_config
from llamarec.ranking.examples import evaluation_examples
from llamarec.ranking.finetune import Finetuner, finetune_ranker, letter_order_ndcg, random_order_ndcg, ranking_metrics
from llamarec.ranking.llm import load_llm
from llamarec.ranking.prompt import LETTERS
from llamarec.ranking.ranker import Ranker, read_rank_config
from llamarec.retrieval.train import load_retriever


class Interrupted(Exception):
    pass


def base_ranker(cfg) -> Ranker:
    model, tokenizer = load_llm(cfg.model, dtype="float32", device="cpu")
    return Ranker(model, tokenizer, load_retriever(cfg.retriever)[2].titles, batch_size=3)


def val_examples(cfg):
    ds = load_retriever(cfg.retriever)[2]
    return evaluation_examples(ds, load_candidates(cfg.retriever, "val"), "val", max_history=20,
                               limit=cfg.val_users)


def test_batch_loss_is_cross_entropy_of_the_answer_letter(tiny_rank_config, tmp_path):
    ft = Finetuner(tiny_rank_config(), tmp_path / "rank", progress=False)
    ft.model.eval()  # no LoRA dropout, for an exact comparison
    by_length = sorted(ft.train, key=lambda ex: len(ex.history))
    batch = [by_length[0], by_length[-1], by_length[len(by_length) // 2]]
    assert len({len(ex.history) for ex in batch}) > 1  # prompts of different lengths get padded

    loss = ft._batch_loss(batch)

    expected, wrong = [], []
    for ex in batch:
        text = ft.ranker.prompt(ex.history, ex.candidates)
        ids = ft.tokenizer(text)["input_ids"]
        with torch.no_grad():
            logits = ft.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        log_probs = logits.log_softmax(-1)
        letter = ft.tokenizer.convert_tokens_to_ids(LETTERS[ex.target])
        other = ft.tokenizer.convert_tokens_to_ids(LETTERS[(ex.target + 1) % 20])
        expected.append(-log_probs[letter])
        wrong.append(-log_probs[other])
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)
    assert loss.item() != pytest.approx(torch.stack(wrong).mean().item(), abs=1e-3)

    loss.backward()  # only the LoRA weights learn
    trained = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in ft.model.named_parameters() if "lora_B" in n)


def test_learning_rate_schedule():
    ft = SimpleNamespace(cfg=SimpleNamespace(lr=1.0, warmup_steps=2), total_steps=6)
    assert [Finetuner._lr(ft, s) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    ft.cfg.warmup_steps = 0
    assert [Finetuner._lr(ft, s) for s in range(3)] == pytest.approx([1.0, 5 / 6, 4 / 6])


def test_tiny_run_writes_adapter_tokenizer_config_and_metrics(tiny_rank_run, tiny_rank_config):
    cfg = tiny_rank_config()
    saved = json.loads((tiny_rank_run / "rank_config.json").read_text())
    assert saved == {**json.loads(cfg.model_dump_json()), "retriever": saved["retriever"]}
    assert saved["retriever"] == str(cfg.retriever.resolve())  # outside the run: by its absolute path
    adapter = tiny_rank_run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin"))
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"} and adapter_config["r"] == 8
    assert (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    original = AutoTokenizer.from_pretrained(cfg.model)
    assert tokenizer("(A) Item 7")["input_ids"] == original("(A) Item 7")["input_ids"]

    metrics = json.loads((tiny_rank_run / "train_metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["examples"] == 8 and metrics["val_users"] == 4
    assert metrics["val_order"] == "shuffled" and set(metrics["letter_order_val_NDCG@10"]) == \
        {"A_first", "p2.5", "p50", "p97.5"}
    assert [h["step"] for h in metrics["history"]] == [0, 1, 2]  # step 0 = zero-shot
    values = [h["NDCG@10"] for h in metrics["history"]]
    assert metrics["best_val_NDCG@10"] == max(values)
    assert metrics["best_step"] == metrics["history"][values.index(max(values))]["step"]
    # mean training loss since the previous validation; no retriever-alone loss without a residual
    assert [sorted(set(h) & {"train_loss", "train_loss_retriever_alone"}) for h in metrics["history"]] == \
        [[], ["train_loss"], ["train_loss"]]
    assert all(0 < h["train_loss"] < 20 for h in metrics["history"][1:])
    state = json.loads((tiny_rank_run / "last" / "state.json").read_text())
    assert state["finished"] and state["step"] == 2

    # step 0 is the base model: the same metrics as scoring with the plain LLM
    examples = val_examples(cfg)
    assert len(examples) == 4
    zero_shot = ranking_metrics(base_ranker(cfg).score(examples, cfg.val_order, seed=cfg.seed), examples)
    assert {k: metrics["history"][0][k] for k in zero_shot} == pytest.approx(zero_shot)


def test_saved_adapter_reproduces_the_trained_scores(tiny_rank_config, tmp_path):
    cfg = tiny_rank_config()
    ft = Finetuner(cfg, tmp_path / "rank", progress=False)
    ft.run()
    trained = ft.ranker.score(ft.val)
    with ft.model.disable_adapter():
        untouched = ft.ranker.score(ft.val)
    assert not torch.allclose(trained, untouched, atol=1e-4)  # training changed the scores

    ft.state.best = -1.0  # make the final model the best one, so that it is saved
    ft._validate()
    base, tokenizer = load_llm(cfg.model, dtype="float32", device="cpu")
    loaded = PeftModel.from_pretrained(base, tmp_path / "rank" / "adapter").eval()
    again = Ranker(loaded, tokenizer, ft.ds.titles, batch_size=2).score(ft.val)
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)


def interrupt_after_one_batch(monkeypatch) -> dict:
    """Training raises :class:`Interrupted` at its second batch; ``calls`` counts the batches
    (``calls.update(n=0, limit=100)`` lets a resumed run go on)."""
    original_loss = Finetuner._batch_loss
    calls = {"n": 0, "limit": 1}

    def loss(self, examples):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise Interrupted
        return original_loss(self, examples)

    monkeypatch.setattr(Finetuner, "_batch_loss", loss)
    return calls


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tiny_rank_run, tiny_rank_config,
                                                                  tmp_path, monkeypatch):
    cfg = tiny_rank_config()
    out = tmp_path / "rank"
    calls = interrupt_after_one_batch(monkeypatch)
    with pytest.raises(Interrupted):
        finetune_ranker(cfg, out, progress=False)
    state = json.loads((out / "last" / "state.json").read_text())
    assert (state["step"], state["example"], state["finished"]) == (1, 4, False)
    assert not (out / "train_metrics.json").exists()

    resumed = []
    original_resume = Finetuner._resume

    def spy(self):
        ok = original_resume(self)
        resumed.append((ok, self.state.step))
        return ok

    monkeypatch.setattr(Finetuner, "_resume", spy)
    calls.update(n=0, limit=100)
    metrics = finetune_ranker(cfg, out, progress=False)
    assert resumed == [(True, 1)] and calls["n"] == 1  # only the second step was trained
    assert metrics["steps"] == 2 and metrics["examples"] == 8

    reference = json.loads((tiny_rank_run / "train_metrics.json").read_text())
    assert metrics["history"] == reference["history"]
    assert metrics["best_step"] == reference["best_step"]
    for name in ("last/weights.safetensors", "adapter/adapter_model.safetensors"):
        got, ref = load_tensors(out / name)[0], load_tensors(tiny_rank_run / name)[0]
        assert got.keys() == ref.keys() and got
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)


def test_a_timed_checkpoint_between_validations_resumes_exactly(tiny_rank_config, tmp_path, monkeypatch):
    # Validation only at the end (step 2); checkpoint_seconds=0 saves after every step, so an
    # interruption in step 2 loses nothing: the run resumes at step 1 with its batch loss kept.
    cfg = tiny_rank_config(eval_every=2, residual_weight=1.0, loss="letters", examples="hard")
    straight = finetune_ranker(cfg, tmp_path / "straight", progress=False)
    calls = interrupt_after_one_batch(monkeypatch)
    with pytest.raises(Interrupted):
        finetune_ranker(cfg, tmp_path / "rank", progress=False, checkpoint_seconds=0)
    state = json.loads((tmp_path / "rank" / "last" / "state.json").read_text())
    assert (state["step"], state["finished"], [h["step"] for h in state["history"]]) == (1, False, [0])
    assert [len(v) for v in state["stream"].values()] == [1, 1]

    calls.update(n=0, limit=100)
    resumed = finetune_ranker(cfg, tmp_path / "rank", progress=False, checkpoint_seconds=0)
    assert calls["n"] == 1  # only the second step was trained again
    assert len(resumed["history"]) == 2 and "train_loss" in resumed["history"][1]
    for got, ref in zip(resumed["history"], straight["history"]):
        assert got == pytest.approx(ref)  # train_loss: the mean of both batches, one before the interruption
    got = load_tensors(tmp_path / "rank" / "last" / "weights.safetensors")[0]
    ref = load_tensors(tmp_path / "straight" / "last" / "weights.safetensors")[0]
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)


def test_without_a_timed_checkpoint_an_interruption_goes_back_to_the_last_validation(tiny_rank_config, tmp_path,
                                                                                    monkeypatch):
    cfg = tiny_rank_config(eval_every=2)
    interrupt_after_one_batch(monkeypatch)
    with pytest.raises(Interrupted):
        finetune_ranker(cfg, tmp_path / "rank", progress=False, checkpoint_seconds=float("inf"))
    assert json.loads((tmp_path / "rank" / "last" / "state.json").read_text())["step"] == 0


def test_a_checkpoint_saved_before_the_stream_was_kept_resumes(tiny_rank_config, tmp_path, monkeypatch):
    cfg = tiny_rank_config(eval_every=2)
    calls = interrupt_after_one_batch(monkeypatch)
    with pytest.raises(Interrupted):
        finetune_ranker(cfg, tmp_path / "rank", progress=False, checkpoint_seconds=0)
    state_file = tmp_path / "rank" / "last" / "state.json"
    state = json.loads(state_file.read_text())
    del state["stream"]
    state_file.write_text(json.dumps(state))
    calls.update(n=0, limit=100)
    metrics = finetune_ranker(cfg, tmp_path / "rank", progress=False)
    assert metrics["steps"] == 2 and calls["n"] == 1
    assert metrics["history"][-1]["train_loss"] > 0  # the batches since the resume


def test_a_different_config_in_the_same_directory_is_refused(tiny_rank_run, tiny_rank_config, tmp_path):
    out = tmp_path / "rank"
    out.mkdir()
    shutil.copy(tiny_rank_run / "rank_config.json", out / "rank_config.json")
    with pytest.raises(LlamarecError, match=r"different config \(lora_r\)"):
        finetune_ranker(tiny_rank_config(lora_r=4), out, progress=False)


def test_paper_examples_mode(tiny_rank_config, tmp_path):
    ft = Finetuner(tiny_rank_config(examples="paper", max_examples=6, epochs=2), tmp_path, progress=False)
    assert len(ft.train) == 12 and ft.train[:6] == ft.train[6:]  # one pass per epoch
    assert ft.total_steps == 3
    for ex in ft.train:
        assert len(set(ex.candidates)) == 20 and not set(ex.candidates) & set(ex.history)


def test_unknown_target_modules_are_a_clear_error(tiny_rank_config, tmp_path):
    with pytest.raises(LlamarecError, match="target_modules"):
        Finetuner(tiny_rank_config(target_modules=["no_such_proj"]), tmp_path, progress=False)


# --------------------------------------------------------------------------- recipes

def letter_logits(ft, examples):
    out = []
    for ex in examples:
        ids = ft.tokenizer(ft.ranker.prompt(ex.history, ex.candidates))["input_ids"]
        with torch.no_grad():
            out.append(ft.model(input_ids=torch.tensor([ids])).logits[0, -1, ft.ranker.letter_ids].float())
    return torch.stack(out)


def test_letter_loss_is_a_softmax_over_the_candidates_letters(tiny_rank_config, tmp_path):
    ft = Finetuner(tiny_rank_config(loss="letters"), tmp_path / "rank", progress=False)
    ft.model.eval()
    batch = ft.train[:3]
    expected = torch.nn.functional.cross_entropy(letter_logits(ft, batch), torch.tensor([ex.target for ex in batch]))
    assert ft._batch_loss(batch).item() == pytest.approx(expected.item(), abs=1e-5)
    vocab = Finetuner(tiny_rank_config(loss="vocab"), tmp_path / "rank-vocab", progress=False)
    vocab.model.eval()
    assert vocab._batch_loss(batch).item() > expected.item()  # the letters' share of the vocabulary is < 1


def test_residual_training_and_ranking_use_the_same_weight(tiny_rank_config, tmp_path):
    """The loss is the softmax of gate x letter logits + w x retriever log-probs (training
    prefixes' temperature), the gate starting at 0 (the retriever alone); validation,
    evaluation and the served run fuse with the same w and the learned gate (held-out
    temperature)."""
    from llamarec.ranking.evaluate import evaluate_ranker
    from llamarec.ranking.finetune import retriever_log_probs
    from llamarec.ranking.ranker import read_ranker_scale
    from llamarec.ranking.scoring import fuse

    w = 2.5
    cfg = tiny_rank_config(loss="letters", residual_weight=w, train_order="retriever", val_order="retriever")
    ft = Finetuner(cfg, tmp_path / "rank", progress=False)
    assert set(ft.temperatures) == {"train", "val"} and all(t > 0 for t in ft.temperatures.values())
    ft.model.eval()
    batch = ft.train[:3]
    labels = torch.tensor([ex.target for ex in batch])
    ret = w * retriever_log_probs(batch, ft.temperatures["train"])
    assert ft.gate.item() == 0.0  # training starts from the retriever alone
    assert ft._batch_loss(batch).item() == pytest.approx(torch.nn.functional.cross_entropy(ret, labels).item(),
                                                         abs=1e-5)
    with torch.no_grad():
        ft.gate.fill_(0.7)
    expected = torch.nn.functional.cross_entropy(0.7 * letter_logits(ft, batch) + ret, labels)
    assert ft._batch_loss(batch).item() == pytest.approx(expected.item(), abs=1e-5)
    ft.cfg = cfg.model_copy(update={"residual_weight": 1.0})  # another weight changes the loss
    assert ft._batch_loss(batch).item() != pytest.approx(expected.item(), abs=1e-4)
    ft.cfg = cfg
    with torch.no_grad():
        ft.gate.zero_()

    metrics = ft.run()
    assert ft.gate.item() != 0.0  # the gate learned
    assert metrics["residual_weight"] == w and metrics["retriever_temperatures"] == ft.temperatures
    assert metrics["ranker_scale"] == read_ranker_scale(tmp_path / "rank")  # the best adapter's gate
    results = evaluate_ranker(tmp_path / "rank", out=tmp_path / "eval")
    assert results["fusion"]["weight"] == w and results["fusion"]["chosen_by"] == "residual training"
    assert results["scoring"]["fusion_weight"] == w
    assert results["scoring"]["ranker_scale"] == metrics["ranker_scale"]
    assert results["scoring"]["retriever_temperature"] == pytest.approx(ft.temperatures["val"])
    # validation scores exactly as evaluation ranks: gate x logits fused with weight w
    scores = ft.ranker.score(ft.val, "retriever")
    fused = fuse(ft.ranker_scale() * scores, torch.tensor([ex.retriever_scores for ex in ft.val]), w,
                 ft.temperatures["val"])
    assert ranking_metrics(fused, ft.val) == pytest.approx({k: v for k, v in ft._validate().items()})


def test_delta_residual_is_the_adapters_change_in_training_and_ranking(tiny_rank_config, tmp_path):
    """residual_mode delta: the LLM term is the adapted minus the base model's letter logits,
    with no gate: exactly the retriever before training, and the same quantity in the loss, in
    validation and in the loaded ranker (also with a prefix cache, which the base model must
    not share)."""
    from llamarec.ranking.evaluate import evaluate_ranker
    from llamarec.ranking.finetune import retriever_log_probs
    from llamarec.ranking.prefix_cache import PrefixCache
    from llamarec.ranking.ranker import load_ranker
    from llamarec.ranking.scoring import fuse

    w = 1.5
    cfg = tiny_rank_config(loss="letters", residual_weight=w, residual_mode="delta", train_order="retriever",
                           val_order="retriever")
    ft = Finetuner(cfg, tmp_path / "rank", progress=False)
    ft.model.eval()
    batch = ft.train[:3]
    labels = torch.tensor([ex.target for ex in batch])
    ret = w * retriever_log_probs(batch, ft.temperatures["train"])
    assert ft._batch_loss(batch).item() == pytest.approx(torch.nn.functional.cross_entropy(ret, labels).item(),
                                                         abs=1e-5)
    assert ft.ranker.score(batch).abs().max().item() < 1e-5  # an untrained adapter changes nothing
    with torch.no_grad():
        for name, p in ft.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    with ft.model.disable_adapter():
        base = letter_logits(ft, batch)
    delta = letter_logits(ft, batch) - base
    assert delta.abs().max().item() > 0.01
    expected = torch.nn.functional.cross_entropy(delta + ret, labels)
    assert ft._batch_loss(batch).item() == pytest.approx(expected.item(), abs=1e-4)
    assert ft.ranker.score(batch) == pytest.approx(delta, abs=1e-4)
    val_ret = torch.tensor([ex.retriever_scores for ex in ft.val])
    ft.state.step = 1
    fused = fuse(ft.ranker.score(ft.val), val_ret, w, ft.temperatures["val"])
    assert ranking_metrics(fused, ft.val) == pytest.approx(ft._validate())
    ft.out.mkdir(parents=True, exist_ok=True)
    ft._check_config()
    ft._save_adapter()

    ranker = load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32")
    assert ranker.subtract_base and ft.ranker_scale() == 1.0
    assert ranker.score(ft.val) == pytest.approx(ft.ranker.score(ft.val), abs=1e-4)
    cached = load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32",
                         prefix_cache=PrefixCache(max_bytes=1 << 30))
    for _ in range(2):  # the second pass finds the prefixes cached
        assert cached.score(ft.val) == pytest.approx(ranker.score(ft.val), abs=1e-4)
    assert not load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32",
                           zero_shot=True).subtract_base
    trained = Finetuner(cfg, tmp_path / "trained", progress=False)
    metrics = trained.run()
    assert metrics["ranker_scale"] == 1.0
    assert any(p.abs().max() > 0 for n, p in trained.model.named_parameters() if "lora_B" in n)  # it learned
    # The training stream, per validation: the first batch (eval_every 1) against the retriever
    # alone on it; before the first update the delta is 0, so the two losses are equal.
    first = trained.train[: cfg.batch_size]
    alone = torch.nn.functional.cross_entropy(w * retriever_log_probs(first, trained.temperatures["train"]),
                                              torch.tensor([ex.target for ex in first]))
    step0, step1 = metrics["history"][:2]
    assert "train_loss" not in step0
    assert step1["train_loss_retriever_alone"] == pytest.approx(alone.item(), abs=1e-5)
    assert step1["train_loss"] == pytest.approx(alone.item(), abs=1e-4)
    results = evaluate_ranker(tmp_path / "trained", out=tmp_path / "eval")
    assert results["scoring"]["ranker_scale"] == 1.0 and results["scoring"]["fusion_weight"] == w


def test_delta_residual_needs_a_residual_and_lora(tiny_rank_config):
    with pytest.raises(ValueError, match="residual_mode: delta needs"):
        tiny_rank_config(loss="letters", residual_mode="delta")
    with pytest.raises(ValueError, match="residual_mode: delta needs"):
        tiny_rank_config(loss="letters", residual_weight=1.0, residual_mode="delta", full_layers=1,
                         target_modules=["q_proj"])


def test_the_gate_resumes_with_its_optimizer_state(tiny_rank_config, tmp_path, monkeypatch):
    cfg = tiny_rank_config(loss="letters", residual_weight=1.0, train_order="retriever")
    straight = Finetuner(cfg, tmp_path / "a", progress=False)
    straight.run()
    original_loss = Finetuner._batch_loss
    calls = {"n": 0}

    def loss(self, examples):
        calls["n"] += 1
        if calls["n"] > 1:
            raise Interrupted
        return original_loss(self, examples)

    monkeypatch.setattr(Finetuner, "_batch_loss", loss)
    with pytest.raises(Interrupted):
        Finetuner(cfg, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(Finetuner, "_batch_loss", original_loss)
    resumed = Finetuner(cfg, tmp_path / "b", progress=False)
    resumed.run()
    assert resumed.gate.item() == pytest.approx(straight.gate.item(), abs=1e-6)


def test_residual_weight_needs_the_letter_loss(tiny_rank_config):
    with pytest.raises(ValueError, match="residual_weight needs loss: letters"):
        tiny_rank_config(residual_weight=1.0, loss="vocab")


def test_all_linear_lora_targets_every_linear_layer(tiny_rank_config, tmp_path):
    ft = Finetuner(tiny_rank_config(target_modules=["all-linear"], lora_r=16), tmp_path / "rank", progress=False)
    wrapped = {n.split(".lora_A")[0].split(".")[-1] for n, _ in ft.model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped
    assert "lm_head" not in wrapped


def test_lora_layers_adapts_only_the_top_layers(tiny_rank_config, tmp_path):
    ft = Finetuner(tiny_rank_config(target_modules=["all-linear"], lora_r=4, lora_layers=1), tmp_path / "rank",
                   progress=False)
    adapted = {n for n, p in ft.model.named_parameters() if p.requires_grad and "lora_" in n}
    assert adapted and all(".layers.1." in n for n in adapted)  # the tiny model has layers 0 and 1
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapted} >= {"q_proj", "down_proj"}
    ft.model.train()
    ft._batch_loss(ft.train[:2]).backward()
    assert all(p.grad is not None for n, p in ft.model.named_parameters() if n in adapted)


def test_length_buckets_reorder_the_same_examples_into_batches_of_similar_length(tiny_rank_config, tmp_path):
    def padding(ft):
        lengths = [len(ft.ranker.builder.build_ids([ft.ds.titles[i] for i in ex.history],
                                                   [ft.ds.titles[i] for i in ex.candidates])) for ex in ft.train]
        batches = [lengths[i:i + 4] for i in range(0, len(lengths), 4)]
        return sum(len(b) * max(b) - sum(b) for b in batches)

    plain = Finetuner(tiny_rank_config(max_examples=48, batch_size=4), tmp_path / "a", progress=False)
    bucketed = Finetuner(tiny_rank_config(max_examples=48, batch_size=4, length_buckets=True), tmp_path / "b",
                         progress=False)
    key = lambda ex: (ex.user, tuple(ex.history), tuple(ex.candidates))  # noqa: E731
    assert sorted(map(key, bucketed.train)) == sorted(map(key, plain.train))
    assert padding(bucketed) < padding(plain)
    again = Finetuner(tiny_rank_config(max_examples=48, batch_size=4, length_buckets=True), tmp_path / "c",
                      progress=False)
    assert list(map(key, again.train)) == list(map(key, bucketed.train))  # seeded: a resumed run sees the same order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_layers_trains_the_top_layers_and_its_saved_weights_reproduce_the_scores(
        tiny_rank_config, tmp_path, dtype):
    from llamarec.ranking.llm import load_full_layers

    cfg = tiny_rank_config(full_layers=1, target_modules=["all-linear"], dtype=dtype, lr=1e-3)
    ft = Finetuner(cfg, tmp_path / "rank", progress=False)
    trained = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.layers.1.") for n in trained)
    assert all(p.dtype == torch.float32 for n, p in ft.model.named_parameters() if n in trained)
    before = {n: p.detach().clone() for n, p in ft.model.named_parameters()}
    ft.run()
    changed = {n for n, p in ft.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trained

    ft.state.best = -1.0  # the final weights become the saved ones
    with ft._autocast():
        scores = ft.ranker.score(ft.val)
    ft._validate()
    saved = tmp_path / "rank" / "adapter" / "full_layers.safetensors"
    assert set(load_tensors(saved)[0]) == trained
    base, tokenizer = load_llm(cfg.model, dtype="float32", device="cpu")
    load_full_layers(base, saved)
    again = Ranker(base.eval(), tokenizer, ft.ds.titles, batch_size=2).score(ft.val)
    tolerance = 1e-5 if dtype == "float32" else 0.1  # trained under bf16 autocast, scored in fp32 here
    torch.testing.assert_close(again, scores, atol=tolerance, rtol=tolerance)


def test_full_layers_resume_matches_an_uninterrupted_run(tiny_rank_config, tmp_path, monkeypatch):
    cfg = tiny_rank_config(full_layers=1)
    finetune_ranker(cfg, tmp_path / "whole", progress=False)
    calls = interrupt_after_one_batch(monkeypatch)
    with pytest.raises(Interrupted):
        finetune_ranker(cfg, tmp_path / "split", progress=False)
    calls.update(n=0, limit=100)
    finetune_ranker(cfg, tmp_path / "split", progress=False)
    assert calls["n"] == 1  # only the second step was trained after resuming
    for name in ("last/weights.safetensors", "adapter/full_layers.safetensors"):
        got, ref = load_tensors(tmp_path / "split" / name)[0], load_tensors(tmp_path / "whole" / name)[0]
        assert got.keys() == ref.keys() and got
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)


def test_full_layers_with_lora_options_is_a_config_error(tiny_rank_config):
    with pytest.raises(ValueError, match="full_layers"):
        tiny_rank_config(full_layers=1, lora_layers=1)


def test_a_saved_layer_the_base_model_lacks_is_a_one_line_error(tiny_rank_config, tmp_path):
    from safetensors.torch import save_file

    from llamarec.ranking.llm import load_full_layers

    path = tmp_path / "full_layers.safetensors"
    save_file({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, path)
    base, _ = load_llm(tiny_rank_config().model, dtype="float32", device="cpu")
    with pytest.raises(LlamarecError, match=r"full_layers.safetensors: 1 tensor\(s\) do not fit .*layers\.9"):
        load_full_layers(base, path)


def test_load_ranker_puts_the_full_layers_over_the_base_model(tiny_rank_config, tmp_path):
    from llamarec.ranking.ranker import load_ranker

    ft = Finetuner(tiny_rank_config(full_layers=1), tmp_path / "rank", progress=False)
    ft.run()
    ft.state.best = -1.0
    ft._validate()
    loaded = load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32")
    torch.testing.assert_close(loaded.score(ft.val), ft.ranker.score(ft.val), atol=1e-5, rtol=1e-5)
    (tmp_path / "rank" / "adapter" / "full_layers.safetensors").write_bytes(b"damaged")
    with pytest.raises(LlamarecError, match="full_layers.safetensors: not a valid safetensors file"):
        load_ranker(tmp_path / "rank", ft.ds.titles, device="cpu", dtype="float32")


def test_letter_order_ndcg_is_what_letter_only_rankers_score_on_the_shuffled_users():
    """The band of a ranker that ignores titles: A first gives each user the gain of the
    position the shuffle showed the target at; random letter orders centre on the random
    order's expected NDCG."""
    from llamarec.ranking.examples import RankExample
    from llamarec.ranking.ranker import shuffled_order

    examples = [RankExample(u, (1,), tuple(range(100 + 20 * u, 120 + 20 * u)), u % 20) for u in range(300)]
    band = letter_order_ndcg(examples, seed=5, draws=400)
    shown = [list(shuffled_order(ex.candidates, 5)).index(ex.target) for ex in examples]
    want = sum(1 / math.log2(p + 2) for p in shown if p < 10) / len(examples)
    assert band["A_first"] == pytest.approx(want)
    assert band["p2.5"] < random_order_ndcg(20) < band["p97.5"]
    assert band["p50"] == pytest.approx(random_order_ndcg(20), abs=0.01)
    # the target is the candidate the shuffle shows first (order[j]: the candidate shown at j)
    first = [RankExample(0, (1,), ex.candidates, int(shuffled_order(ex.candidates, 5)[0])) for ex in examples]
    assert letter_order_ndcg(first, seed=5, draws=10)["A_first"] == 1.0  # every target shown as A


def test_a_run_names_its_retriever_relative_to_itself_and_can_be_moved(tiny_retriever_run, tiny_rank_config,
                                                                       tmp_path, monkeypatch):
    shutil.copytree(tiny_retriever_run, tmp_path / "a" / "run" / "retriever")
    monkeypatch.chdir(tmp_path / "a")
    finetune_ranker(tiny_rank_config(retriever=Path("run/retriever")), Path("run/ranker"), progress=False)
    assert json.loads(Path("run/ranker/rank_config.json").read_text())["retriever"] == "../retriever"

    moved = Path(shutil.move(tmp_path / "a" / "run", tmp_path / "b" / "run"))
    monkeypatch.chdir(tmp_path)
    assert read_rank_config(Path("b/run/ranker")).retriever.resolve() == (moved / "retriever").resolve()
    # resuming it from another working directory, under another name, is the same run
    finetune_ranker(tiny_rank_config(retriever=moved / "retriever"), Path("b/run/ranker"), progress=False)
    other = Path(shutil.copytree(moved / "retriever", tmp_path / "other"))
    with pytest.raises(LlamarecError, match=r"different config \(retriever\)"):
        finetune_ranker(tiny_rank_config(retriever=other), Path("b/run/ranker"), progress=False)


def test_a_config_naming_its_retriever_from_the_working_directory_still_reads(tiny_rank_run, tiny_rank_config,
                                                                             tmp_path, monkeypatch):
    # How runs were saved before: the path as given on the command line.
    rank = Path(shutil.copytree(tiny_rank_run, tmp_path / "run" / "ranker"))
    shutil.copytree(read_rank_config(tiny_rank_run).retriever, tmp_path / "run" / "retriever")
    config = json.loads((rank / "rank_config.json").read_text())
    (rank / "rank_config.json").write_text(json.dumps({**config, "retriever": "run/retriever"}))
    monkeypatch.chdir(tmp_path)
    assert read_rank_config(Path("run/ranker")).retriever == Path("run/retriever")
    # resuming it rewrites the config the new way
    finetune_ranker(tiny_rank_config(retriever=Path("run/retriever")), rank, progress=False)
    assert json.loads((rank / "rank_config.json").read_text())["retriever"] == "../retriever"


def test_a_retriever_reached_through_a_symlink_in_the_run_is_named_by_the_link(tmp_path):
    (tmp_path / "data" / "ret").mkdir(parents=True)
    (tmp_path / "run" / "ranker").mkdir(parents=True)
    (tmp_path / "run" / "retriever").symlink_to(tmp_path / "data" / "ret")
    run = tmp_path / "run"
    assert retriever_for_config(run / "ranker", run / "retriever") == "../retriever"
    assert retriever_for_config(run / "ranker", tmp_path / "data" / "ret") == str((tmp_path / "data" / "ret").resolve())


def test_only_the_main_process_writes_the_run(tiny_rank_config, tmp_path, monkeypatch):
    # Under `accelerate launch` every process trains; a process other than the main one checks
    # the config like the others but writes nothing into the run directory.
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "is_main_process", property(lambda self: False))
    metrics = finetune_ranker(tiny_rank_config(), tmp_path / "rank", progress=False, checkpoint_seconds=0)
    assert metrics["steps"] > 0
    assert list((tmp_path / "rank").iterdir()) == []
