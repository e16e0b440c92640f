"""Batch scoring on Ray Data: the same table as the local engine, resume, errors; ``rank
evaluate`` on Ray; joining a cluster started with ``ray start``. One local cluster (2 CPUs)
serves the whole module; the joined cluster is a second one, used from subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import llamarec.ranking.evaluate as evaluation
import llamarec.score as scoring
from llamarec.errors import LlamarecError
from llamarec.ranking.evaluate import evaluate_ranker
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


def test_rank_evaluate_on_ray_equals_local(tiny_pipeline_run: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ranker = tiny_pipeline_run / "ranker"
    options = {"order": "average", "permutations": 2, "calibrate": True}  # the letter prior: a second pass
    local = evaluate_ranker(ranker, out=tmp_path / "local", **options)

    def not_here(*_, **__):
        raise AssertionError("the driver loaded the ranker")

    monkeypatch.setattr(evaluation, "load_ranker", not_here)  # the actors' own processes are not patched
    remote = evaluate_ranker(ranker, out=tmp_path / "ray", engine="ray", workers=2, **options)
    assert remote == local and local["scoring"]["letter_prior"] is not None
    for name in ("metrics.json", "ranks.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def test_a_title_similarity_ranker_on_ray_equals_local(copy_tiny_run, tiny_llm_path: Path, tmp_path: Path) -> None:
    from llamarec.manifest import forget
    from llamarec.ranking.config import RankConfig
    from llamarec.ranking.finetune import finetune_ranker

    run = copy_tiny_run()
    shutil.rmtree(run / "ranker")
    (run / "metrics.json").unlink()  # the verbalizer's fusion: this ranker is served as trained (retriever order)
    forget(run, run / "metrics.json")
    cfg = RankConfig(retriever=run / "retriever", kind="title_similarity", model=str(tiny_llm_path), device="cpu")
    finetune_ranker(cfg, run / "ranker", progress=False)
    local = evaluate_ranker(run / "ranker", out=tmp_path / "local")
    remote = evaluate_ranker(run / "ranker", out=tmp_path / "ray", engine="ray", workers=2)
    assert remote == local and local["dtype"] == "float32"
    table = score(run, k=6, shards=2, engine="ray", workers=2)
    pd.testing.assert_frame_equal(table, score(run, k=6, shards=2))
    assert table["ranker_score"].notna().all()


# --------------------------------------------------------------------------- an existing cluster
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM: ``ray start --block`` stops its node's processes and exits; whatever is left of
    its process group then gets SIGKILL. Not ``ray stop``: that stops every Ray process of the
    machine, the module's own cluster included."""
    head.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


@pytest.fixture
def ray_head() -> Iterator[tuple[dict[str, str], Path]]:
    """A head node started with the ray CLI, as on a cluster (2 CPUs, token authentication with
    a token of its own), stopped after the test however it ends. Yields what a client needs
    in its environment (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN) and the node's temp dir."""
    cli = Path(sys.executable).parent / "ray"
    if not cli.is_file():
        pytest.skip(f"no ray CLI at {cli}")
    port, dashboard, agent = _free_ports(3)
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    command = [str(cli), "start", "--head", "--block", "--num-cpus=2", "--include-dashboard=false", f"--port={port}",
               f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"]
    with (temp / "start.log").open("w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0",
                                     "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # stop at once
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").is_file():
            if head.poll() is not None or time.monotonic() > deadline:
                lines = (temp / "start.log").read_text().strip().splitlines() or ["no output"]
                pytest.skip(f"cannot start a Ray head node here ({' '.join(command[1:4])}): {lines[-1]}")
            time.sleep(0.5)
        yield {**auth, "RAY_ADDRESS": (temp / "ray_current_cluster").read_text().strip()}, temp
    finally:
        _stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_joining_a_running_cluster(ray_head: tuple[dict[str, str], Path], tiny_pipeline_run: Path, tmp_path: Path,
                                   run_llamarec) -> None:
    """``--address`` and ``RAY_ADDRESS``, from subprocesses (this process has the module's cluster)."""
    env, head_dir = ray_head
    address, auth = env["RAY_ADDRESS"], {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "scores"
    result = run_llamarec("score", "--run", str(tiny_pipeline_run), "--out", str(out), "-k", "4", "--shards", "2",
                          "--device", "cpu", "--engine", "ray", "--workers", "2", "--address", address, **auth)
    assert result.returncode == 0, result.stderr
    pd.testing.assert_frame_equal(read_scores(out), score(tiny_pipeline_run, k=4, shards=2))

    ranker, evaluated = tiny_pipeline_run / "ranker", tmp_path / "eval"
    result = run_llamarec("rank", "evaluate", "--ranker", str(ranker), "--out", str(evaluated), "--limit", "3",
                          "--engine", "ray", "--workers", "2", **env)
    assert result.returncode == 0, result.stderr
    local = evaluate_ranker(ranker, limit=3, out=tmp_path / "local")
    assert json.loads((evaluated / "metrics.json").read_text()) == local
    # both jobs ran on that cluster, not on one of their own
    assert len(list((head_dir / "session_latest" / "logs").glob("python-core-driver-*.log"))) == 2
