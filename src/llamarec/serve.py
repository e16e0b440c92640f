"""HTTP serving of a :class:`~llamarec.pipeline.Recommender`: a FastAPI app with micro-batching.

``create_app(recommender)`` builds the app; ``llamarec serve --run DIR`` runs it under uvicorn.
FastAPI and uvicorn are the optional ``serve`` extra and are imported only here.

One worker thread owns the models. Requests are put on a bounded queue; the worker takes the
oldest and, if others piled up while it was busy, gathers them (up to ``max_batch`` histories,
waiting at most ``max_wait_ms`` for more) into one ``recommend_batch`` call, so the ranker
scores them in one forward. A request that arrives while the worker is idle runs at once. A
full queue answers 503 with ``Retry-After``.

This module deliberately does not use ``from __future__ import annotations``: the request
models are built per app (their limits are the app's) and FastAPI reads their annotations.
"""

import asyncio
import hmac
import json
import logging
import queue
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, Field, PlainValidator, WithJsonSchema

from llamarec.errors import LlamarecError

access_log = logging.getLogger("llamarec.serve.access")
logger = logging.getLogger(__name__)

# Paths anyone may read without the API key: the process probe, the static page and the docs
# (none of them shows data; the page asks for the key and sends it with its API calls).
PUBLIC_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
TIMINGS_KEY = "llamarec.timings"  # where a handler leaves its timings for the access log


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` requests already."""


class ShuttingDown(Exception):
    """The worker stopped before it took the request."""


class UnknownItems(Exception):
    """History entries that are neither an item id nor a title (answered with 422)."""

    def __init__(self, problems: list[dict]) -> None:
        super().__init__(" | ".join(p["error"] for p in problems))
        self.problems = problems


# --------------------------------------------------------------------------- the model worker
@dataclass(eq=False)
class _Job:
    histories: list[list[str]]  # resolved histories, as raw item ids
    k: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # timed out before the worker took it


@dataclass
class BatchOutcome:
    """What one job gets back: its results (items cut to its ``k``) and the batch's timings."""

    results: list  # RecommendResult per history of the job
    queue_ms: float
    retrieve_ms: float  # the whole batch's retrieval, which this request waited for
    rank_ms: float
    batch_size: int  # histories scored together in that batch


class BatchWorker:
    """One thread that runs ``recommender.recommend_batch`` on gathered requests."""

    def __init__(self, recommender, *, max_batch: int, max_wait_ms: float, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be at least 1, max_wait_ms at least 0")
        self.recommender = recommender
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0  # jobs on the queue, not yet taken by the worker
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "batches": 0, "batched_histories": 0, "max_batch_size": 0,
                      "rejected": 0, "timeouts": 0, "errors": 0}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.alive:
            return
        self._thread = threading.Thread(target=self._run, name="llamarec-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return self._waiting

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(self.stats)
            stats["queue_depth"] = self._waiting
        stats["mean_batch_size"] = round(stats["batched_histories"] / stats["batches"], 3) if stats["batches"] else 0.0
        return stats

    def count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, histories: list[list[str]], k: int) -> _Job:
        """Queue a job (call from the event loop); raises :class:`QueueFull`."""
        loop = asyncio.get_running_loop()
        job = _Job(histories, k, loop, loop.create_future())
        with self._lock:
            if self._waiting >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull
            self._waiting += 1
            self.stats["requests"] += 1
        self._queue.put(job)
        return job

    # -- the thread ------------------------------------------------------------------------------
    def _take(self, block: bool, timeout: float | None = None) -> _Job | None:
        job = self._queue.get(block, timeout)
        if job is not None:
            with self._lock:
                self._waiting -= 1
        return job

    def _run(self) -> None:
        carry: _Job | None = None  # a job that did not fit into the previous batch
        stopping = False
        while not stopping:
            if carry is not None:
                first, backlog, carry = carry, True, None
            else:
                try:
                    first, backlog = self._take(False), True  # it piled up while we were busy
                except queue.Empty:
                    first, backlog = self._take(True), False  # idle: it runs as soon as it comes
            if first is None:
                break
            batch = [first]
            size = len(first.histories)
            deadline = time.perf_counter() + (self.max_wait if backlog else 0.0)
            while size < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    job = self._take(left > 0, left if left > 0 else None)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if size + len(job.histories) > self.max_batch:
                    carry = job
                    break
                batch.append(job)
                size += len(job.histories)
            self._run_batch(batch)
        # Stopped: whatever still waits (queued after the stop) hears so rather than timing out.
        while True:
            try:
                job = self._take(False)
            except queue.Empty:
                break
            if job is not None:
                self._settle(job, None, ShuttingDown())

    def _run_batch(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.cancelled]
        if not jobs:
            return
        start = time.perf_counter()
        histories = [h for job in jobs for h in job.histories]
        # Everything that touches the model's answer is inside the try: an exception here must
        # fail this batch's requests, never end the worker thread (which would leave them, and
        # every later request, waiting).
        try:
            results = list(self.recommender.recommend_batch(histories, max(job.k for job in jobs)))
            if len(results) != len(histories):
                raise RuntimeError(f"recommend_batch returned {len(results)} results for {len(histories)} histories")
            ok = sum(r.error is None for r in results)
            retrieve_ms = max((r.retrieval_ms for r in results), default=0.0) * ok
            rank_ms = max((r.ranking_ms for r in results), default=0.0) * ok
            outcomes, row = [], 0
            for job in jobs:
                mine = results[row:row + len(job.histories)]
                row += len(job.histories)
                for r in mine:
                    del r.items[job.k:]
                outcomes.append(BatchOutcome(mine, (start - job.enqueued) * 1000, retrieve_ms, rank_ms,
                                             len(histories)))
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
            logger.exception("recommend_batch failed")
            self.count("errors")
            for job in jobs:
                self._settle(job, None, exc)
            return
        with self._lock:
            self.stats["batches"] += 1
            self.stats["batched_histories"] += len(histories)
            self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(histories))
        for job, outcome in zip(jobs, outcomes):
            self._settle(job, outcome, None)

    @staticmethod
    def _settle(job: _Job, outcome: BatchOutcome | None, exc: BaseException | None) -> None:
        def deliver() -> None:
            if job.future.done():  # the request timed out or went away
                return
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(outcome)

        try:
            job.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


# --------------------------------------------------------------------------- ASGI middleware
class _Front:
    """Outermost layer: the access log (one JSON line per request), the API key and the body
    size limit, all before FastAPI reads anything."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[TIMINGS_KEY] = {}
        status = {"code": 500}

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, send_logged)
        finally:
            line = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                    "method": scope["method"], "path": scope["path"], "status": status["code"],
                    "ms": round((time.perf_counter() - start) * 1000, 2),
                    "client": (scope.get("client") or ["?"])[0], **scope[TIMINGS_KEY]}
            access_log.info(json.dumps(line))

    async def _gate(self, scope, receive, send) -> None:
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and not self._authorised(scope):
            await _send_json(send, 401, {"detail": "missing or wrong API key: send 'Authorization: Bearer KEY'"},
                             [(b"www-authenticate", b"Bearer")])
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
            return
        # Read the body here (it is small by now) so a chunked body is limited too, then replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorised(self, scope) -> bool:
        given = _header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        # compare_digest runs in time independent of where the strings differ
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


# --------------------------------------------------------------------------- response models
class Item(BaseModel):
    id: str
    title: str
    score: float
    retriever_score: float
    ranker_score: float | None


class Timings(BaseModel):
    queue_ms: float
    retrieve_ms: float
    rank_ms: float
    total_ms: float
    batch_size: int


class Recommendations(BaseModel):
    items: list[Item]
    history: list[str]  # the resolved history, as item ids
    timings: Timings


class BatchEntry(BaseModel):
    items: list[Item]
    history: list[str]
    error: str | None = None


class BatchRecommendations(BaseModel):
    results: list[BatchEntry]
    timings: Timings


class CatalogueItem(BaseModel):
    id: str
    title: str


class SearchResults(BaseModel):
    items: list[CatalogueItem]


class Problem(BaseModel):
    """Every error answer: ``detail`` is one line; a 422 adds the validation ``errors`` or the
    ``unknown`` history items."""

    detail: str
    errors: list[dict] | None = None
    unknown: list[dict] | None = None


def _problems(*codes: int) -> dict:
    """The OpenAPI ``responses`` of these error statuses, each a :class:`Problem`."""
    return {code: {"model": Problem} for code in codes}


# --------------------------------------------------------------------------- the app
def create_app(recommender, *, api_key: str | None = None, max_batch: int = 8, max_wait_ms: float = 5,
               max_queue: int = 64, max_history: int = 200, max_k: int | None = None,
               max_histories: int = 32, max_body_bytes: int = 256 * 1024,
               request_timeout_s: float = 30.0, max_title_chars: int = 500):
    """The FastAPI app serving ``recommender`` (a loaded :class:`~llamarec.pipeline.Recommender`).

    ``max_batch``/``max_wait_ms``: micro-batching (``max_batch=1`` turns it off);
    ``max_queue``: requests that may wait before 503; ``max_history``: items per history;
    ``max_k``: largest k (default and at most the run's number of candidates);
    ``max_histories``: histories per ``/recommend/batch`` request; ``max_body_bytes``: request
    body size (413 above); ``request_timeout_s``: a request still unanswered then gets 504.
    """
    n_candidates = recommender.n_candidates
    max_k = n_candidates if max_k is None else max_k
    if not 1 <= max_k <= n_candidates:
        raise ValueError(f"max_k={max_k}: must be between 1 and the run's number of candidates ({n_candidates})")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key must not be empty")
    worker = BatchWorker(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    page = resources.files("llamarec").joinpath("static/index.html").read_text(encoding="utf-8")

    def entry(value: object) -> int | str:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise ValueError("an item is an id or a title (a number or a non-empty string)")
        if isinstance(value, str) and len(value) > max_title_chars:
            raise ValueError(f"an item is at most {max_title_chars} characters")
        return value

    Entry = Annotated[int | str, PlainValidator(entry), WithJsonSchema(
        {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": max_title_chars}]})]
    History = Annotated[list[Entry], Field(min_length=1, max_length=max_history,
                                           description="Item ids or titles, oldest first.")]
    def whole_number(value: object) -> object:  # lax int validation would read true as 1 and "5" as 5
        if isinstance(value, (bool, str)):
            raise ValueError("k is a whole number, not true/false or a string")
        return value

    K = Annotated[int, Field(ge=1, le=max_k, description="Number of recommendations."), BeforeValidator(whole_number)]

    class RecommendRequest(BaseModel):
        model_config = {"extra": "forbid", "json_schema_extra": {"examples": [{"history": ["1", "2"], "k": 10}]}}
        history: History
        k: K = min(10, max_k)

    class BatchRequest(BaseModel):
        model_config = {"extra": "forbid"}
        histories: Annotated[list[History], Field(min_length=1, max_length=max_histories)]
        k: K = min(10, max_k)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="llamarec", version="1", lifespan=lifespan,
                  description="Two-stage recommendation: retriever top-k, LLM ranker, fusion.")
    app.state.worker = worker
    app.state.recommender = recommender
    # Declares the bearer scheme in the OpenAPI docs; _Front does the actual check.
    bearer = [Depends(HTTPBearer(auto_error=False))] if api_key is not None else []

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), exclude={"input", "url", "ctx"})
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors]
        return JSONResponse({"detail": "; ".join(parts), "errors": errors}, status_code=422)

    @app.exception_handler(UnknownItems)
    async def unknown_items(request: Request, exc: UnknownItems) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "unknown": exc.problems}, status_code=422)

    async def resolve(history: list) -> list[str]:
        """Raw item ids of a history; 422 naming every unknown item, with close matches."""

        def work() -> tuple[list[str], list[dict]]:
            raw, problems = [], []
            for entry in history:
                try:
                    raw.append(recommender.catalogue.raw_ids[recommender.resolve_item(entry)])
                except LlamarecError as exc:
                    problems.append({"item": entry, "error": str(exc)})
            return raw, problems

        raw, problems = await asyncio.to_thread(work)  # close matches scan every title: off the loop
        if problems:
            raise UnknownItems(problems)
        return raw

    async def run(request: Request, histories: list[list[str]], k: int) -> BatchOutcome:
        if not worker.alive:
            raise HTTPException(503, "the model worker is not running", headers={"Retry-After": "5"})
        try:
            job = worker.submit(histories, k)
        except QueueFull:
            raise HTTPException(503, f"server busy: {worker.max_queue} requests already waiting; retry shortly",
                                headers={"Retry-After": "1"}) from None
        try:
            outcome = await asyncio.wait_for(job.future, request_timeout_s)
        except ShuttingDown:
            raise HTTPException(503, "the server is shutting down", headers={"Retry-After": "5"}) from None
        except asyncio.TimeoutError:
            job.cancelled = True
            worker.count("timeouts")
            raise HTTPException(504, f"no answer within {request_timeout_s:g} s") from None
        except LlamarecError as exc:
            raise HTTPException(500, f"recommendation failed: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the worker logged the traceback
            raise HTTPException(500, f"recommendation failed: {type(exc).__name__}") from None
        return outcome

    def timings(request: Request, outcome: BatchOutcome | None, start: float) -> Timings:
        """The request's timings, also left for the access log."""
        o = outcome or BatchOutcome([], 0.0, 0.0, 0.0, 0)
        values = {"queue_ms": o.queue_ms, "retrieve_ms": o.retrieve_ms, "rank_ms": o.rank_ms,
                  "total_ms": (time.perf_counter() - start) * 1000}
        values = {name: round(v, 3) for name, v in values.items()} | {"batch_size": o.batch_size}
        request.scope.get(TIMINGS_KEY, {}).update(values)
        return Timings(**values)

    def items(result) -> list[Item]:
        return [Item(id=r.item_id, title=r.title, score=r.score, retriever_score=r.retriever_score,
                     ranker_score=r.ranker_score) for r in result.items]

    @app.post("/recommend", response_model=Recommendations, dependencies=bearer,
              responses=_problems(400, 401, 413, 422, 500, 503, 504))
    async def recommend(body: RecommendRequest, request: Request) -> Recommendations:
        """Recommend ``k`` items for one history (item ids or titles, oldest first)."""
        start = time.perf_counter()
        raw = await resolve(body.history)
        outcome = await run(request, [raw], body.k)
        result = outcome.results[0]
        if result.error is not None:
            raise HTTPException(422, result.error)
        return Recommendations(items=items(result), history=result.history, timings=timings(request, outcome, start))

    @app.post("/recommend/batch", response_model=BatchRecommendations, dependencies=bearer,
              responses=_problems(400, 401, 413, 422, 500, 503, 504))
    async def recommend_batch(body: BatchRequest, request: Request) -> BatchRecommendations:
        """Recommend for several histories at once; a history with unknown items gets an
        ``error`` entry and no items, the others are unaffected."""
        start = time.perf_counter()
        entries: list[BatchEntry | None] = [None] * len(body.histories)
        raws, rows = [], []
        for row, history in enumerate(body.histories):
            try:
                raws.append(await resolve(history))
                rows.append(row)
            except UnknownItems as exc:
                entries[row] = BatchEntry(items=[], history=[], error=str(exc))
        outcome = await run(request, raws, body.k) if raws else None
        for row, result in zip(rows, outcome.results if outcome else []):
            entries[row] = BatchEntry(items=items(result), history=result.history, error=result.error)
        return BatchRecommendations(results=entries, timings=timings(request, outcome, start))

    @app.get("/items", response_model=SearchResults, dependencies=bearer, responses=_problems(401, 422))
    async def search_items(query: Annotated[str, Query(max_length=max_title_chars)] = "",
                           limit: Annotated[int, Query(ge=1, le=100)] = 20) -> SearchResults:
        """Items whose title contains ``query`` (case-insensitive) or whose id is ``query``."""
        cat = recommender.catalogue
        found = await asyncio.to_thread(cat.search, query, limit)
        return SearchResults(items=[CatalogueItem(id=cat.raw_ids[i], title=cat.titles[i]) for i in found])

    @app.get("/health")
    async def health() -> dict:
        """The process is up (no key needed)."""
        return {"status": "ok"}

    @app.get("/ready", dependencies=bearer, responses=_problems(401) | {503: {"description": "Not ready"}})
    async def ready() -> JSONResponse:
        """The models are loaded and the model worker runs; with its settings and counters."""
        body = {"ready": worker.alive, "ranker": recommender.ranker is not None,
                "items": recommender.catalogue.n_items, "candidates": n_candidates, "max_k": max_k,
                "max_batch": worker.max_batch, "max_wait_ms": worker.max_wait * 1000,
                "stats": worker.snapshot()}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/stats", dependencies=bearer, responses=_problems(401))
    async def stats() -> dict:
        """Counters of the model worker (requests, batches, mean batch size, rejections, timeouts)
        and of the ranker's prefix cache (entries, bytes, hits, misses, evictions; null when off)."""
        cache = recommender.prefix_cache
        return worker.snapshot() | {"prefix_cache": None if cache is None else cache.stats()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo_page() -> HTMLResponse:
        return HTMLResponse(page)

    app.add_middleware(_Front, api_key=api_key, max_body_bytes=max_body_bytes)
    return app
