"""``report.md`` and plots for a run of ``llamarec run``: paper-style tables (retriever vs
LlamaRec, overall and valid subset), training curves, metrics, and how far the ranker moved
the true item."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamarec.configs import read_json_file
from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_text
from llamarec.layout import (
    EVAL_DIR,
    EVAL_RANKS,
    PIPELINE_METRICS,
    RANKER_DIR,
    REPORT_FILE,
    RETRIEVER_CONFIG,
    RETRIEVER_DIR,
)
from llamarec.manifest import verify

METRICS = ("MRR@1", "NDCG@5", "NDCG@10", "Recall@5", "Recall@10", "MRR@10")
METHODS = {"retriever": "Retriever", "ranker": "LlamaRec (ranker)", "fusion": "LlamaRec + fusion"}


def _table(view: dict[str, dict[str, float]]) -> str:
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for key, name in METHODS.items():
        if key in view:
            lines.append(f"| {name} | " + " | ".join(f"{view[key][m]:.4f}" for m in METRICS) + " |")
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plots(run_dir: Path, metrics: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    names = []
    # Training curves.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    hist = pd.DataFrame(metrics["retriever"]["history"])
    for m in ("Recall@10", "NDCG@10"):
        ax1.plot(hist["step"], hist[m], label=m)
    ax1.axvline(metrics["retriever"]["best_step"], ls="--", c="grey", lw=0.8)
    ax1.set(title="Retriever: validation (all items)", xlabel="iteration")
    ax1.legend()
    if "history" in metrics["ranker_training"]:  # a title_similarity ranker is not trained
        rhist = pd.DataFrame(metrics["ranker_training"]["history"])
        for m in ("NDCG@10", "Recall@5"):
            ax2.plot(rhist["step"], rhist[m], marker="o", label=m)
        ax2.set(title="Ranker: validation (valid subset, 20 candidates)", xlabel="optimizer step")
        ax2.legend()
    else:
        ax2.set_axis_off()
    _save(fig, plots / "training_curves.png")
    names.append("training_curves.png")
    # Retriever vs ranker.
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, view in zip(axes, ("overall", "valid_subset")):
        data = metrics["ranker"]["test"][view]
        frame = pd.DataFrame({METHODS[k]: [data[k][m] for m in METRICS] for k in METHODS if k in data},
                             index=list(METRICS))
        frame.plot.bar(ax=ax, rot=30)
        ax.set(title=f"Test, {view.replace('_', ' ')}")
    _save(fig, plots / "metrics.png")
    names.append("metrics.png")
    # How far the ranker moved the true item.
    ranks_path = run_dir / RANKER_DIR / EVAL_DIR / EVAL_RANKS
    verify(ranks_path.parent, EVAL_RANKS)
    if ranks_path.is_file():
        try:
            ranks = pd.read_csv(ranks_path)
            test = ranks[ranks["split"] == "test"]
            moved = (test["retriever_rank"] - test["ranker_rank"]).astype(float)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LlamarecError(f"{ranks_path}: not the per-user ranks of an evaluation "
                                f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(moved, bins=range(-20, 21), color="tab:blue", edgecolor="white")
        ax.set(title="Test: positions the ranker moved the true item up (+) or down (-)",
               xlabel="retriever rank - ranker rank", ylabel="users")
        _save(fig, plots / "rank_shift.png")
        names.append("rank_shift.png")
    return names


def _comparisons(test: dict) -> list[str]:
    """The paired differences to the retriever with their 95 % bootstrap intervals."""
    if "comparisons" not in test:  # evaluated before evaluation reported them
        return []
    lines = ["## Test, difference to the retriever (95 % bootstrap interval over users)", "",
             "| | view | NDCG@10 | Recall@10 | MRR@10 |", "|---|---|---|---|---|"]
    for name, label in (("ranker_vs_retriever", "ranker - retriever"), ("fusion_vs_retriever", "fusion - retriever")):
        for view in ("valid_subset", "overall"):
            cells = [f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
                     for c in (test["comparisons"][name][view][m] for m in ("NDCG@10", "Recall@10", "MRR@10"))]
            lines.append(f"| {label} | {view.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(run_dir: Path) -> Path:
    """(Re)generate ``report.md`` and ``plots/`` from the run's saved metrics."""
    path = run_dir / PIPELINE_METRICS
    if (run_dir / RETRIEVER_CONFIG).is_file() and not (run_dir / RETRIEVER_DIR).is_dir():
        raise LlamarecError(f"{run_dir}: a retriever run; `llamarec report` reports runs of `llamarec run` "
                            "(retriever, ranker and their evaluation)")
    verify(run_dir, PIPELINE_METRICS)
    if not path.is_file():
        raise LlamarecError(f"{run_dir}: no {PIPELINE_METRICS}; the run has not been evaluated yet")
    metrics = read_json_file(path)
    config_path = run_dir / RETRIEVER_DIR / RETRIEVER_CONFIG
    if not config_path.is_file():
        raise LlamarecError(f"{run_dir / RETRIEVER_DIR}: not a retriever run ({RETRIEVER_CONFIG} missing)")
    verify(config_path.parent, RETRIEVER_CONFIG)
    retr_cfg = read_json_file(config_path).get("train")
    if not isinstance(retr_cfg, dict) or not isinstance(retr_cfg.get("model"), str):
        raise LlamarecError(f"{config_path}: no train.model (an edited or damaged config)")
    try:
        lines = _lines(metrics, retr_cfg)  # first, so that damaged metrics replace no plot
        lines += [*(f"![{name}](plots/{name})" for name in _plots(run_dir, metrics)), ""]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise LlamarecError(f"{path}: incomplete or damaged metrics ({what[:160]}); rerun the evaluation "
                            "(`llamarec run --force evaluate`)") from None
    out = run_dir / REPORT_FILE
    write_text(out, "\n".join(lines))
    return out


