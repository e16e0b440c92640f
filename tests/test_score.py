"""Batch scoring with the local engine: the table, the shards and manifest, resume, errors, inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import llamarec.score as scoring
from llamarec.errors import LlamarecError
from llamarec.pipeline import Recommender
from llamarec.score import read_scores, score

HISTORIES = [("alice", ["1", "2", "3"]), ("bob", ["Item 10", "11", "item 12", "13", "14", "15", "16", "17"]),
             ("carol", ["40", "Item 2"]), ("dave", [5]), ("erin", ["7", "8", "9", "10", "11"])]


def assert_same_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Equal up to float noise: other shards or batch sizes pad the ranker's prompts differently."""
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=0, atol=1e-5)


@pytest.fixture
def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Users per call of score_batch, in call order."""
    calls: list[int] = []
    original = scoring.score_batch

    def counting(rec, user_ids, histories, k):
        calls.append(len(user_ids))
        return original(rec, user_ids, histories, k)

    monkeypatch.setattr(scoring, "score_batch", counting)
    return calls


def test_default_scores_every_user_of_the_dataset(tiny_pipeline_run: Path, tiny_dataset) -> None:
    table = score(tiny_pipeline_run, k=5)
    assert list(table.columns) == scoring.COLUMNS
    assert len(table) == tiny_dataset.n_users * 5
    assert table["user_id"].unique().tolist() == list(tiny_dataset.user_raw_ids)
    assert table["rank"].tolist() == [1, 2, 3, 4, 5] * tiny_dataset.n_users
    assert table.attrs["errors"] == []
    # the whole sequence is the history: the next item is new to the user
    first = tiny_dataset.sequences[0]
    seen = {tiny_dataset.item_raw_ids[i] for i in first}
    assert not seen & set(table.loc[table["user_id"] == tiny_dataset.user_raw_ids[0], "item_id"])


def test_the_table_equals_recommend_batch(tiny_pipeline_run: Path) -> None:
    table = score(tiny_pipeline_run, HISTORIES, k=8, batch_size=2)
    expected = Recommender.load(tiny_pipeline_run).recommend_batch([h for _, h in HISTORIES], k=8)
    assert table["user_id"].unique().tolist() == [u for u, _ in HISTORIES]
    for (user, _), result in zip(HISTORIES, expected):
        rows = table[table["user_id"] == user]
        assert rows["rank"].tolist() == list(range(1, 9))
        assert rows["item_id"].tolist() == [r.item_id for r in result.items]
        assert rows["title"].tolist() == [r.title for r in result.items]
        for column in ("score", "retriever_score", "ranker_score"):
            np.testing.assert_allclose(rows[column], [getattr(r, column) for r in result.items], atol=1e-5)


def test_the_ranker_sees_batches_sorted_by_prompt_length(tiny_pipeline_run: Path, count_batches) -> None:
    shards = scoring.plan(tiny_pipeline_run, [u for u, _ in HISTORIES], [h for _, h in HISTORIES], 1, 2)
    assert shards[0].batches == [[1, 4], [0, 2], [3]]  # 8 items, 5, 3, 2, 1
    score(tiny_pipeline_run, HISTORIES, k=3, batch_size=2)
    assert count_batches == [2, 2, 1]


def test_shards_and_manifest(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = score(tiny_pipeline_run, out=out, k=4, shards=3)
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["errors"] == {"file": "errors.jsonl", "count": 0}
    assert manifest["options"]["k"] == 4 and manifest["options"]["shards"] == 3
    assert [s["users"] for s in manifest["shards"]] == [12, 12, 12]
    assert [s["rows"] for s in manifest["shards"]] == [48, 48, 48]
    assert (out / "errors.jsonl").read_text() == ""
    assert not list(out.glob(".*"))  # no temporary file left behind
    assert_same_table(read_scores(out), score(tiny_pipeline_run, k=4))


def test_a_rerun_recomputes_only_missing_or_damaged_shards(tiny_pipeline_run: Path, tmp_path: Path,
                                                           count_batches) -> None:
    out = tmp_path / "out"
    score(tiny_pipeline_run, out=out, k=4, shards=4, batch_size=3)
    expected = read_scores(out)
    (out / "part-00001.parquet").unlink()  # a crash before this shard was written
    with (out / "part-00002.parquet").open("r+b") as fh:  # a damaged shard
        fh.seek(100)
        fh.write(b"\0\0\0\0")
    intact = {p: p.stat().st_mtime_ns for p in (out / "part-00000.parquet", out / "part-00003.parquet")}
    count_batches.clear()
    manifest = score(tiny_pipeline_run, out=out, k=4, shards=4, batch_size=3)
    assert sum(count_batches) == 18  # users of shards 1 and 2 (9 each)
    assert {p: p.stat().st_mtime_ns for p in intact} == intact
    assert manifest["complete"]
    pd.testing.assert_frame_equal(read_scores(out), expected)
    count_batches.clear()
    score(tiny_pipeline_run, out=out, k=4, shards=4, batch_size=5)  # finished: nothing to do
    assert count_batches == []


def test_a_killed_job_resumes(tiny_pipeline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, original, calls = tmp_path / "out", scoring.score_batch, []

    def dies_in_shard_two(rec, user_ids, histories, k):
        calls.append(len(user_ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(rec, user_ids, histories, k)

    monkeypatch.setattr(scoring, "score_batch", dies_in_shard_two)
    with pytest.raises(KeyboardInterrupt):
        score(tiny_pipeline_run, out=out, k=4, shards=3, batch_size=6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["sha256"] is not None for s in manifest["shards"]] == [True, False, False]
    calls.clear()
    monkeypatch.setattr(scoring, "score_batch", lambda *a: (calls.append(len(a[1])), original(*a))[1])
    score(tiny_pipeline_run, out=out, k=4, shards=3, batch_size=6)
    assert sum(calls) == 24
    pd.testing.assert_frame_equal(read_scores(out), score(tiny_pipeline_run, k=4, shards=3, batch_size=6))


def test_other_options_are_refused_unless_forced(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    score(tiny_pipeline_run, HISTORIES, out=out, k=4)
    with pytest.raises(LlamarecError, match=r"written with other options \(k 4 -> 5\); use --force") as info:
        score(tiny_pipeline_run, HISTORIES, out=out, k=5)
    assert "\n" not in str(info.value)
    with pytest.raises(LlamarecError, match="histories_sha256"):
        score(tiny_pipeline_run, HISTORIES[:2], out=out, k=4)
    manifest = score(tiny_pipeline_run, HISTORIES[:2], out=out, k=5, force=True)
    assert manifest["options"]["users"] == 2 and len(read_scores(out)) == 10
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(LlamarecError, match="not empty and no manifest.json"):
        score(tiny_pipeline_run, HISTORIES, out=tmp_path / "other")


def test_bad_histories_go_to_the_errors_file_and_the_job_goes_on(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    histories = [*HISTORIES[:2], ("x", ["no such item"]), ("y", []), ("z", [1.5, "2"]), *HISTORIES[2:]]
    out = tmp_path / "out"
    manifest = score(tiny_pipeline_run, histories, out=out, k=3, shards=2)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["user_id"] for e in errors] == ["x", "y", "z"]
    assert "'no such item' is neither an item id nor a title" in errors[0]["error"]
    assert "at least one item" in errors[1]["error"]
    assert "not float" in errors[2]["error"]
    assert manifest["errors"]["count"] == 3 and [s["errors"] for s in manifest["shards"]] == [2, 1]
    table = read_scores(out)
    assert table["user_id"].unique().tolist() == [u for u, _ in HISTORIES]
    in_memory = score(tiny_pipeline_run, histories, k=3)
    assert in_memory.attrs["errors"] == errors
    pd.testing.assert_frame_equal(in_memory, table, check_like=False)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_parquet_and_jsonl_files_give_the_same_table(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    frame = pd.DataFrame({"user_id": [u for u, _ in HISTORIES], "history": [[str(i) for i in h] for _, h in HISTORIES]})
    frame.to_parquet(tmp_path / "h.parquet")
    write_jsonl(tmp_path / "h.jsonl", [{"user_id": u, "history": h} for u, h in HISTORIES])
    expected = score(tiny_pipeline_run, HISTORIES, k=4)
    pd.testing.assert_frame_equal(score(tiny_pipeline_run, tmp_path / "h.jsonl", k=4), expected)
    pd.testing.assert_frame_equal(score(tiny_pipeline_run, str(tmp_path / "h.parquet"), k=4), expected)
    ids = pd.DataFrame({"user_id": [1, 2], "history": [[1, 2, 3], [40]]})  # integer ids in parquet
    ids.to_parquet(tmp_path / "ids.parquet")
    got = score(tiny_pipeline_run, tmp_path / "ids.parquet", k=4)
    pd.testing.assert_frame_equal(got, score(tiny_pipeline_run, [("1", ["1", "2", "3"]), ("2", ["40"])], k=4))


@pytest.mark.parametrize("name, content, message", [
    ("h.parquet", pd.DataFrame({"user": ["a"], "history": [["1"]]}), r"h.parquet: no column user_id"),
    ("h.parquet", pd.DataFrame({"user_id": ["a", "b"], "history": ["1 2", "3"]}),
     r"h.parquet: row 1: column history must be a list of item ids or titles, got str '1 2'"),
    ("h.jsonl", [{"user_id": "a", "history": ["1"]}, {"user_id": "b"}], r"h.jsonl: line 2: no column history"),
    ("h.jsonl", [{"user_id": "a", "history": "1"}], r"h.jsonl: line 1: column history must be a list"),
    ("h.jsonl", [{"user_id": None, "history": ["1"]}], r"h.jsonl: line 1: column user_id must be a non-empty id"),
    ("h.jsonl", [{"user_id": "a", "history": ["1"]}, {"user_id": "a", "history": ["2"]}],
     r"h.jsonl: user_id 'a' appears more than once"),
    ("h.jsonl", "{not json\n", r"h.jsonl: line 1: not JSON"),
    ("h.jsonl", "", r"h.jsonl: no histories"),
    ("h.csv", "user_id,history\n", r"h.csv: histories must be a .parquet or .jsonl file"),
    ("h.parquet", "not parquet", r"h.parquet: not a readable parquet file"),
])
def test_bad_files_are_one_line_errors(tiny_pipeline_run: Path, tmp_path: Path, name, content, message) -> None:
    path = tmp_path / name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    elif isinstance(content, list):
        write_jsonl(path, content)
    else:
        path.write_text(content)
    with pytest.raises(LlamarecError, match=message) as info:
        score(tiny_pipeline_run, path, out=tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("kwargs, message", [
    ({"k": 21}, r"k=21: must be between 1 and the number of candidates \(20\)"),
    ({"k": 0}, r"k=0: must be a whole number of at least 1"),
    ({"shards": 0}, r"shards=0"),
    ({"workers": 2}, r"the local engine runs one process; use engine ray"),
    ({"engine": "spark"}, r"engine 'spark': use local or ray"),
])
def test_bad_options(tiny_pipeline_run: Path, kwargs, message) -> None:
    with pytest.raises(LlamarecError, match=message):
        score(tiny_pipeline_run, HISTORIES, **kwargs)


def test_a_moved_run_resumes(copy_tiny_run, tmp_path: Path) -> None:
    run = copy_tiny_run("run")
    out = tmp_path / "out"
    score(run, HISTORIES, out=out, k=4)
    moved = run.rename(tmp_path / "moved")
    assert score(moved, HISTORIES, out=out, k=4)["run"] == str(moved.resolve())


def test_the_cli(tiny_pipeline_run: Path, tmp_path: Path, run_llamarec) -> None:
    path = write_jsonl(tmp_path / "h.jsonl", [{"user_id": u, "history": h} for u, h in HISTORIES])
    out = tmp_path / "out"
    result = run_llamarec("score", "--run", str(tiny_pipeline_run), "--histories", str(path), "--out", str(out),
                          "-k", "4", "--shards", "2", "--device", "cpu", **{"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "5 users, 20 rows, 0 errors" in result.stdout
    pd.testing.assert_frame_equal(read_scores(out), score(tiny_pipeline_run, HISTORIES, k=4))
    result = run_llamarec("score", "--run", str(tiny_pipeline_run), "--histories", str(path), "--out", str(out),
                          "-k", "5", "--device", "cpu")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "--force" in result.stderr
    assert os.path.isfile(out / "manifest.json")


def test_a_dataframe_of_histories_and_the_ray_engine_without_ray(tiny_pipeline_run: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pd.DataFrame({"user_id": [u for u, _ in HISTORIES], "history": [h for _, h in HISTORIES]})
    pd.testing.assert_frame_equal(score(tiny_pipeline_run, frame, k=3), score(tiny_pipeline_run, HISTORIES, k=3))
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(LlamarecError, match=r'the ray engine needs the ray extra: pip install -e "\.\[ray\]"'):
        score(tiny_pipeline_run, HISTORIES, engine="ray")


def test_a_cluster_that_asks_for_a_token_is_a_one_line_error_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ray 2.60 raises when a client joins a cluster with token authentication without a token."""
    import sys
    import types

    from llamarec.score_ray import connect

    def init(**_):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication "
                               "token is missing or incorrect.")
        except RuntimeError as cause:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from cause

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init,
                                 exceptions=types.SimpleNamespace(AuthenticationError=type("E", (Exception,), {})))
    monkeypatch.setitem(sys.modules, "ray", fake)
    message = (r"^ray address '10.0.0.1:6379': cannot connect \(Failed to connect to Ray cluster at 10.0.0.1:6379\); "
               r"the cluster asks for a token: set RAY_AUTH_MODE=token")
    with pytest.raises(LlamarecError, match=message) as info:
        connect(1, "10.0.0.1:6379")
    assert "\n" not in str(info.value)


