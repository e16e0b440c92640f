"""Helpers of the reliability suites: the CLI run in process, a tiny run that owns its files,
and the tally of cases and outcomes each suite reports (printed by this folder's conftest
when the session ends)."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from llamarec import cli

# Counts the suites report (case -> outcome -> n), printed when the session ends so that they
# show with plain `pytest -q` (no -rA or -s needed), and written to $LLAMAREC_RELIABILITY_LOG
# as JSON lines when that is set.
TALLY: dict[str, Counter] = {}


def tally(suite: str, outcome: str, n: int = 1) -> None:
    TALLY.setdefault(suite, Counter())[outcome] += n


def one_line_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                   *args: object) -> tuple[int, str, str]:
    """Run ``llamarec ARGS`` through the console entry point in process; returns (exit code,
    stdout, stderr). A traceback or an exception other than SystemExit fails the test."""
    capsys.readouterr()  # what the test printed before is not the command's output
    monkeypatch.setattr(sys, "argv", ["llamarec", *map(str, args)])
    monkeypatch.delenv("LLAMAREC_DEBUG", raising=False)
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return code, out.out, out.err


def error_line(capsys, monkeypatch, *args: object) -> str:
    """The one error line of a command that must fail with exit code 1."""
    code, _, err = one_line_error(capsys, monkeypatch, *args)
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 1 and len(lines) == 1, (code, err)
    return lines[0]


def own_run(copy: Callable[..., Path], name: str = "run") -> Path:
    """A copy of the tiny pipeline run; its ranker reads the copy's own retriever, because the
    saved ranker config names it relative to the ranker directory."""
    run = copy(name)
    assert json.loads((run / "ranker" / "rank_config.json").read_text())["retriever"] == "../retriever"
    return run


def drop_manifests(root: Path) -> None:
    """Make ``root`` look like a run from before manifests."""
    for path in root.rglob("manifest.json"):
        path.unlink()


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