def _ranker_sentence(rt: dict) -> str:
    if rt.get("kind") == "title_similarity":
        return (f"title similarity: {rt['model']}'s vectors of {rt['items']:,} titles ({rt['train_seconds']:.0f} s), "
                f"each candidate scored against the user's last {rt['max_history']} items.")
    return (f"LoRA fine-tuning, {rt['steps']} steps on {rt['examples']} examples "
            f"({rt['train_seconds']:.0f} s), best validation NDCG@10 {rt['best_val_NDCG@10']:.4f} at step "
            f"{rt['best_step']} (zero-shot {rt['history'][0]['NDCG@10']:.4f}).")


def _lines(metrics: dict, retr_cfg: dict) -> list[str]:
    """The report's text up to its plots."""
    data, ranker = metrics["data"], metrics["ranker"]
    test = ranker["test"]
    rt = metrics["ranker_training"]
    return [
        f"# llamarec run: {data['dataset']}",
        "",
        f"{data['users']:,} users, {data['items']:,} items, {data['interactions']:,} interactions "
        f"(mean sequence length {data['mean_seq_len']}). Leave-one-out; metrics are means over users.",
        "",
        f"Retriever: {retr_cfg['model']}, best at iteration {metrics['retriever']['best_step']} of "
        f"{metrics['retriever']['steps']} ({metrics['retriever']['train_seconds']:.0f} s). "
        f"Ranker: {_ranker_sentence(rt)} Candidate order at test time: "
        f"{ranker['order']}; fusion weight {ranker['fusion']['weight']} "
        f"({ranker['fusion'].get('chosen_by', 'validation NDCG@10')}).",
        "",
        f"## Test, overall ({test['users']} users)",
        "",
        "The ranker's metrics on the valid subset combined with the retriever's on the other users, "
        "weighted by their sizes (the paper's view).",
        "",
        _table(test["overall"]),
        "",
        f"## Test, valid subset ({test['valid_subset_users']} users whose true item is among the candidates"
        + (f"; measured on {test['evaluated_users']} of them" if test["evaluated_users"] < test["valid_subset_users"]
           else "") + ")",
        "",
        _table(test["valid_subset"]),
        "",
        *_comparisons(test),
        "## Plots",
        "",
    ]
