"""The reliability suites (fuzzing, fault injection, tampering, bad files): their fixtures,
and a summary of the cases each ran and what came of them, printed at the end of the session
(also with plain ``pytest -q``) and appended as JSON lines to ``$LLAMAREC_RELIABILITY_LOG``
when that is set."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_helpers import TALLY, own_run


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not TALLY:
        return
    terminalreporter.section("reliability suites")
    for suite, counts in sorted(TALLY.items()):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        terminalreporter.write_line(f"{suite}: {detail}")
    log = os.environ.get("LLAMAREC_RELIABILITY_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            for suite, counts in sorted(TALLY.items()):
                fh.write(json.dumps({"suite": suite, **counts}) + "\n")


@pytest.fixture
def own_tiny_run(copy_tiny_run) -> Callable[..., Path]:
    """``make(name="run")``: a private copy of the tiny run whose ranker reads its own retriever."""
    return lambda name="run": own_run(copy_tiny_run, name)
