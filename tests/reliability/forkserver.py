"""A fork server for fault injection: imports llamarec (torch, transformers, peft) once, then
runs each job — a ``llamarec`` command line — in a forked child process, which a seeded fault
kills with SIGKILL at a chosen point, so that a kill costs no interpreter start.

Protocol: one JSON object per line on stdin, one per line on stdout. A job is
``{"args": [...], "cwd": dir, "env": {...}, "log": file, "events": file or null,
"kill": null | {"kind": K, "n": N} | {"kind": "time", "seconds": S}, "fsize": bytes or null}``.
Kill kinds, counted in the child: ``write`` (the N-th temporary file or directory an atomic
write creates, before anything is written to it), ``replace-before`` / ``replace-after`` (just
before / after the N-th ``os.replace``, the commit of an atomic write) and ``step`` (after the
N-th optimizer step); ``time`` is a SIGKILL from this server S seconds after the fork. The
reply is ``{"code": exit code, or -9 when killed, "seconds": wall time}``; ``events`` receives
the child's event counts when it exits by itself. ``fsize`` sets RLIMIT_FSIZE in the child (a
write past it fails with EFBIG, as on a full disk).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def preload() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import llamarec.cli  # noqa: F401
    import llamarec.pipeline  # noqa: F401
    import llamarec.ranking.evaluate  # noqa: F401
    import llamarec.ranking.finetune  # noqa: F401
    import llamarec.report  # noqa: F401
    import llamarec.retrieval.candidates  # noqa: F401
    import llamarec.retrieval.train  # noqa: F401
    import llamarec.runner  # noqa: F401


def install_faults(kill: dict | None, counts: dict[str, int]) -> None:
    """Count the events of the child and SIGKILL it at the chosen one."""
    import tempfile

    import torch

    def event(kind: str) -> None:
        counts[kind] = counts.get(kind, 0) + 1
        if kill is not None and kill["kind"] == kind and counts[kind] == kill["n"]:
            os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_mkstemp, real_mkdtemp = os.replace, tempfile.mkstemp, tempfile.mkdtemp
    real_step = torch.optim.AdamW.step

    def replace(src, dst, *args, **kwargs):
        event("replace-before")
        result = real_replace(src, dst, *args, **kwargs)
        event("replace-after")
        return result

    def mkstemp(*args, **kwargs):
        result = real_mkstemp(*args, **kwargs)
        event("write")
        return result

    def mkdtemp(*args, **kwargs):
        result = real_mkdtemp(*args, **kwargs)
        event("write")
        return result

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        event("step")
        return result

    os.replace, tempfile.mkstemp, tempfile.mkdtemp = replace, mkstemp, mkdtemp
    torch.optim.AdamW.step = step


def child(job: dict) -> None:
    import resource
    import traceback

    os.chdir(job["cwd"])
    os.environ.update(job.get("env") or {})
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if job.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    counts: dict[str, int] = {}
    install_faults(job.get("kill"), counts)
    from llamarec import cli

    sys.argv = ["llamarec", *job["args"]]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - any other exception is what the suite looks for
        traceback.print_exc()
        code = 70
    if job.get("events"):
        with open(job["events"], "w", encoding="utf-8") as fh:
            json.dump(counts, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve() -> None:
    preload()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            try:
                child(job)
            finally:
                os._exit(71)
        kill = job.get("kill") or {}
        deadline = start + kill["seconds"] if kill.get("kind") == "time" else None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
            if done:
                break
            if time.perf_counter() >= deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = None
            else:
                time.sleep(0.005)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - start}),
              flush=True)


if __name__ == "__main__":
    serve()
