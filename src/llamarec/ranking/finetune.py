"""Fine-tuning of the ranker (LoRA / QLoRA, or full training of the top layers): cross-entropy
on the answer letter only.

The LM head runs on the last prompt position only (where the answer letter is predicted), so a
step costs one forward/backward through the transformer and no full-vocabulary logits at every
position. The best adapter by validation NDCG@10 is kept in peft's format (safetensors; with
``full_layers`` the trained layers' weights in one safetensors file), with the tokenizer and a
JSON config; an interrupted run resumes from its last checkpoint, written at each validation
and every ``checkpoint_seconds`` of training in between.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llamarec.candidates import load_candidates, load_train_candidates
from llamarec.checkpoint import (
    load_training_state,
    restore_state,
    restoring,
    save_tensors,
    save_training_state,
)
from llamarec.data import load_run_dataset
from llamarec.errors import LlamarecError
from llamarec.io import atomic_dir, write_json
from llamarec.layout import (
    ADAPTER_DIR,
    FULL_LAYERS_FILE,
    LAST_CHECKPOINT,
    RANK_TRAIN_METRICS,
    RANKER_SCALE_FILE,
)
from llamarec.manifest import record
from llamarec.metrics import metrics_from_ranks, target_ranks
from llamarec.ranking.config import RankConfig, check_rank_config
from llamarec.ranking.examples import RankExample, evaluation_examples, hard_negative_examples, paper_examples
from llamarec.ranking.llm import decoder_layers, load_llm
from llamarec.ranking.ranker import Ranker, read_ranker_scale, shuffled_order
from llamarec.ranking.scoring import fit_temperature, fuse
from llamarec.ranking.verbalizer import length_buckets, next_token_logits

GATE_KEY = "residual_gate"
GATE_LR_SCALE = 10.0
BUCKET_WINDOW = 16  # batches sorted by prompt length together with length_buckets
CHECKPOINT_SECONDS = 600.0  # an interrupted run loses at most this much training (plus a step)


@dataclass
class FinetuneState:
    step: int = 0  # optimizer steps done
    example: int = 0  # next training example (over all epochs)
    best: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    stream: dict[str, list[float]] = field(default_factory=dict)  # batch losses since the last validation


def ranking_metrics(scores: torch.Tensor, examples: list[RankExample], ks=(1, 5, 10)) -> dict[str, float]:
    """Metrics of candidate scores against each example's target index."""
    labels = torch.tensor([ex.target for ex in examples])
    return metrics_from_ranks(target_ranks(scores, labels), ks)


def random_order_ndcg(n: int, k: int = 10) -> float:
    """Expected NDCG@k of a random order of ``n`` candidates (the target equally likely anywhere)."""
    return sum(1 / math.log2(r + 2) for r in range(min(k, n))) / n


def letter_order_ndcg(examples: list[RankExample], seed: int, k: int = 10, draws: int = 1000) -> dict[str, float]:
    """NDCG@k on ``examples`` shown in their shuffled order (:func:`shuffled_order` with
    ``seed``, as ``val_order: shuffled`` shows them) of rankers that ignore the titles and rank
    by letter alone: ``A_first`` (A, B, C, ...: the untuned model's habit) and percentiles
    over ``draws`` random letter orders. With one fixed shuffle per user these spread widely on
    a few hundred users; a validation score inside the band shows no content signal."""
    n = len(examples[0].candidates)
    shown = np.array([list(shuffled_order(ex.candidates, seed)).index(ex.target) for ex in examples])

    def ndcg(rank_of_letter: np.ndarray) -> float:
        return metrics_from_ranks(torch.from_numpy(rank_of_letter[shown]), (k,))[f"NDCG@{k}"]

    rng = np.random.default_rng(seed)
    spread = [ndcg(np.argsort(rng.permutation(n))) for _ in range(draws)]
    return {"A_first": ndcg(np.arange(n)), **{f"p{q:g}": float(np.percentile(spread, q)) for q in (2.5, 50, 97.5)}}


