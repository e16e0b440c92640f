"""Batch scoring on Ray Data: the same table as the local engine, resume, errors. One local
cluster (2 CPUs) serves the whole module."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import llamarec.score as scoring
from llamarec.errors import LlamarecError
from llamarec.score import read_scores, score

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.slow

HISTORIES = [("alice", ["1", "2", "3"]), ("bob", ["Item 10", "11", "item 12", "13", "14", "15", "16", "17"]),
             ("x", ["no such item"]), ("carol", ["40", "Item 2"]), ("dave", [5]), ("erin", ["7", "8", "9"])]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_and_local_give_identical_tables(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    local = score(tiny_pipeline_run, k=6, shards=3, batch_size=5)
    remote = score(tiny_pipeline_run, k=6, shards=3, batch_size=5, engine="ray", workers=2)
    pd.testing.assert_frame_equal(remote, local)
    manifest = score(tiny_pipeline_run, out=tmp_path / "out", k=6, shards=3, batch_size=5, engine="ray", workers=2)
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [72, 72, 72]
    assert manifest["engine"] == {"engine": "ray", "workers": 2, "batch_size": 5, "address": None}
    pd.testing.assert_frame_equal(read_scores(tmp_path / "out"), local)


def test_bad_histories_go_to_the_errors_file(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = score(tiny_pipeline_run, HISTORIES, out=out, k=3, shards=2, batch_size=2, engine="ray", workers=2)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["user_id"] for e in errors] == ["x"] and "neither an item id nor a title" in errors[0]["error"]
    assert manifest["errors"]["count"] == 1
    local = score(tiny_pipeline_run, HISTORIES, k=3, shards=2, batch_size=2)
    pd.testing.assert_frame_equal(read_scores(out), local)


def test_a_ray_rerun_recomputes_only_the_missing_shard(tiny_pipeline_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    score(tiny_pipeline_run, out=out, k=4, shards=3, engine="ray", workers=2)
    expected = read_scores(out)
    (out / "part-00001.parquet").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "part-00000.parquet", out / "part-00002.parquet")}
    manifest = score(tiny_pipeline_run, out=out, k=4, shards=3, engine="ray", workers=1)  # workers may change
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert manifest["complete"] and (out / "part-00001.parquet").is_file()
    pd.testing.assert_frame_equal(read_scores(out), expected)
    # a job started by the local engine resumes on ray, and the other way round
    (out / "part-00000.parquet").unlink()
    score(tiny_pipeline_run, out=out, k=4, shards=3)
    pd.testing.assert_frame_equal(read_scores(out), expected)


def test_a_worker_that_cannot_load_the_run_is_a_one_line_error(copy_tiny_run) -> None:
    run = copy_tiny_run()
    (run / "ranker" / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(LlamarecError, match=r"adapter_model.safetensors: missing, though manifest.json lists it"):
        score(run, HISTORIES, k=3, engine="ray", workers=1)
    for manifest in run.rglob("manifest.json"):  # a run from before manifests: the worker finds out
        manifest.unlink()
    with pytest.raises(LlamarecError, match=r"^\S*adapter: no adapter_model.safetensors") as info:
        score(run, HISTORIES, k=3, engine="ray", workers=1)
    assert "\n" not in str(info.value)
    (run / "ranker" / "adapter" / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(LlamarecError, match=r"adapter: cannot load the adapter \(.*header") as info:
        score(run, HISTORIES, k=3, engine="ray", workers=1)
    assert "\n" not in str(info.value)


def test_the_ray_module_is_imported_only_for_the_ray_engine() -> None:
    import subprocess
    import sys

    code = ("import sys, llamarec.score, llamarec.cli; "
            "assert 'ray' not in sys.modules and 'llamarec.score_ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert scoring.ENGINES == ("local", "ray")
