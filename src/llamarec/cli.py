"""The ``llamarec`` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llamarec.configs import read_config_file, validate
from llamarec.errors import LlamarecError

app = typer.Typer(help="LLM-based two-stage recommendation: retrieve with a sequential model, "
                       "rank with an LLM.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: list them, prepare and cache them.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()

DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name (see `llamarec data list`).")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Directory holding the dataset's raw files (else cache, download, mirror).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="Torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps.")]


def print_mapping(title: str, values: dict, as_json: bool) -> None:
    """Print a flat mapping as a two-column table, or as JSON."""
    if as_json:
        print(json.dumps(values, indent=2))
        return
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


@data_app.command("list")
def data_list() -> None:
    """List the known datasets with their descriptions and licences."""
    from llamarec.data import DATASETS

    table = Table("name", "description", "licence")
    for spec in DATASETS.values():
        table.add_row(spec.name, spec.description, spec.license)
    console.print(table)


TIES_HELP = ("Order of a user's interactions with the same time: item (by item id) or random (a fixed "
             "pseudo-random order, so the id order cannot leak into the test item).")


@data_app.command("prepare")
def data_prepare(
    dataset: DatasetOpt,
    data_dir: DataDirOpt = None,
    min_uc: Annotated[int, typer.Option(help="Minimum interactions per user (iterative k-core).")] = 5,
    min_sc: Annotated[int, typer.Option(help="Minimum interactions per item (iterative k-core).")] = 5,
    ties: Annotated[str, typer.Option(help=TIES_HELP)] = "item",
    as_json: JsonOpt = False,
) -> None:
    """Prepare a dataset (titles, k-core, chronological order), cache it and print its statistics."""
    from llamarec.data import load_dataset

    ds = load_dataset(dataset, data_dir, min_uc=min_uc, min_sc=min_sc, ties=ties)
    print_mapping(f"{dataset}", ds.stats(), as_json)


retrieve_app = typer.Typer(help="Stage 1: train sequential retrievers and write candidates.",
                           no_args_is_help=True)
app.add_typer(retrieve_app, name="retrieve")


@retrieve_app.command("train")
def retrieve_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name.")] = None,
    data_dir: DataDirOpt = None,
    model: Annotated[str | None, typer.Option(help="lru, sasrec, bert4rec or narm.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file of training options.")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size (64).")] = None,
    n_blocks: Annotated[int | None, typer.Option(help="Number of blocks (2).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout (0.2).")] = None,
    attn_dropout: Annotated[float | None, typer.Option(help="Attention dropout of SASRec and BERT4Rec (0.2).")] = None,
    mask_prob: Annotated[float | None, typer.Option(help="BERT4Rec masking probability (0.2).")] = None,
    max_len: Annotated[int | None, typer.Option(help="Max sequence length (200 ML, 50 Amazon).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (16 ML, 64 Amazon).")] = None,
    window_step: Annotated[int | None, typer.Option(help="Sliding-window stride (max_len).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (0.01).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Maximum epochs (500).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Iterations between validations (500).")] = None,
    patience: Annotated[int | None, typer.Option(help="Validations without improvement (20).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (42).")] = None,
    ties: Annotated[str | None, typer.Option(help=TIES_HELP + " (item).")] = None,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train a retriever (resuming an interrupted run in OUT) and write OUT/metrics.json."""
    from llamarec.retrieval.config import RetrievalConfig
    from llamarec.retrieval.train import train_retriever

    values = read_config_file(config) if config else {}
    given = {k: v for k, v in dict(
        dataset=dataset, data_dir=data_dir, model=model, hidden=hidden, n_blocks=n_blocks,
        dropout=dropout, attn_dropout=attn_dropout, mask_prob=mask_prob, max_len=max_len, batch_size=batch_size,
        window_step=window_step, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs,
        eval_every=eval_every, patience=patience, seed=seed, ties=ties).items() if v is not None}
    values.update(given)
    if "dataset" not in values:
        raise LlamarecError("retrieve train: --dataset is required (or `dataset:` in --config)")
    cfg = validate(RetrievalConfig, values, str(config or "options"))
    metrics = train_retriever(cfg, out, device=device)
    if as_json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
        return
    table = Table("split", *metrics["test"], title=f"{cfg.model} on {cfg.dataset}: best of {metrics['steps']} "
                  f"iterations at {metrics['best_step']} ({metrics['train_seconds']:.0f} s)")
    for split in ("val", "test"):
        table.add_row(split, *(f"{v:.4f}" for v in metrics[split].values()))
    console.print(table)