def retriever_log_probs(examples: list[RankExample], temperature: float) -> torch.Tensor:
    """Retriever log-probabilities over each example's candidates, calibrated by ``temperature``."""
    return (torch.tensor([ex.retriever_scores for ex in examples], dtype=torch.float32) / temperature).log_softmax(-1)


def example_temperature(examples: list[RankExample]) -> float:
    """:func:`~llamarec.ranking.scoring.fit_temperature` on examples' retriever scores."""
    return fit_temperature(torch.tensor([ex.retriever_scores for ex in examples]),
                           torch.tensor([ex.target for ex in examples]))


def attach_lora(model: torch.nn.Module, cfg: RankConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model)
    layers: dict = {}
    if cfg.lora_layers is not None:
        # Only the top layers adapt, so nothing below them needs gradients: the backward pass
        # stops at the lowest adapted layer, which is most of the saving.
        total = model.config.num_hidden_layers
        layers = {"layers_to_transform": list(range(max(0, total - cfg.lora_layers), total)),
                  "layers_pattern": "layers"}
    targets = cfg.lora_targets()
    if layers and targets == "all-linear":  # peft takes layers_to_transform with a list only
        targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, torch.nn.Linear) and ".layers." in name})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", **layers)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise LlamarecError(f"LoRA target_modules {cfg.target_modules}: {exc}") from None


