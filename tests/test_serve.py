"""The HTTP server: every endpoint and every error, micro-batching, and `llamarec serve`."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from llamarec.pipeline import Recommender  # noqa: E402
from llamarec.serve import BatchWorker, ShuttingDown, create_app  # noqa: E402

HISTORY = ["3", "Item 4", "item 5"]  # a raw id, an exact title, a title in another case
HISTORIES = [["1", "2", "3"], ["10", "11"], ["Item 20"], ["30", "31", "32", "33"], ["7"], ["40", "41"]]


@pytest.fixture(scope="module")
def rec(tiny_pipeline_run: Path) -> Recommender:
    return Recommender.load(tiny_pipeline_run)


class Slow:
    """A Recommender whose ``recommend_batch`` records each batch's size, says when it starts,
    waits ``delay`` seconds, and while ``hold`` is not set waits for it; it fails if told to."""

    def __init__(self, rec: Recommender, delay: float = 0.0, fail: bool = False, hold: bool = False) -> None:
        self._rec, self.delay, self.fail = rec, delay, fail
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.hold = threading.Event()
        if not hold:
            self.hold.set()

    def __getattr__(self, name: str):
        return getattr(self._rec, name)

    def recommend_batch(self, histories, k=10):
        self.sizes.append(len(histories))
        self.started.set()
        assert self.hold.wait(30), "held for too long"
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return self._rec.recommend_batch(histories, k)


@pytest.fixture
def serve() -> Iterator[Callable[..., TestClient]]:
    """``serve(recommender, **create_app_options)``: a started TestClient (lifespan run)."""
    clients: list[TestClient] = []

    def make(recommender, **options) -> TestClient:
        client = TestClient(create_app(recommender, **options))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def same(served: list[dict], direct) -> None:
    """Served items equal a direct Recommender result (ids, titles and scores)."""
    assert [i["id"] for i in served] == [r.item_id for r in direct.items]
    assert [i["title"] for i in served] == [r.title for r in direct.items]
    for key, attr in (("score", "score"), ("retriever_score", "retriever_score"), ("ranker_score", "ranker_score")):
        assert [i[key] for i in served] == pytest.approx([getattr(r, attr) for r in direct.items], abs=1e-5)


def in_threads(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    out: list[httpx.Response | None] = [None] * len(calls)

    def go(i: int) -> None:
        out[i] = calls[i]()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out  # type: ignore[return-value]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


# --------------------------------------------------------------------------- endpoints
def test_recommend_returns_the_recommenders_items_with_timings(rec: Recommender, serve) -> None:
    client = serve(rec)
    r = client.post("/recommend", json={"history": HISTORY, "k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    same(body["items"], rec.recommend(HISTORY, k=7))
    assert body["history"] == ["3", "4", "5"]
    t = body["timings"]
    assert set(t) == {"queue_ms", "retrieve_ms", "rank_ms", "total_ms", "batch_size"}
    assert t["batch_size"] == 1 and t["retrieve_ms"] > 0 and t["rank_ms"] > 0 and t["queue_ms"] >= 0
    assert t["total_ms"] >= t["retrieve_ms"] + t["rank_ms"]
    # k defaults to 10; ids may be JSON numbers
    r = client.post("/recommend", json={"history": [3, 4, 5]})
    assert r.status_code == 200 and len(r.json()["items"]) == 10


def test_recommend_batch_answers_each_history_and_fails_only_the_bad_one(rec: Recommender, serve) -> None:
    client = serve(rec)
    r = client.post("/recommend/batch", json={"histories": [HISTORY, ["no such thing"], ["10", "11"]], "k": 5})
    assert r.status_code == 200, r.text
    good, bad, other = r.json()["results"]
    same(good["items"], rec.recommend(HISTORY, k=5))
    same(other["items"], rec.recommend(["10", "11"], k=5))
    assert good["error"] is None and other["error"] is None
    assert bad["items"] == [] and "'no such thing'" in bad["error"]
    assert r.json()["timings"]["batch_size"] == 2  # both good histories went through one forward
    r = client.post("/recommend/batch", json={"histories": [["nope"]]})
    assert r.status_code == 200 and r.json()["results"][0]["error"]


def test_items_search_by_title_and_id(rec: Recommender, serve) -> None:
    client = serve(rec)
    items = client.get("/items", params={"query": "item 1", "limit": 5}).json()["items"]
    assert items[0] == {"id": "1", "title": "Item 1"}  # the exact title first, then titles starting so
    assert [i["title"] for i in items[1:]] == ["Item 10", "Item 11", "Item 12", "Item 13"]
    assert client.get("/items", params={"query": "7"}).json()["items"][0] == {"id": "7", "title": "Item 7"}
    assert len(client.get("/items").json()["items"]) == 20  # no query: the first items
    assert client.get("/items", params={"query": "zzz"}).json() == {"items": []}
    assert client.get("/items", params={"limit": 0}).status_code == 422
    assert client.get("/items", params={"limit": 101}).status_code == 422


def test_health_ready_stats_docs_and_page(rec: Recommender, serve) -> None:
    client = serve(rec, max_batch=4)
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    info = ready.json()
    assert info["ready"] is True and info["ranker"] is True and info["items"] == 48
    assert info["candidates"] == info["max_k"] == 20 and info["max_batch"] == 4
    client.post("/recommend", json={"history": HISTORY})
    stats = client.get("/stats").json()
    assert stats["requests"] == 1 and stats["batches"] == 1 and stats["mean_batch_size"] == 1.0
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/recommend/batch", "/items", "/health", "/ready", "/stats"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="search"' in page.text and 'id="recommend"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_stats_report_the_prefix_cache_and_a_hit_answers_as_a_miss(rec: Recommender, serve,
                                                                     tiny_pipeline_run: Path) -> None:
    client = serve(Recommender.load(tiny_pipeline_run, prefix_cache_mb=1))
    for _ in range(2):  # a miss, then a hit
        r = client.post("/recommend", json={"history": HISTORY, "k": 7})
        same(r.json()["items"], rec.recommend(HISTORY, k=7))
    cache = client.get("/stats").json()["prefix_cache"]
    assert cache["hits"] == 1 and cache["misses"] == 1 and cache["entries"] == 1
    assert 0 < cache["bytes"] <= cache["max_bytes"] == 2**20
    assert serve(rec).get("/stats").json()["prefix_cache"] is None  # off


def test_ready_is_503_when_the_worker_is_not_running(rec: Recommender, serve) -> None:
    client = serve(rec)
    client.app.state.worker.stop()
    assert client.get("/ready").status_code == 503
    r = client.post("/recommend", json={"history": HISTORY})
    assert r.status_code == 503 and "worker" in r.json()["detail"]
    assert client.get("/health").status_code == 200


# --------------------------------------------------------------------------- errors
def test_unknown_items_are_422_naming_each_with_close_matches(rec: Recommender, serve) -> None:
    client = serve(rec)
    r = client.post("/recommend", json={"history": ["Item 4", "Itme 5", "nothing like it"]})
    assert r.status_code == 422
    body = r.json()
    assert [u["item"] for u in body["unknown"]] == ["Itme 5", "nothing like it"]
    assert "'Itme 5'" in body["detail"] and "close matches: Item 5" in body["detail"]
    assert "'nothing like it'" in body["detail"]


@pytest.mark.parametrize(("body", "where"), [
    ({"history": HISTORY, "k": 0}, "k:"),
    ({"history": HISTORY, "k": 21}, "k:"),  # more than the run's 20 candidates
    ({"history": HISTORY, "k": "ten"}, "k:"),
    ({"history": []}, "history:"),
    ({"history": "3"}, "history:"),
    ({"history": [True]}, "history.0"),
    ({"history": [""]}, "history.0"),
    ({"history": [None]}, "history.0"),
    ({"history": ["x" * 501]}, "history.0"),  # longer than a title may be (500)
    ({"history": ["3"] * 201}, "history:"),  # longer than max_history (200)
    ({"history": HISTORY, "extra": 1}, "extra:"),
    ({"k": 3}, "history:"),
])
def test_bad_requests_are_422_with_a_one_line_reason(rec: Recommender, serve, body: dict, where: str) -> None:
    r = serve(rec).post("/recommend", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail.startswith(where), detail


def test_batch_limits(rec: Recommender, serve) -> None:
    client = serve(rec, max_histories=3, max_history=4, max_k=5)
    assert client.post("/recommend/batch", json={"histories": [["1"]] * 4}).status_code == 422
    assert client.post("/recommend/batch", json={"histories": []}).status_code == 422
    assert client.post("/recommend/batch", json={"histories": [["1"] * 5]}).status_code == 422
    assert client.post("/recommend/batch", json={"histories": [["1"]], "k": 6}).status_code == 422
    assert client.post("/recommend", json={"history": ["1"], "k": 6}).status_code == 422
    assert client.post("/recommend/batch", json={"histories": [["1"]] * 3, "k": 5}).status_code == 200
    with pytest.raises(ValueError, match="max_k=21"):
        create_app(rec, max_k=21)


def test_malformed_json_is_422(rec: Recommender, serve) -> None:
    r = serve(rec).post("/recommend", content=b'{"history": [', headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_a_body_over_the_limit_is_413_with_or_without_a_length(rec: Recommender, serve) -> None:
    client = serve(rec, max_body_bytes=1000)
    big = json.dumps({"history": ["Item 1"] * 150}).encode()
    assert len(big) > 1000
    r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1000 bytes" in r.json()["detail"]

    def chunks():  # no content-length: sent chunked
        for i in range(0, len(big), 100):
            yield big[i:i + 100]

    r = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    small = json.dumps({"history": HISTORY}).encode()
    assert client.post("/recommend", content=small, headers={"content-type": "application/json"}).status_code == 200


def test_api_key_is_required_except_for_health_page_and_docs(rec: Recommender, serve) -> None:
    client = serve(rec, api_key="s3cret")
    for method, path in (("post", "/recommend"), ("post", "/recommend/batch"), ("get", "/items"),
                         ("get", "/ready"), ("get", "/stats")):
        r = client.request(method, path, json={"history": HISTORY})
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
    assert client.post("/recommend", json={"history": HISTORY},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/recommend", json={"history": HISTORY},
                       headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert client.post("/recommend", json={"history": HISTORY},
                       headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # unauthenticated requests are refused before their body is read or validated
    assert client.post("/recommend", content=b"{", headers={"content-type": "application/json"}).status_code == 401
    for path in ("/health", "/", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert "HTTPBearer" in json.dumps(client.get("/openapi.json").json()["components"])


def test_a_full_queue_answers_503_with_retry_after(rec: Recommender, serve) -> None:
    slow = Slow(rec, hold=True)
    client = serve(slow, max_queue=1, max_batch=1)
    worker = client.app.state.worker
    first = threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"history": HISTORY}})
    first.start()
    assert slow.started.wait(10)  # the worker is busy with the first request
    second = threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"history": HISTORY}})
    second.start()
    wait_for(lambda: worker.waiting == 1)  # the second waits: the queue is full
    r = client.post("/recommend", json={"history": HISTORY})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "busy" in r.json()["detail"]
    slow.hold.set()
    first.join(10)
    second.join(10)
    assert client.get("/stats").json()["rejected"] == 1


def test_a_request_not_answered_in_time_is_504(rec: Recommender, serve) -> None:
    slow = Slow(rec, hold=True)
    client = serve(slow, request_timeout_s=0.2)
    r = client.post("/recommend", json={"history": HISTORY})
    assert r.status_code == 504 and "0.2 s" in r.json()["detail"]
    assert client.get("/stats").json()["timeouts"] == 1
    slow.hold.set()
    wait_for(lambda: client.get("/stats").json()["batches"] == 1)  # the late batch finished quietly
    assert client.post("/recommend", json={"history": HISTORY}).status_code == 200


def test_a_failing_model_is_500_for_its_requests_only(rec: Recommender, serve) -> None:
    slow = Slow(rec, fail=True)
    client = serve(slow)
    r = client.post("/recommend", json={"history": HISTORY})
    assert r.status_code == 500 and r.json()["detail"] == "recommendation failed: RuntimeError"
    slow.fail = False
    assert client.post("/recommend", json={"history": HISTORY}).status_code == 200
    assert client.get("/stats").json()["errors"] == 1


# --------------------------------------------------------------------------- micro-batching
def test_requests_that_pile_up_while_the_model_is_busy_share_one_forward(rec: Recommender, serve) -> None:
    slow = Slow(rec, hold=True)
    client = serve(slow, max_batch=8, max_wait_ms=20)
    worker = client.app.state.worker
    first = threading.Thread(target=client.post, args=("/recommend",), kwargs={"json": {"history": HISTORY}})
    first.start()
    assert slow.started.wait(10)  # idle worker: the first request ran at once, alone
    calls = [lambda h=h, i=i: client.post("/recommend", json={"history": h, "k": 4 + i})
             for i, h in enumerate(HISTORIES)]
    threads_done: list[list[httpx.Response]] = []
    runner = threading.Thread(target=lambda: threads_done.append(in_threads(calls)))
    runner.start()
    wait_for(lambda: worker.waiting == len(HISTORIES))  # all piled up behind the first
    slow.hold.set()
    runner.join(30)
    first.join(10)
    responses = threads_done[0]
    assert slow.sizes == [1, len(HISTORIES)]
    stats = client.get("/stats").json()
    assert stats["batches"] == 2 and stats["mean_batch_size"] == (1 + len(HISTORIES)) / 2 > 1
    for i, (history, r) in enumerate(zip(HISTORIES, responses)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["timings"]["batch_size"] == len(HISTORIES) and body["timings"]["queue_ms"] > 0
        same(body["items"], rec.recommend(history, k=4 + i))  # batched = the Recommender directly


def test_without_batching_each_request_runs_alone(rec: Recommender, serve) -> None:
    slow = Slow(rec, delay=0.1)
    client = serve(slow, max_batch=1)
    responses = in_threads([lambda h=h: client.post("/recommend", json={"history": h}) for h in HISTORIES[:3]])
    assert all(r.status_code == 200 for r in responses)
    assert slow.sizes == [1, 1, 1]


def test_a_batch_request_larger_than_max_batch_runs_whole(rec: Recommender, serve) -> None:
    slow = Slow(rec)
    client = serve(slow, max_batch=2)
    r = client.post("/recommend/batch", json={"histories": HISTORIES[:4]})
    assert r.status_code == 200 and slow.sizes == [4]


def test_requests_still_queued_when_the_worker_stops_hear_so(rec: Recommender) -> None:
    async def scenario() -> None:
        worker = BatchWorker(rec, max_batch=4, max_wait_ms=0, max_queue=4)
        worker._queue.put(None)  # the stop signal is ahead of the request
        job = worker.submit([["1"]], 3)
        worker.start()
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(job.future, 10)
        worker.stop()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- the access log
def test_each_request_logs_one_json_line_with_its_timings(rec: Recommender, serve,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    client = serve(rec, api_key="k")
    with caplog.at_level(logging.INFO, logger="llamarec.serve.access"):
        client.post("/recommend", json={"history": HISTORY}, headers={"Authorization": "Bearer k"})
        client.get("/ready")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "llamarec.serve.access"]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [("POST", "/recommend", 200),
                                                                      ("GET", "/ready", 401)]
    assert {"queue_ms", "retrieve_ms", "rank_ms", "batch_size", "ms", "ts", "client"} <= set(lines[0])
    assert "queue_ms" not in lines[1]


# --------------------------------------------------------------------------- the command
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_llamarec_serve_serves_a_run_on_loopback(tiny_pipeline_run: Path, run_llamarec) -> None:
    script = Path(sys.executable).parent / "llamarec"
    if not script.is_file():
        pytest.skip("the llamarec console script is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LLAMAREC_DEBUG"} | {"LLAMAREC_API_KEY": "key"}
    proc = subprocess.Popen([str(script), "serve", "--run", str(tiny_pipeline_run), "--port", str(port),
                             "--max-batch", "2", "--device", "cpu", "--threads", "1", "--prefix-cache-mb", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not come up"
            time.sleep(0.2)
        auth = {"Authorization": "Bearer key"}
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 401
        assert httpx.get(f"{url}/ready", headers=auth, timeout=5).json()["max_batch"] == 2
        r = httpx.post(f"{url}/recommend", json={"history": HISTORY, "k": 3}, headers=auth, timeout=30)
        assert r.status_code == 200 and len(r.json()["items"]) == 3
        cache = httpx.get(f"{url}/stats", headers=auth, timeout=5).json()["prefix_cache"]
        assert cache["max_bytes"] == 2 * 2**20 and cache["misses"] == 1
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    logged = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [x["status"] for x in logged if x["path"] == "/recommend"] == [200]
    assert f"127.0.0.1:{port}" in err


def test_llamarec_serve_names_a_missing_run(tmp_path: Path, run_llamarec) -> None:
    result = run_llamarec("serve", "--run", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
