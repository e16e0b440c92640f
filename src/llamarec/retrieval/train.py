"""Training a retriever with the paper's protocol: full-softmax cross-entropy on sliding windows,
AdamW, validation every N iterations with exactly the test protocol, early stopping, resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llamarec.catalogue import Catalogue
from llamarec.checkpoint import (
    check_same_config,
    load_tensors,
    load_training_state,
    restore_state,
    restoring,
    save_tensors,
    save_training_state,
)
from llamarec.configs import read_json_file
from llamarec.data import Dataset, load_dataset, load_run_dataset
from llamarec.data.split import eval_examples, train_sequence
from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError
from llamarec.io import write_json
from llamarec.layout import CATALOGUE_FILE, LAST_CHECKPOINT, RETRIEVER_CONFIG, RETRIEVER_METRICS, RETRIEVER_MODEL
from llamarec.manifest import record
from llamarec.retrieval.config import RetrievalConfig
from llamarec.retrieval.evaluate import evaluate
from llamarec.retrieval.load import load_retriever_model
from llamarec.retrieval.models import RetrieverConfig, SequentialRecommender, build_model
from llamarec.retrieval.windows import training_windows


@dataclass
class TrainState:
    """Where training stands; saved as JSON beside the last checkpoint."""

    epoch: int = 0
    batch: int = 0  # next batch within the epoch
    step: int = 0
    best: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    device: str | None = None  # the device of the last training steps (a re-read run keeps it)


def model_config(cfg: RetrievalConfig, n_items: int) -> RetrieverConfig:
    return RetrieverConfig(n_items=n_items, max_len=cfg.max_len, hidden=cfg.hidden,
                           n_blocks=cfg.n_blocks, n_heads=cfg.n_heads, dropout=cfg.dropout,
                           attn_dropout=cfg.attn_dropout, mask_prob=cfg.mask_prob)


def load_retriever(run_dir: Path, device: str = "cpu") -> tuple[SequentialRecommender, RetrievalConfig, Dataset]:
    """The best model of a finished (or running) retriever run, on ``device``, with its config
    and dataset (for training-time work: candidates, evaluation)."""
    model, cfg = load_retriever_model(run_dir, device)
    return model, cfg, load_run_dataset(run_dir)


class Trainer:
    """Trains on ``device`` (see :func:`~llamarec.devices.resolve_device`). Batches, masks and
    the data order are drawn on the CPU, so they do not depend on the device; dropout draws on
    the device, so a CUDA run's numbers differ from a CPU run's."""

    def __init__(self, cfg: RetrievalConfig, out: Path, progress: bool = True, device: str = "auto") -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.device = resolve_device(device)
        self.ds = load_dataset(cfg.dataset, cfg.data_dir, min_uc=cfg.min_uc, min_sc=cfg.min_sc, ties=cfg.ties)
        torch.manual_seed(cfg.seed)  # every device's generator
        self.model = build_model(cfg.model, model_config(cfg, self.ds.n_items)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        train_seqs = [train_sequence(s) for s in self.ds.sequences]
        self.windows = torch.from_numpy(training_windows(train_seqs, cfg.max_len, cfg.window_step))
        self.val = eval_examples(self.ds, "val")
        self.mask_rng = torch.Generator().manual_seed(cfg.seed)
        self.state = TrainState()

    # -- checkpoints ---------------------------------------------------------------------------
    def _check_config(self) -> None:
        path = self.out / RETRIEVER_CONFIG
        saved = read_json_file(path).get("train") if path.is_file() else None
        if path.is_file() and not isinstance(saved, dict):
            raise LlamarecError(f"{path}: no 'train' section (an edited or damaged config); restore it or use "
                                "another --out")
        current = check_same_config(self.out, saved, self.cfg, "run")
        write_json(path, {"train": current, "model": model_config(self.cfg, self.ds.n_items).to_dict(),
                          "data": self.ds.stats()})
        record(self.out, path)
        Catalogue(self.ds.item_raw_ids, self.ds.titles).save(self.out / CATALOGUE_FILE)
        record(self.out, self.out / CATALOGUE_FILE)

    def _save_last(self) -> None:
        rng = {"torch": torch.get_rng_state(), "mask": self.mask_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_training_state(self.out / LAST_CHECKPOINT, self.model.state_dict(), self.optimizer, rng,
                            self.state.__dict__)

    def _resume(self) -> bool:
        restored = load_training_state(self.out / LAST_CHECKPOINT, self.optimizer)
        if restored is None:
            return False
        weights, rng, state = restored
        self.state = restore_state(TrainState, state, self.out / LAST_CHECKPOINT)
        with restoring(self.out / LAST_CHECKPOINT):
            self.model.load_state_dict(weights)
            torch.set_rng_state(rng["torch"])
            self.mask_rng.set_state(rng["mask"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        return True

    # -- loop ----------------------------------------------------------------------------------
    def _validate(self, bar: tqdm | None) -> bool:
        """Validate, keep the best model; returns True when early stopping triggers."""
        metrics = evaluate(self.model, *self.val, self.cfg.max_len, self.cfg.eval_batch_size)
        value = metrics[self.cfg.metric]
        st = self.state
        st.history.append({"step": st.step, "epoch": st.epoch, **metrics})
        if value > st.best:
            st.best, st.best_step, st.bad_evals = value, st.step, 0
            save_tensors(self.out / RETRIEVER_MODEL, self.model.state_dict(), {"step": st.step})
            record(self.out, self.out / RETRIEVER_MODEL)
        else:
            st.bad_evals += 1
        if bar is not None:
            bar.set_postfix_str(f"epoch {st.epoch} val {self.cfg.metric} {value:.4f} best {st.best:.4f}")
        return st.bad_evals >= self.cfg.patience

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_config()
        resumed = self._resume()
        st, cfg = self.state, self.cfg
        n = len(self.windows)
        n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
        bar = tqdm(total=cfg.max_epochs * n_batches, initial=st.epoch * n_batches + st.batch,
                   desc=f"{cfg.model} on {cfg.dataset}" + (" (resumed)" if resumed else ""),
                   disable=not self.progress, dynamic_ncols=True)
        stop = st.finished or st.bad_evals >= cfg.patience  # killed right after the stopping validation
        if not stop:
            st.device = str(self.device)
        started, loss_ema = time.perf_counter() - st.seconds, None
        self.model.train()
        while not stop and st.epoch < cfg.max_epochs:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + st.epoch))
            while st.batch < n_batches and not stop:
                idx = order[st.batch * cfg.batch_size:(st.batch + 1) * cfg.batch_size]
                inputs, labels = self.model.training_batch(self.windows[idx], self.mask_rng)
                inputs, labels = inputs.to(self.device), labels.to(self.device)
                loss = self.model.loss(inputs, labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                st.batch += 1
                st.step += 1
                loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
                bar.update(1)
                if st.step % 10 == 0:
                    bar.set_description(f"{cfg.model} on {cfg.dataset} loss {loss_ema:.3f}")
                if st.step % cfg.eval_every == 0:
                    stop = self._validate(bar)
                    st.seconds = time.perf_counter() - started
                    self._save_last()
            if st.batch >= n_batches:
                st.epoch, st.batch = st.epoch + 1, 0
        bar.close()
        if st.best_step == 0 and not st.history:
            self._validate(None)  # too short a run to reach eval_every: validate once at the end
        st.finished = True
        st.seconds = time.perf_counter() - started
        self._save_last()
        return self._final_metrics()

    def _final_metrics(self) -> dict:
        self.model.load_state_dict(load_tensors(self.out / RETRIEVER_MODEL)[0])
        val = evaluate(self.model, *self.val, self.cfg.max_len, self.cfg.eval_batch_size)
        test = evaluate(self.model, *eval_examples(self.ds, "test"), self.cfg.max_len,
                        self.cfg.eval_batch_size)
        st = self.state
        n_batches = (len(self.windows) + self.cfg.batch_size - 1) // self.cfg.batch_size
        metrics = {"val": val, "test": test, "best_step": st.best_step, "steps": st.step,
                   "epochs": round(st.step / n_batches, 2), "train_seconds": round(st.seconds, 1),
                   "device": st.device, "history": st.history}
        write_json(self.out / RETRIEVER_METRICS, metrics)
        record(self.out, self.out / RETRIEVER_METRICS)
        return metrics


def train_retriever(cfg: RetrievalConfig, out: Path, progress: bool = True, device: str = "auto") -> dict:
    """Train (or resume, or just re-read) the run in ``out`` on ``device`` and return its metrics."""
    return Trainer(cfg, out, progress, device).run()