def train_top_layers(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Full fine-tuning of the last ``n`` transformer layers: only their weights train, kept in
    float32 (bf16 weights would round small updates away) under a bf16/fp16 rest of the model."""
    model.requires_grad_(False)
    for layer in decoder_layers(model)[-n:]:
        layer.float().requires_grad_(True)
    return model


def make_trainable(model: torch.nn.Module, cfg: RankConfig) -> torch.nn.Module:
    """The model with what ``cfg`` trains: the top ``full_layers`` layers, else a LoRA adapter."""
    return train_top_layers(model, cfg.full_layers) if cfg.full_layers else attach_lora(model, cfg)


class Finetuner:
    def __init__(self, cfg: RankConfig, out: Path, progress: bool = True,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.checkpoint_seconds = checkpoint_seconds
        self.ds = load_run_dataset(cfg.retriever)
        self.prompt_cfg = prompt_cfg = cfg.prompt_config()
        torch.manual_seed(cfg.seed)
        # One process per GPU under `accelerate launch` / `torchrun`; a single process otherwise.
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=cfg.device == "cpu")
        multi = self.accelerator.num_processes > 1
        device = str(self.accelerator.device) if multi else cfg.device
        base, self.tokenizer = load_llm(cfg.model, dtype=cfg.dtype, device=device,
                                        load_in_4bit=cfg.load_in_4bit, gguf_file=cfg.gguf_file)
        # fp32 trained layers over a lower-precision model run under autocast to that dtype.
        self.mixed_dtype = base.dtype if cfg.full_layers and base.dtype != torch.float32 else None
        self.model = make_trainable(base, cfg)
        self.delta = cfg.residual_mode == "delta"
        self.ranker = Ranker(self.model, self.tokenizer, self.ds.titles, prompt_cfg, cfg.eval_batch_size,
                             subtract_base=self.delta)
        max_history = prompt_cfg.max_history
        if cfg.examples == "paper" and prompt_cfg.shows_retriever:
            raise LlamarecError("a prompt showing the retriever's rank or probability needs examples: hard")
        if cfg.examples == "paper":
            train = paper_examples(self.ds, cfg.max_examples, max_history=max_history, seed=cfg.seed,
                                   recent_prefixes=cfg.recent_prefixes)
        else:
            train = hard_negative_examples(self.ds, load_train_candidates(cfg.retriever),
                                           max_history=max_history, seed=cfg.seed, n_examples=cfg.max_examples,
                                           order=cfg.train_order, recent_prefixes=cfg.recent_prefixes)
        # Each process takes every world-th example; equal shards keep the processes in step.
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        train = train * cfg.epochs
        if cfg.length_buckets:
            train = self._bucket_by_length(train, cfg.batch_size * cfg.grad_accum * world)
        self.train = train[: len(train) - len(train) % world][rank::world]
        val_cands = load_candidates(cfg.retriever, "val")
        self.val = evaluation_examples(self.ds, val_cands, "val", max_history=max_history, limit=cfg.val_users)
        if not self.train or not self.val:
            raise LlamarecError(f"{cfg.retriever}: no training or validation examples for the ranker")
        # Residual training: the retriever's log-probabilities, each population calibrated by
        # its own temperature (the retriever is over-confident on its own training prefixes).
        self.temperatures = {}
        if cfg.residual_weight > 0:
            if cfg.examples != "hard":
                raise LlamarecError("residual_weight needs examples: hard (retriever scores of training prefixes)")
            self.temperatures = {"train": example_temperature(self.train),
                                 "val": example_temperature(evaluation_examples(self.ds, val_cands, "val"))}
        # The residual's gate: the ranker's letter logits enter as gate x logits, the gate
        # starting at 0, so training starts from the retriever alone and opens the gate only as
        # far as the LLM's logits help. It learns GATE_LR_SCALE times faster than the adapter.
        # A delta residual needs no gate: the adapter's change of the logits starts at 0.
        self.gate = torch.nn.Parameter(torch.zeros((), device=next(self.model.parameters()).device))
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        if cfg.residual_weight > 0 and not self.delta:
            groups.append({"params": [self.gate], "lr_scale": GATE_LR_SCALE})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
        # ``train_model`` is DDP-wrapped when several processes train; scoring and saving use
        # the plain peft model.
        self.train_model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.total_steps = math.ceil(len(self.train) / (cfg.batch_size * cfg.grad_accum))
        self.state = FinetuneState()
        self.device = next(self.model.parameters()).device

    def _bucket_by_length(self, examples: list[RankExample], batch: int) -> list[RankExample]:
        """Examples reordered so that each batch holds prompts of similar length: sorted by
        token count within windows of BUCKET_WINDOW batches, then the batches shuffled (seeded),
        so padding shrinks while batches still come from the whole run in random order."""
        lengths = [len(self.ranker.builder.build_ids([self.ds.titles[i] for i in ex.history],
                                                     [self.ds.titles[i] for i in ex.candidates],
                                                     ex.retriever_scores or None))
                   for ex in examples]
        span = batch * BUCKET_WINDOW
        batches = []
        for start in range(0, len(examples), span):
            batches += [[start + i for i in b] for b in length_buckets(lengths[start:start + span], batch)]
        random.Random(self.cfg.seed).shuffle(batches)
        return [examples[i] for b in batches for i in b]

    def _lr(self, step: int) -> float:
        """Linear warm-up, then linear decay to zero at the last step."""
        warm = self.cfg.warmup_steps
        if step < warm:
            return self.cfg.lr * (step + 1) / warm
        return self.cfg.lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - warm))

    def _batch_loss(self, examples: list[RankExample]) -> torch.Tensor:
        """Mean cross-entropy of the answer: over the whole vocabulary (``loss: vocab``) or over
        the candidates' letters (``loss: letters``), plus the calibrated retriever
        log-probabilities times ``residual_weight`` in residual training."""
        encoded = [self.ranker.builder.training_example(
            [self.ds.titles[i] for i in ex.history], [self.ds.titles[i] for i in ex.candidates], ex.target,
            ex.retriever_scores or None) for ex in examples]
        pad = 0 if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        inputs = [e.input_ids[:-1] for e in encoded]
        with self._autocast():
            logits = next_token_logits(self.train_model, inputs, pad).float()
            if self.delta:
                with torch.no_grad(), self.model.disable_adapter():
                    base = next_token_logits(self.model, inputs, pad).float()
                logits = logits - base
        if self.cfg.loss == "vocab":
            return torch.nn.functional.cross_entropy(logits, torch.tensor([e.labels[-1] for e in encoded],
                                                                          device=self.device))
        n = len(examples[0].candidates)
        letters = logits[:, self.ranker.letter_ids[:n]]
        if self.cfg.residual_weight > 0:
            letters = self.ranker_gate() * letters + self._retriever_term(examples).to(letters.device)
        return torch.nn.functional.cross_entropy(letters, self._targets(examples).to(letters.device))

    def _retriever_term(self, examples: list[RankExample]) -> torch.Tensor:
        """``residual_weight`` x the retriever's log-probabilities (training prefixes' temperature)."""
        return self.cfg.residual_weight * retriever_log_probs(examples, self.temperatures["train"])

    @staticmethod
    def _targets(examples: list[RankExample]) -> torch.Tensor:
        return torch.tensor([ex.target for ex in examples])

    def _retriever_loss(self, examples: list[RankExample]) -> float:
        """The residual loss with the LLM's term left out: the retriever alone on ``examples``.
        Each example is seen once, so below this on the training stream the ranker has learned
        something that carries to examples it has not seen."""
        return torch.nn.functional.cross_entropy(self._retriever_term(examples), self._targets(examples)).item()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.mixed_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.mixed_dtype)
        if self.cfg.autocast_bf16 and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _score_val(self) -> torch.Tensor:
        # Mixed-precision layers (full_layers) need autocast; LoRA validation runs as served.
        with self._autocast() if self.mixed_dtype is not None else contextlib.nullcontext():
            return self.ranker.score(self.val, self.cfg.val_order, seed=self.cfg.seed)

    def _validate(self) -> dict[str, float]:
        """NDCG@10 etc. of the validation users scored as at inference: in ``val_order``, fused
        with the retriever in residual training."""
        if self.cfg.residual_weight > 0:
            ret = torch.tensor([ex.retriever_scores for ex in self.val])
            scale = self.ranker_scale()
            # A closed gate, or an untrained delta (step 0), serves the retriever's own ranking:
            # no LLM forward needed.
            untrained = not scale or (self.delta and self.state.step == 0)
            llm = torch.zeros_like(ret) if untrained else self._score_val()
            scores = fuse(scale * llm, ret, self.cfg.residual_weight, self.temperatures["val"])
        else:
            scores = self._score_val()
        metrics = ranking_metrics(scores, self.val)
        st = self.state
        st.history.append({"step": st.step, **metrics})
        if metrics["NDCG@10"] > st.best:
            st.best, st.best_step, st.bad_evals = metrics["NDCG@10"], st.step, 0
            if self.accelerator.is_main_process:
                self._save_adapter()
        else:
            st.bad_evals += 1
        return metrics

    def ranker_gate(self) -> torch.Tensor | float:
        """The factor on the letter logits in the residual loss: the learned gate, or 1 for a delta."""
        return 1.0 if self.delta else self.gate

    def ranker_scale(self) -> float:
        """What the ranker's letter logits are multiplied by before fusion (the residual's gate)."""
        return 1.0 if self.cfg.residual_weight <= 0 or self.delta else float(self.gate.detach())

    def _save_adapter(self) -> None:
        with atomic_dir(self.out / ADAPTER_DIR) as tmp:
            if self.cfg.full_layers:
                save_tensors(tmp / FULL_LAYERS_FILE, self._trained_weights())
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            write_json(tmp / RANKER_SCALE_FILE, {"ranker_scale": self.ranker_scale()})
        record(self.out, self.out / ADAPTER_DIR)

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """What training changes: the LoRA adapter's weights, or the full_layers' parameters."""
        if self.cfg.full_layers:
            return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def _save_last(self) -> None:
        if self.accelerator.is_main_process:
            weights = {**self._trained_weights(), GATE_KEY: self.gate.detach()}
            save_training_state(self.out / LAST_CHECKPOINT, weights, self.optimizer,
                                {"torch": torch.get_rng_state()}, self.state.__dict__)

    def _resume(self) -> bool:
        restored = load_training_state(self.out / LAST_CHECKPOINT, self.optimizer)
        if restored is None:
            return False
        weights, rng, state = restored
        self.state = restore_state(FinetuneState, state, self.out / LAST_CHECKPOINT)
        with restoring(self.out / LAST_CHECKPOINT):
            with torch.no_grad():
                self.gate.copy_(weights.pop(GATE_KEY))
            trained = self._trained_weights()
            if {k: tuple(v.shape) for k, v in weights.items()} != {k: tuple(v.shape) for k, v in trained.items()}:
                raise ValueError("its weights do not fit this ranker's trained layers")  # peft would skip them
            if self.cfg.full_layers:
                with torch.no_grad():
                    for name, tensor in weights.items():
                        trained[name].copy_(tensor)
            else:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model, weights)
            torch.set_rng_state(rng["torch"])
        return True

    def _check_config(self) -> None:
        # every process checks; one writes
        check_rank_config(self.out, self.cfg, self.prompt_cfg, write=self.accelerator.is_main_process)

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()
        resumed = self._resume()
        st, cfg = self.state, self.cfg
        if not st.history:
            self._validate()  # step 0: the base model, so fine-tuning must beat zero-shot
            self._save_last()
        show = self.progress and self.accelerator.is_main_process
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not show, dynamic_ncols=True,
                   desc="LoRA" + (" (resumed)" if resumed else ""))
        started = time.perf_counter() - st.seconds
        saved_at = time.perf_counter()
        self.model.train()
        per_step = cfg.batch_size * cfg.grad_accum
        stream = st.stream
        stream.setdefault("train_loss", [])
        if cfg.residual_weight > 0:
            stream.setdefault("train_loss_retriever_alone", [])
        while not st.finished and st.step < self.total_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr(st.step) * group.get("lr_scale", 1.0)
            losses = []
            for _ in range(cfg.grad_accum):
                chunk = self.train[st.example:st.example + cfg.batch_size]
                if not chunk:
                    break
                loss = self._batch_loss(chunk) * len(chunk) / per_step
                self.accelerator.backward(loss)
                losses.append(loss.item() * per_step / len(chunk))
                stream["train_loss"].append(losses[-1])
                if cfg.residual_weight > 0:
                    stream["train_loss_retriever_alone"].append(self._retriever_loss(chunk))
                st.example += len(chunk)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {np.mean(losses):.3f} best val NDCG@10 {st.best:.4f}")
            validate = st.step % cfg.eval_every == 0 or st.step == self.total_steps
            if validate:
                self._validate()
                st.history[-1].update({k: float(np.mean(v)) for k, v in stream.items() if v})
                for losses_since in stream.values():
                    losses_since.clear()
                st.finished = st.bad_evals >= cfg.patience or st.step == self.total_steps
                self.model.train()
            if validate or time.perf_counter() - saved_at >= self.checkpoint_seconds:
                st.seconds = time.perf_counter() - started
                self._save_last()
                saved_at = time.perf_counter()
        bar.close()
        st.finished = True
        st.seconds = time.perf_counter() - started
        self._save_last()
        metrics = {"best_step": st.best_step, "best_val_NDCG@10": st.best, "steps": st.step,
                   "examples": st.example * self.accelerator.num_processes, "train_seconds": round(st.seconds, 1),
                   "val_users": len(self.val), "val_order": cfg.val_order,
                   "random_order_val_NDCG@10": random_order_ndcg(len(self.val[0].candidates)),
                   **({"letter_order_val_NDCG@10": letter_order_ndcg(self.val, cfg.seed)}
                      if cfg.val_order == "shuffled" else {}),
                   "residual_weight": cfg.residual_weight, "ranker_scale": read_ranker_scale(self.out),
                   "retriever_temperatures": self.temperatures, "history": st.history}
        if self.accelerator.is_main_process:
            write_json(self.out / RANK_TRAIN_METRICS, metrics)
            record(self.out, self.out / RANK_TRAIN_METRICS)
        return metrics


def finetune_ranker(cfg: RankConfig, out: Path, progress: bool = True,
                    checkpoint_seconds: float = CHECKPOINT_SECONDS) -> dict:
    """Fine-tune (or resume) the ranker in ``out``; returns the training metrics. A
    ``title_similarity`` ranker is not fine-tuned: its title vectors are built instead."""
    if cfg.kind == "title_similarity":
        from llamarec.ranking.title_vectors import build_title_ranker

        return build_title_ranker(cfg, out, progress)
    return Finetuner(cfg, out, progress, checkpoint_seconds).run()
