"""Batch scoring: recommendations for every user of a run's dataset, or of a file of histories.

``score(run_dir, histories, out)`` writes parquet shards ``OUT/part-00000.parquet ...`` (one
row per user and rank), ``OUT/manifest.json`` and ``OUT/errors.jsonl``; without ``out`` it
returns the table. Scores come from :class:`~llamarec.pipeline.Recommender`'s ``retrieve`` and
``rerank``, the path of ``recommend`` and of the server.

The work is planned before any engine runs: users are split into shards (contiguous ranges of
the input), and each shard's users are sorted by the length of their prompt and cut into
batches of ``batch_size``, so the ranker pads little. Both engines score exactly these batches
with :func:`score_batch`, hence give identical tables: ``local`` in this process, ``ray`` on a
Ray Data actor pool (:mod:`llamarec.score_ray`). Each finished shard is written atomically with
its sha256 in the manifest; a rerun verifies the shards and computes only those missing or
damaged, so a killed job resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llamarec.errors import LlamarecError
from llamarec.io import atomic_path, write_json, write_text
from llamarec.layout import (
    ADAPTER_DIR,
    CANDIDATES_SUMMARY,
    CATALOGUE_FILE,
    PIPELINE_METRICS,
    PROMPT_FILE,
    RANK_CONFIG,
    RANKER_DIR,
    RETRIEVER_CONFIG,
    RETRIEVER_DIR,
    RETRIEVER_MODEL,
    TITLE_VECTORS_FILE,
)

logger = logging.getLogger(__name__)

MANIFEST, ERRORS_FILE, ERRORS_DIR = "manifest.json", "errors.jsonl", "errors"
FORMAT = 1
SHARD_USERS = 5000  # users per shard when --shards is not given
ENGINES = ("local", "ray")
SCHEMA = pa.schema([("user_id", pa.string()), ("rank", pa.int32()), ("item_id", pa.string()),
                    ("title", pa.string()), ("score", pa.float64()), ("retriever_score", pa.float64()),
                    ("ranker_score", pa.float64())])
COLUMNS = SCHEMA.names


@dataclass
class Shard:
    index: int
    user_ids: list[str]
    histories: list[list]
    batches: list[list[int]] = field(default_factory=list)  # positions in the shard, by prompt length

    @property
    def file(self) -> str:
        return f"part-{self.index:05d}.parquet"


# --------------------------------------------------------------------------- input
def read_histories(run_dir: Path, histories) -> tuple[list[str], list[list], str]:
    """User ids, histories (lists, oldest first) and a description of where they came from."""
    if histories is None:
        from llamarec.data import load_run_dataset
        from llamarec.pipeline import _catalogue

        retriever_dir = _retriever_dir(run_dir)
        ds, raw = load_run_dataset(retriever_dir), _catalogue(retriever_dir).raw_ids
        return list(ds.user_raw_ids), [[raw[i] for i in seq] for seq in ds.sequences], f"dataset {ds.name}"
    if isinstance(histories, (str, Path)):
        return (*_read_file(Path(histories)), str(histories))
    if isinstance(histories, pd.DataFrame):
        return (*_from_columns(histories, "histories"), "DataFrame")
    if not isinstance(histories, Sequence):
        raise LlamarecError(f"histories: expected a file, a DataFrame or a list of (user_id, history), "
                            f"not {type(histories).__name__}")
    users, hists = [], []
    for i, pair in enumerate(histories):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise LlamarecError(f"histories[{i}]: expected a (user_id, history) pair, got {pair!r:.80}")
        users.append(_user_id(pair[0], f"histories[{i}]"))
        hists.append(_history(pair[1], f"histories[{i}]"))
    return _unique(users, "histories"), hists, "list"


def _read_file(path: Path) -> tuple[list[str], list[list]]:
    if not path.is_file():
        raise LlamarecError(f"{path}: no such histories file")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise LlamarecError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())[:200]})") from None
        return _from_columns(frame, str(path), "row")
    if suffix not in (".jsonl", ".ndjson", ".json"):
        raise LlamarecError(f"{path}: histories must be a .parquet or .jsonl file")
    users, hists = [], []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise LlamarecError(f"{path}: line {n}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise LlamarecError(f"{path}: line {n}: expected an object with user_id and history")
            missing = [c for c in ("user_id", "history") if c not in obj]
            if missing:
                raise LlamarecError(f"{path}: line {n}: no column {', '.join(missing)}")
            users.append(_user_id(obj["user_id"], f"{path}: line {n}"))
            hists.append(_history(obj["history"], f"{path}: line {n}"))
    if not users:
        raise LlamarecError(f"{path}: no histories")
    return _unique(users, str(path)), hists


def _from_columns(frame: pd.DataFrame, where: str, unit: str = "row") -> tuple[list[str], list[list]]:
    missing = [c for c in ("user_id", "history") if c not in frame.columns]
    if missing:
        raise LlamarecError(f"{where}: no column {', '.join(missing)} (columns: {', '.join(map(str, frame.columns))})")
    if frame.empty:
        raise LlamarecError(f"{where}: no histories")
    users = [_user_id(u, f"{where}: {unit} {i}") for i, u in enumerate(frame["user_id"].tolist(), 1)]
    hists = [_history(h, f"{where}: {unit} {i}") for i, h in enumerate(frame["history"].tolist(), 1)]
    return _unique(users, where), hists


def _user_id(value, where: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    raise LlamarecError(f"{where}: column user_id must be a non-empty id, got {value!r:.80}")


def _history(value, where: str) -> list:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise LlamarecError(f"{where}: column history must be a list of item ids or titles, "
                            f"got {type(value).__name__} {value!r:.60}")
    return list(value)


def _unique(users: list[str], where: str) -> list[str]:
    if len(set(users)) < len(users):
        seen: set[str] = set()
        dup = next(u for u in users if u in seen or seen.add(u))
        raise LlamarecError(f"{where}: user_id {dup!r} appears more than once")
    return users


# --------------------------------------------------------------------------- planning
def plan(run_dir: Path, user_ids: list[str], histories: list[list], shards: int, batch_size: int) -> list[Shard]:
    """Contiguous shards of the input; each shard's users sorted by (estimated) prompt length,
    longest first, in batches of ``batch_size``."""
    from llamarec.pipeline import _catalogue

    catalogue = _catalogue(_retriever_dir(run_dir))
    title_len = {raw: len(title) for raw, title in zip(catalogue.raw_ids[1:], catalogue.titles[1:])}
    keep = _run_settings(run_dir)["max_history"]
    n, out = len(user_ids), []
    for s in range(shards):
        lo, hi = s * n // shards, (s + 1) * n // shards
        shard = Shard(s, user_ids[lo:hi], histories[lo:hi])
        sizes = [sum(title_len.get(str(e).strip(), len(str(e))) for e in h[-keep:]) for h in shard.histories]
        order = sorted(range(hi - lo), key=lambda i: -sizes[i])
        shard.batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        out.append(shard)
    return out


def _retriever_dir(run_dir: Path) -> Path:
    return run_dir / RETRIEVER_DIR if (run_dir / RETRIEVER_DIR).is_dir() else run_dir


def _run_settings(run_dir: Path) -> dict:
    """The ranker's prompt window, evaluation batch size and number of candidates (as
    ``Recommender.load`` sets it), read without loading a model."""
    from llamarec.configs import read_json_file
    from llamarec.ranking.config import TITLE_SIMILARITY_BATCH, ranker_saved, saved_kind

    ranker = run_dir / RANKER_DIR
    prompt = read_json_file(ranker / PROMPT_FILE) if (ranker / PROMPT_FILE).is_file() else {}
    config = read_json_file(ranker / RANK_CONFIG) if (ranker / RANK_CONFIG).is_file() else {}
    has_ranker = ranker_saved(ranker)
    kind = saved_kind(ranker) if has_ranker else None
    summary = _retriever_dir(run_dir) / CANDIDATES_SUMMARY
    try:
        n_candidates = int(read_json_file(summary)["k"]) if has_ranker and summary.is_file() else 20
        return {"max_history": int(prompt.get("max_history", 20)), "n_candidates": n_candidates,
                "batch_size": int(config.get("eval_batch_size", 8)) if kind == "verbalizer"
                else TITLE_SIMILARITY_BATCH if kind == "title_similarity" else 256}  # 256: the retriever alone
    except (KeyError, TypeError, ValueError) as exc:  # an edited or damaged file of the run
        raise LlamarecError(f"{run_dir}: cannot read the ranker's settings ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:160]}); its prompt.json, rank_config.json or "
                            "candidates.json is damaged") from None


def run_fingerprint(run_dir: Path) -> str:
    """sha256 over the files that decide the scores (weights, catalogue, configs, fusion)."""
    retriever = _retriever_dir(run_dir)
    files = [retriever / f for f in (RETRIEVER_CONFIG, RETRIEVER_MODEL, CATALOGUE_FILE, CANDIDATES_SUMMARY)]
    files += [run_dir / RANKER_DIR / f for f in (RANK_CONFIG, PROMPT_FILE, TITLE_VECTORS_FILE)]
    files += [run_dir / RANKER_DIR / ADAPTER_DIR / f for f in ("adapter_config.json", "adapter_model.safetensors")]
    files.append(run_dir / PIPELINE_METRICS)
    digest = hashlib.sha256()
    for path in files:
        if path.is_file() and path != retriever / PIPELINE_METRICS:
            digest.update(f"{path.relative_to(run_dir)}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- scoring
def score_batch(rec, user_ids: Sequence[str], histories: Sequence[Sequence], k: int) -> pd.DataFrame:
    """``k`` rows per user (``COLUMNS`` plus ``pos``, ``error``) through ``Recommender.retrieve``
    and ``rerank``; a history that does not resolve gets one row with rank 0 and its ``error``."""
    import torch

    dense, rows, errors = [], [], {}
    for pos, history in enumerate(histories):
        try:
            dense.append(rec.resolve_history(history))
            rows.append(pos)
        except LlamarecError as exc:
            errors[pos] = str(exc)
    records = [(pos, user_ids[pos], 0, None, None, math.nan, math.nan, math.nan, msg) for pos, msg in errors.items()]
    if dense:
        items, ret = rec.retrieve(dense)
        llm, final = rec.rerank(dense, items, ret)
        raw, titles = rec.catalogue.raw_ids, rec.catalogue.titles
        for j, pos in enumerate(rows):
            for rank, c in enumerate(torch.argsort(final[j], descending=True, stable=True)[:k].tolist(), 1):
                item = items[j, c]
                records.append((pos, user_ids[pos], rank, raw[item], titles[item], float(final[j, c]),
                                float(ret[j, c]), math.nan if llm is None else float(llm[j, c]), None))
    return pd.DataFrame.from_records(records, columns=["pos", *COLUMNS, "error"])


def assemble(frames: list[pd.DataFrame]) -> tuple[pa.Table, list[dict]]:
    """One shard's table (input order, then rank) and its errors, from its batches' frames."""
    frame = pd.concat(frames, ignore_index=True).sort_values(["pos", "rank"], kind="stable")
    bad = frame["error"].notna()
    errors = [{"user_id": u, "error": e} for u, e in zip(frame.loc[bad, "user_id"], frame.loc[bad, "error"])]
    good = frame.loc[~bad, COLUMNS].reset_index(drop=True)
    # without pandas metadata: the same table whatever dtypes the frames had on the way (ray: arrow strings)
    return pa.Table.from_pandas(good, schema=SCHEMA, preserve_index=False).replace_schema_metadata(None), errors


def load_recommender(run_dir: Path, device: str, batch_size: int):
    from llamarec.pipeline import Recommender

    rec = Recommender.load(run_dir, device=device)
    if rec.ranker is not None:
        rec.ranker.batch_size = batch_size  # one forward pass per planned batch
    return rec


def _local(run_dir: Path, todo: list[Shard], sink, *, k: int, batch_size: int, device: str, **_) -> None:
    rec = load_recommender(run_dir, device, batch_size)
    for shard in todo:
        frames = []
        for batch in shard.batches:
            frame = score_batch(rec, [shard.user_ids[i] for i in batch], [shard.histories[i] for i in batch], k)
            frame["pos"] = np.asarray(batch, dtype=np.int64)[frame["pos"].to_numpy()]
            frames.append(frame)
        sink.put(shard, *assemble(frames))


# --------------------------------------------------------------------------- output
class MemorySink:
    def __init__(self) -> None:
        self.tables: dict[int, pa.Table] = {}
        self.errors: dict[int, list[dict]] = {}

    def put(self, shard: Shard, table: pa.Table, errors: list[dict]) -> None:
        self.tables[shard.index], self.errors[shard.index] = table, errors


class DirSink:
    """Shards, per-shard error files and the manifest in ``out``; the manifest is rewritten
    (atomically) after every shard, so it always names the shards that are complete."""

    def __init__(self, out: Path, manifest: dict) -> None:
        self.out, self.manifest = out, manifest

    def put(self, shard: Shard, table: pa.Table, errors: list[dict]) -> None:
        entry = self.manifest["shards"][shard.index]
        with atomic_path(self.out / shard.file) as tmp:
            pq.write_table(table, tmp)
        entry.update(rows=table.num_rows, sha256=_sha256(self.out / shard.file), errors=len(errors),
                     errors_file=None, errors_sha256=None)
        if errors:
            path = self.out / ERRORS_DIR / shard.file.replace(".parquet", ".jsonl")
            write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
            entry.update(errors_file=str(path.relative_to(self.out)), errors_sha256=_sha256(path))
        write_json(self.out / MANIFEST, self.manifest)
        logger.info("shard %d: %d users, %d rows, %d errors", shard.index, len(shard.user_ids), table.num_rows,
                    len(errors))

    def finished(self, index: int) -> bool:
        entry = self.manifest["shards"][index]
        files = [(entry.get("file"), entry.get("sha256")), (entry.get("errors_file"), entry.get("errors_sha256"))]
        if entry.get("sha256") is None:
            return False
        return all(name is None or ((self.out / name).is_file() and _sha256(self.out / name) == digest)
                   for name, digest in files)

    def finish(self) -> dict:
        lines = []
        for entry in self.manifest["shards"]:
            if entry["errors_file"]:
                lines.append((self.out / entry["errors_file"]).read_text(encoding="utf-8"))
        write_text(self.out / ERRORS_FILE, "".join(lines))
        self.manifest.update(complete=True, errors={"file": ERRORS_FILE, "count": sum(e["errors"] for e in
                                                                                      self.manifest["shards"])})
        write_json(self.out / MANIFEST, self.manifest)
        return self.manifest


def _open_out(out: Path, manifest: dict, force: bool) -> DirSink:
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise LlamarecError(f"{out}: exists and is not a directory")
    if force:
        for old in [path, out / ERRORS_FILE, *out.glob("part-*.parquet"), *out.glob(f"{ERRORS_DIR}/part-*.jsonl")]:
            old.unlink(missing_ok=True)
    elif path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            before = old["options"]
        except (ValueError, KeyError, TypeError):
            raise LlamarecError(f"{path}: not a score manifest; use --force to start over") from None
        if before != manifest["options"]:
            diff = ", ".join(f"{key} {before.get(key)!r} -> {value!r}" for key, value in manifest["options"].items()
                             if before.get(key) != value)
            raise LlamarecError(f"{out}: written with other options ({diff}); use --force to start over")
        for entry, was in zip(manifest["shards"], old.get("shards", [])):
            entry.update({key: was.get(key) for key in ("rows", "sha256", "errors", "errors_file", "errors_sha256")})
    elif out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise LlamarecError(f"{out}: not empty and no {MANIFEST}; give an empty or new --out")
    sink = DirSink(out, manifest)
    write_json(path, manifest)
    return sink


def summary(manifest: dict, out: str | Path) -> str:
    shards = manifest["shards"]
    return (f"{sum(s['users'] for s in shards)} users, {sum(s['rows'] for s in shards)} rows, "
            f"{manifest['errors']['count']} errors in {len(shards)} shard(s): {out}")


def read_scores(out: str | Path) -> pd.DataFrame:
    """The table written by :func:`score` into ``out``, shards in order."""
    out = Path(out)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return pd.concat([pd.read_parquet(out / entry["file"]) for entry in manifest["shards"]], ignore_index=True)


# --------------------------------------------------------------------------- entry point
def check_engine(engine: str, workers: int) -> None:
    """One-line errors for an unknown engine or a number of workers it cannot run (also used by
    ``rank evaluate``, which scores its users through the same engines)."""
    if engine not in ENGINES:
        raise LlamarecError(f"engine {engine!r}: use local or ray")
    _check_count("workers", workers)
    if engine == "local" and workers != 1:
        raise LlamarecError(f"workers={workers}: the local engine runs one process; use engine ray")


def _check_count(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
        raise LlamarecError(f"{name}={value!r}: must be a whole number of at least 1")


def score(run_dir: str | Path, histories=None, out: str | Path | None = None, *, k: int = 10,
          engine: str = "local", workers: int = 1, batch_size: int | None = None, shards: int | None = None,
          device: str = "cpu", address: str | None = None, force: bool = False):
    """Recommend ``k`` items for every history (the run's users by default; a parquet or JSONL
    file, a DataFrame or a list of ``(user_id, history)``). Writes shards and a manifest into
    ``out`` and returns the manifest, or returns the table (pandas; ``attrs["errors"]`` lists
    the histories that did not resolve) without ``out``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LlamarecError(f"{run_dir}: no such run directory")
    check_engine(engine, workers)
    for name, value in (("k", k), ("batch_size", batch_size), ("shards", shards)):
        _check_count(name, value)
    if device == "auto":
        from llamarec.devices import resolve_device

        device = str(resolve_device(device))
    settings = _run_settings(run_dir)
    if k > settings["n_candidates"]:
        raise LlamarecError(f"k={k}: must be between 1 and the number of candidates ({settings['n_candidates']})")
    user_ids, hists, source = read_histories(run_dir, histories)
    batch_size = batch_size or settings["batch_size"]
    shards = min(shards or math.ceil(len(user_ids) / SHARD_USERS), len(user_ids))
    work = plan(run_dir, user_ids, hists, shards, batch_size)
    content = hashlib.sha256()
    for u, h in zip(user_ids, hists):
        content.update((json.dumps([u, h], default=str, ensure_ascii=False) + "\n").encode())
    options = {"run_fingerprint": run_fingerprint(run_dir), "histories_sha256": content.hexdigest(),
               "users": len(user_ids), "k": k, "shards": shards, "device": device}
    if out is None:
        sink = MemorySink()
    else:
        manifest = {"format": FORMAT, "run": str(run_dir.resolve()), "histories": source, "options": options,
                    "engine": {"engine": engine, "workers": workers, "batch_size": batch_size, "address": address},
                    "columns": COLUMNS, "complete": False, "errors": None,
                    "shards": [{"file": s.file, "users": len(s.user_ids), "rows": None, "sha256": None,
                                "errors": None, "errors_file": None, "errors_sha256": None} for s in work]}
        sink = _open_out(Path(out), manifest, force)
    todo = [s for s in work if out is None or not sink.finished(s.index)]
    logger.info("%d users in %d shards; %d to score (%s engine)", len(user_ids), shards, len(todo), engine)
    if todo:
        if engine == "ray":
            from llamarec.score_ray import run_ray as runner
        else:
            runner = _local
        runner(run_dir, todo, sink, k=k, batch_size=batch_size, device=device, workers=workers, address=address)
    if out is not None:
        return sink.finish()
    table = pa.concat_tables([sink.tables[i] for i in range(shards)]).to_pandas()
    table.attrs["errors"] = [e for i in range(shards) for e in sink.errors[i]]
    return table
