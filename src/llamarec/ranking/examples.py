"""Ranking examples: a history, 20 candidate items and which of them is the true next item.

Training examples are built two ways: the paper's (every training prefix, the next item plus
19 random items the user has not seen, shuffled) or with hard negatives (the retriever's
top-20 for that prefix: the distribution the ranker meets at test time). Hard examples in the
retriever's order are, as at evaluation, only prefixes whose target is among the candidates;
shuffled ones insert a missing target in place of the last candidate. Evaluation examples are
the retriever's candidates, in its order, for the users whose target is among them (the
paper's valid subset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from llamarec.candidates import Candidates
from llamarec.data.dataset import Dataset
from llamarec.data.split import among_last_prefixes, history_and_target, training_prefixes
from llamarec.errors import LlamarecError

TrainOrder = Literal["retriever", "shuffled", "shuffled_hits", "mix"]


@dataclass(frozen=True)
class RankExample:
    user: int
    history: tuple[int, ...]  # item ids, oldest first (already cut to the prompt's length)
    candidates: tuple[int, ...]  # item ids in prompt order (A, B, ...)
    target: int  # index of the true item in ``candidates``
    retriever_scores: tuple[float, ...] = ()  # aligned with ``candidates`` when known


def _shuffled(items: np.ndarray, target_item: int, rng: np.random.Generator) -> tuple[tuple[int, ...], int]:
    order = rng.permutation(len(items))
    shuffled = items[order]
    return tuple(int(i) for i in shuffled), int(np.flatnonzero(shuffled == target_item)[0])


def paper_examples(ds: Dataset, n_examples: int, *, n_candidates: int = 20, max_history: int = 20,
                   seed: int = 0, recent_prefixes: int | None = None) -> list[RankExample]:
    """Random prefixes (of each user's last ``recent_prefixes`` if given); candidates = next
    item + random items outside the history, shuffled. Prefixes whose history leaves fewer than
    ``n_candidates - 1`` unseen items are skipped."""
    if ds.n_items < n_candidates:
        raise LlamarecError(f"{ds.name}: {ds.n_items} items, fewer than {n_candidates} candidates")
    rng = np.random.default_rng(seed)
    pairs = training_prefixes(ds.sequences)
    pairs = pairs[among_last_prefixes(ds.sequences, pairs[:, 0], pairs[:, 1], recent_prefixes)]
    pairs = pairs[rng.choice(len(pairs), min(n_examples, len(pairs)), replace=False)]
    examples = []
    for user, pos in pairs:
        seq = ds.sequences[user]
        target = int(seq[pos])
        seen = set(seq[:pos].tolist()) | {target}
        if ds.n_items - len(seen) < n_candidates - 1:
            continue  # too few unseen items for a full pool (sampling would never end)
        negatives: list[int] = []
        while len(negatives) < n_candidates - 1:
            for item in rng.integers(1, ds.n_items + 1, size=2 * n_candidates).tolist():
                if item not in seen and len(negatives) < n_candidates - 1:
                    seen.add(item)
                    negatives.append(item)
        cands, idx = _shuffled(np.array([target, *negatives]), target, rng)
        examples.append(RankExample(int(user), tuple(seq[:pos][-max_history:].tolist()), cands, idx))
    return examples


def hard_negative_examples(ds: Dataset, train: dict[str, np.ndarray], *, max_history: int = 20,
                           seed: int = 0, n_examples: int | None = None,
                           order: TrainOrder = "shuffled", recent_prefixes: int | None = None) -> list[RankExample]:
    """Retriever top-k of training prefixes (from ``load_train_candidates``) with their scores;
    with ``recent_prefixes``, only each user's last that many
    prefixes (see :func:`~llamarec.data.split.among_last_prefixes`).

    ``shuffled``: every prefix, a missing target put in place of the last candidate (with that
    candidate's score), candidates shuffled. ``retriever``: only prefixes whose target is among
    the candidates, in the retriever's order. ``shuffled_hits``: those same prefixes, shuffled
    (an inserted target is the one candidate the retriever did not pick, a cue that evaluation
    never shows). ``mix``: each example ``shuffled`` or ``retriever``, at random.
    """
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(train["users"]))
    rows = rows[among_last_prefixes(ds.sequences, train["users"], train["positions"], recent_prefixes)[rows]]
    examples = []
    for row in rows:
        user, pos, target = int(train["users"][row]), int(train["positions"][row]), int(train["targets"][row])
        items, scores = train["items"][row].copy(), train["scores"][row]
        shuffle = order in ("shuffled", "shuffled_hits") or (order == "mix" and rng.random() < 0.5)
        if target not in items:
            if not shuffle or order == "shuffled_hits":
                continue
            items[-1] = target
        perm = rng.permutation(len(items)) if shuffle else np.arange(len(items))
        history = ds.sequences[user][:pos][-max_history:]
        examples.append(RankExample(user, tuple(history.tolist()), tuple(int(i) for i in items[perm]),
                                    int(np.flatnonzero(items[perm] == target)[0]),
                                    tuple(float(x) for x in scores[perm])))
        if n_examples is not None and len(examples) >= n_examples:
            break
    return examples


def evaluation_examples(ds: Dataset, cands: Candidates, split: Literal["val", "test"], *,
                        max_history: int = 20, limit: int | None = None) -> list[RankExample]:
    """One example per valid-subset user, candidates in the retriever's order (the ranker may
    show them in another order, see :meth:`~llamarec.ranking.ranker.Ranker.score`)."""
    examples = []
    for user in np.flatnonzero(cands.valid()):
        history, target = history_and_target(ds.sequences[user], split)
        items = cands.items[user]
        examples.append(RankExample(int(user), tuple(history[-max_history:].tolist()),
                                    tuple(int(i) for i in items), int(np.flatnonzero(items == target)[0]),
                                    tuple(float(s) for s in cands.scores[user])))
        if limit is not None and len(examples) >= limit:
            break
    return examples