def test_a_refused_connection_on_a_ray_without_authentication_error_is_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rays before 2.52 have no ``ray.exceptions.AuthenticationError``: the except clause must
    not look it up (that would raise AttributeError with a traceback)."""
    import sys
    import types

    from llamarec.score_ray import connect

    def init(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init, exceptions=types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "ray", fake)
    with pytest.raises(LlamarecError, match=r"^ray address '10.0.0.1:6379': cannot connect \(Failed to connect"):
        connect(1, "10.0.0.1:6379")


def test_a_ray_data_timeout_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Data gives up on actors that never get their resources (GPUs the cluster lacks) with
    ExecutionTimeoutError, a plain Exception: the session turns it into one line too."""
    pytest.importorskip("ray")
    from ray.data.exceptions import ExecutionTimeoutError

    from llamarec import score_ray

    monkeypatch.setattr(score_ray, "connect", lambda workers, address: False)  # no cluster needed
    with pytest.raises(LlamarecError, match=r"^ray: Timed out after 1800 s waiting for actors$"):
        with score_ray.session(1, None):
            raise ExecutionTimeoutError("Timed out after 1800 s\n  waiting for actors")


@pytest.mark.parametrize("device, gpus, workers, want", [
    ("auto", 0, 2, "cpu"), ("auto", 2, 2, "cuda"), ("cuda:1", 1, 1, "cuda"), ("cpu", 4, 2, "cpu"),
    ("auto", 1, 2, r"device cuda: the ray cluster has 1 GPU\(s\) for 2 worker\(s\)"),
    ("cuda", 0, 1, r"device cuda: the ray cluster has 0 GPU\(s\) for 1 worker\(s\)"),
])
def test_the_cluster_decides_the_actors_device(monkeypatch: pytest.MonkeyPatch, device, gpus, workers, want) -> None:
    """Not the driver's device: ``auto`` follows the cluster's GPUs, and asking for more GPUs
    than it has is a one-line error instead of actors waiting forever."""
    import sys
    import types

    from llamarec.score_ray import actor_device

    resources = {"CPU": 8.0, **({"GPU": float(gpus)} if gpus else {})}
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(cluster_resources=lambda: resources))
    if want in ("cpu", "cuda"):
        assert actor_device(device, workers) == want
    else:
        with pytest.raises(LlamarecError, match=want):
            actor_device(device, workers)