@retrieve_app.command("candidates")
def retrieve_candidates(
    run: Annotated[Path, typer.Option("--run", help="Retriever run directory.")],
    k: Annotated[int, typer.Option("--k", help="Candidates per user.")] = 20,
    train_prefixes: Annotated[int, typer.Option(
        help="Also score this many random training prefixes (hard negatives for the ranker).")] = 0,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Write RUN/candidates.safetensors (top-k items and scores per user) and candidates.json."""
    from llamarec.retrieval.candidates import generate_candidates

    summary = generate_candidates(run, k=k, train_prefixes=train_prefixes, device=device)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    rows = {f"{split} valid subset": f"{summary[split]['valid_subset']} / {summary[split]['users']}"
            for split in ("val", "test")}
    rows.update({f"test {m}": round(v, 4) for m, v in summary["test"]["metrics"].items()
                 if m.endswith(("@10", "@20"))})
    print_mapping(f"top-{k} candidates", rows, False)


rank_app = typer.Typer(help="Stage 2: fine-tune and evaluate the LLM ranker.", no_args_is_help=True)
app.add_typer(rank_app, name="rank")


@rank_app.command("train")
def rank_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Ranker run directory to write.")],
    retriever: Annotated[Path | None, typer.Option(help="Retriever run directory (with candidates).")] = None,
    model: Annotated[str | None, typer.Option(help="Hub id or local dir; default SmolLM2-135M-Instruct.")] = None,
    kind: Annotated[str | None, typer.Option(
        help="verbalizer (the LLM scores each prompt's letters; LoRA fine-tuning) or title_similarity (the LLM "
             "embeds every title once; no training, served without the LLM).")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML/JSON file of ranker options.")] = None,
    examples: Annotated[str | None, typer.Option(help="hard (retriever negatives) or paper (random).")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Training examples (1000).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per forward pass (4).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps (1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (1e-4).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Optimizer steps between validations (100).")] = None,
    val_users: Annotated[int | None, typer.Option(help="Validation users per validation (100).")] = None,
    load_in_4bit: Annotated[bool | None, typer.Option(help="QLoRA: 4-bit NF4 base model (CUDA).")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune the ranker with LoRA (resuming an interrupted run in OUT), or build a
    title_similarity ranker's title vectors (--kind title_similarity)."""
    from llamarec.ranking.config import RankConfig
    from llamarec.ranking.finetune import finetune_ranker

    values = read_config_file(config) if config else {}
    values.update({k: v for k, v in dict(
        retriever=retriever, model=model, kind=kind, examples=examples, max_examples=max_examples,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, eval_every=eval_every, val_users=val_users,
        load_in_4bit=load_in_4bit, dtype=dtype, device=device).items() if v is not None})
    if "retriever" not in values:
        raise LlamarecError("rank train: --retriever is required (or `retriever:` in --config)")
    cfg = validate(RankConfig, values, str(config or "options"))
    metrics = finetune_ranker(cfg, out)
    if cfg.kind == "title_similarity":
        summary = {"title vectors": metrics["items"], "dimensions": metrics["dim"], "seconds": metrics["train_seconds"]}
        print_mapping("title similarity ranker", summary, as_json)
        return
    summary = {"best val NDCG@10": round(metrics["best_val_NDCG@10"], 4),
               "zero-shot val NDCG@10": round(metrics["history"][0]["NDCG@10"], 4),
               "best step": metrics["best_step"], "steps": metrics["steps"], "seconds": metrics["train_seconds"]}
    print_mapping("ranker fine-tuning", summary, as_json)


@rank_app.command("evaluate")
def rank_evaluate(
    ranker: Annotated[Path, typer.Option("--ranker", help="Ranker run directory.")],
    zero_shot: Annotated[bool, typer.Option("--zero-shot", help="Base model, no adapter.")] = False,
    order: Annotated[str, typer.Option(
        help="Candidate order: retriever (paper), shuffled, or average over permutations.")] = "retriever",
    permutations: Annotated[int, typer.Option(help="Orders averaged with --order average.")] = 3,
    limit: Annotated[int | None, typer.Option(help="Evaluate at most this many valid users per split.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default inside RANKER).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Override the run's dtype: float32, bfloat16, ...")] = None,
    calibrate: Annotated[bool, typer.Option(
        "--calibrate", help="Subtract the letter prior estimated on shuffled validation prompts.")] = False,
    engine: Annotated[str, typer.Option(
        help="Where the ranker scores the users: local (this process) or ray (Ray actors, each loading "
             "the ranker from RANKER; pip install -e \".\\[ray]\"). Same results.")] = "local",
    workers: Annotated[int, typer.Option(help="Ray actors, one ranker each (--engine ray).")] = 1,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster to join: auto or HOST:PORT (or RAY_ADDRESS); default: a local one of --workers CPUs.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate ranker vs retriever (valid subset and overall, with fusion, paired differences
    with 95 % bootstrap intervals) and write metrics.json. With --engine ray the ranker's scores
    are spread over --workers Ray actors; fusion and metrics are computed here."""
    from llamarec.ranking.evaluate import evaluate_ranker

    if order not in ("retriever", "shuffled", "average"):
        raise LlamarecError(f"--order {order!r}: expected retriever, shuffled or average")
    results = evaluate_ranker(ranker, zero_shot=zero_shot, order=order, permutations=permutations,
                              limit=limit, out=out, dtype=dtype, calibrate=calibrate, engine=engine,
                              workers=workers, address=address)
    if as_json:
        print(json.dumps(results, indent=2))
        return
    table = Table("view", "method", "NDCG@5", "NDCG@10", "Recall@5", "Recall@10", "MRR@10",
                  title=f"test ({results['test']['valid_subset_users']} valid of {results['test']['users']} users)")
    for view in ("valid_subset", "overall"):
        for method, m in results["test"][view].items():
            table.add_row(view, method, *(f"{m[k]:.4f}" for k in
                                          ("NDCG@5", "NDCG@10", "Recall@5", "Recall@10", "MRR@10")))
    console.print(table)
    for name, views in results["test"]["comparisons"].items():
        c = views["valid_subset"]["NDCG@10"]
        console.print(f"{name} (valid subset NDCG@10): {c['diff']:+.4f} "
                      f"[95% CI {c['ci_low']:+.4f}, {c['ci_high']:+.4f}]")
    console.print(f"fusion weight ({results['fusion']['chosen_by']}): {results['fusion']['weight']}")


@app.command("run")
def run(
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset (default: the preset's).")] = None,
    data_dir: DataDirOpt = None,
    config: Annotated[Path | None, typer.Option(help="Config file (a copy of a preset).")] = None,
    preset: Annotated[str | None, typer.Option(help="Built-in preset: default, cpu-quality, paper-ml, "
                                                     "paper-beauty, paper-games.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")] = Path("runs/default"),
    force: Annotated[list[str] | None, typer.Option(help="Redo this stage (and those after it); repeatable: "
                                                         "data, retriever, candidates, ranker, evaluate, "
                                                         "report.")] = None,
) -> None:
    """Everything: prepare data, train the retriever, write candidates, fine-tune the ranker,
    evaluate both and write report.md. A rerun skips finished stages and resumes an interrupted one."""
    from llamarec.runner import load_pipeline_config, preset_path, run_pipeline

    if config is not None and preset is not None:
        raise LlamarecError("give --config or --preset, not both")
    path = config or (preset_path(preset) if preset else None)
    cfg = load_pipeline_config(path, {"dataset": dataset, "data_dir": data_dir})
    run_pipeline(cfg, out, set(force or []))
    console.print(f"report: {out / 'report.md'}")


@app.command("report")
def report(run: Annotated[Path, typer.Option("--run", help="Run directory of `llamarec run`.")]) -> None:
    """Regenerate report.md and the plots of a run."""
    from llamarec.report import write_report

    console.print(f"wrote {write_report(run)}")


@app.command("recommend")
def recommend(
    run: Annotated[Path, typer.Option("--run", help="Run directory (or a retriever run).")],
    history: Annotated[list[str], typer.Option("--history", help="History items, oldest first: ids or titles; "
                                                                 "repeat the option or give several values.")],
    k: Annotated[int, typer.Option("-k", help="Number of recommendations (at most 20).")] = 10,
    no_ranker: Annotated[bool, typer.Option("--no-ranker", help="Retriever only.")] = False,
    as_json: JsonOpt = False,
    more: Annotated[list[str] | None, typer.Argument(hidden=True, metavar="ITEM")] = None,
) -> None:
    """Recommend items for a new history."""
    from dataclasses import asdict

    from llamarec.pipeline import Recommender

    # Click options take one value each: the values after the first of `--history A B C`
    # arrive as arguments. Their place among repeated --history options is unknown.
    if more:
        if len(history) > 1:
            raise LlamarecError("--history: give the items after one --history, or repeat --history "
                                "before each item, not both")
        history = [*history, *more]
    rec = Recommender.load(run, with_ranker=not no_ranker)
    result = rec.recommend(history, k=k)
    if as_json:
        print(json.dumps(asdict(result), indent=2))
        return
    table = Table("#", "item id", "title", "score", "retriever", "ranker",
                  title=f"retrieval {result.retrieval_ms:.0f} ms, ranking {result.ranking_ms:.0f} ms")
    for i, r in enumerate(result.items, 1):
        table.add_row(str(i), r.item_id, r.title, f"{r.score:.3f}", f"{r.retriever_score:.3f}",
                      "" if r.ranker_score is None else f"{r.ranker_score:.3f}")
    console.print(table)


@app.command("serve")
def serve(
    run: Annotated[Path, typer.Option("--run", help="Run directory (or a retriever run).")],
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="LLAMAREC_API_KEY", help="Require 'Authorization: "
                                                "Bearer KEY' (or set LLAMAREC_API_KEY).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most histories ranked in one forward (1: no batching).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest wait for a batch to fill.")] = 5.0,
    device: DeviceOpt = "auto",
    dtype: Annotated[str | None, typer.Option(help="The models' dtype: float32, bfloat16, or auto (bfloat16 on a "
                                              "GPU or CPU with bf16 instructions, else float32); "
                                              "default: the run's own.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Torch threads (default: OMP_NUM_THREADS, else the "
                                                "physical cores this process may use).")] = None,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="MiB for the ranker's key/value caches of recent "
                                                   "histories' prompt prefixes (LRU), so a repeated history "
                                                   "runs only its candidates; 0: off.")] = 256,
) -> None:
    """Serve a run over HTTP: JSON API with micro-batching, docs at /docs, demo page at /
    (needs the optional serve extra)."""
    try:
        import uvicorn

        from llamarec.serve import create_app
    except ImportError as exc:
        raise LlamarecError(f"llamarec serve needs the serve extra (pip install -e \".[serve]\"): {exc}") from None
    import logging

    from llamarec.devices import resolve_device, set_threads
    from llamarec.pipeline import Recommender

    access = logging.getLogger("llamarec.serve.access")
    access.addHandler(logging.StreamHandler(sys.stdout))
    access.setLevel(logging.INFO)
    access.propagate = False
    set_threads(threads)
    rec = Recommender.load(run, device=str(resolve_device(device)), dtype=dtype, prefix_cache_mb=prefix_cache_mb)
    uvicorn.run(create_app(rec, api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms),
                host=host, port=port, access_log=False, log_level="info")


@app.command("score")
def score(
    run: Annotated[Path, typer.Option("--run", help="Run directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: part-*.parquet, manifest.json, errors.jsonl.")],
    histories: Annotated[Path | None, typer.Option(help="Parquet or JSONL file with columns user_id and history "
                                                        "(default: every user of the run's dataset).")] = None,
    k: Annotated[int, typer.Option("-k", help="Recommendations per user.")] = 10,
    engine: Annotated[str, typer.Option(help="local, or ray (pip install -e \".\\[ray]\").")] = "local",
    workers: Annotated[int, typer.Option(help="Ray actors, one model each.")] = 1,
    batch_size: Annotated[int | None, typer.Option(help="Histories per ranker forward pass (the run's).")] = None,
    shards: Annotated[int | None, typer.Option(help="Output shards (one per 5,000 users).")] = None,
    device: DeviceOpt = "auto",
    address: Annotated[str | None, typer.Option(help="Ray cluster to join: auto or HOST:PORT.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Start over when OUT holds another job.")] = False,
) -> None:
    """Recommendations for many users as parquet shards; a rerun resumes an interrupted job."""
    from llamarec.score import score, summary

    print(summary(score(run, histories, out, k=k, engine=engine, workers=workers, batch_size=batch_size,
                        shards=shards, device=device, address=address, force=force), out))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1
    (set LLAMAREC_DEBUG=1 for the traceback)."""
    try:
        app()
    except (LlamarecError, OSError) as exc:
        # OSError: a file that cannot be read or written (permissions, a full disk) that no
        # atomic write turned into a LlamarecError naming it.
        if os.environ.get("LLAMAREC_DEBUG"):
            raise
        message = str(exc) if isinstance(exc, LlamarecError) else \
            f"{str(exc.filename) + ': ' if exc.filename else ''}{exc.strerror or exc}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
