"""Tampering (issue 14): every file of a finished tiny run truncated, bit-flipped, deleted or
replaced (by another file of the run of the same kind: other weights, another JSON file), then
``llamarec recommend``, ``llamarec report`` and ``llamarec rank evaluate``: each must give one
error line and exit code 1, or the same result as the untouched run (the file is not one it
reads, or one it rewrites), never a traceback or a wrong result.

Each command runs on the files it reads or writes (``READS``); that these are all it reads is
checked once by running it with every other file deleted. All paths are relative to the case
directory, so that every case runs on a fresh copy at the same place.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
from reliability_helpers import one_line_error, tally

HISTORY = ("1", "2", "3")
MODES = ("truncated", "bit-flipped", "deleted", "replaced")
SUITE = "tampering: files x modes x commands"

COMMANDS = {
    "recommend": ("recommend", "--run", "run", "--history", *HISTORY, "--json"),
    "report": ("report", "--run", "run"),
    "rank evaluate": ("rank", "evaluate", "--ranker", "run/ranker", "--out", "eval", "--limit", "4", "--json"),
}
# What each command reads or writes (a prefix covers a directory).
READS = {
    "recommend": ("manifest.json", "metrics.json", "retriever/manifest.json", "retriever/config.json",
                  "retriever/model.safetensors", "retriever/items.parquet", "retriever/candidates.json",
                  "ranker/manifest.json", "ranker/rank_config.json", "ranker/prompt.json", "ranker/adapter/"),
    "report": ("manifest.json", "metrics.json", "retriever/manifest.json", "retriever/config.json",
               "ranker/eval/manifest.json", "ranker/eval/ranks.csv", "report.md", "plots/"),
    "rank evaluate": ("ranker/manifest.json", "ranker/rank_config.json", "ranker/prompt.json", "ranker/adapter/",
                      "retriever/manifest.json", "retriever/config.json", "retriever/candidates.safetensors"),
}


def reads(command: str, name: str) -> bool:
    return any(name == r or (r.endswith("/") and name.startswith(r)) for r in READS[command])


def files_of(run: Path) -> list[str]:
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())


def tamper(run: Path, name: str, mode: str) -> None:
    path = run / name
    data = path.read_bytes()
    if mode == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif mode == "bit-flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x04
        path.write_bytes(bytes(flipped))
    elif mode == "deleted":
        path.unlink()
    else:  # replaced by another file of the run of the same kind, else by as many random bytes
        others = [n for n in files_of(run) if n != name and Path(n).suffix == path.suffix
                  and (run / n).read_bytes() != data]
        others.sort(key=lambda n: (Path(n).name != path.name, n))  # same name first (another dir's)
        path.write_bytes((run / others[0]).read_bytes() if others else hashlib.sha256(data).digest() * 8)


def outputs(case: Path, command: str, stdout: str) -> object:
    """What a command produced, for comparison with the untouched run."""
    if command == "recommend":
        result = json.loads(stdout)
        return {"items": result["items"], "history": result["history"]}
    if command == "report":
        return {"report": (case / "run" / "report.md").read_text(),
                **{p.name: p.read_bytes() for p in sorted((case / "run" / "plots").glob("*.png"))}}
    return {"metrics": json.loads((case / "eval" / "metrics.json").read_text()),
            "ranks": (case / "eval" / "ranks.csv").read_text()}


@pytest.fixture
def world(own_tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> dict:
    """The untouched run and what each command gives on it. Its ranker names its retriever as
    runs saved before ranker-relative paths did (relative to the working directory), so the
    tampered copies exercise that reading too; the other reliability tests use today's form."""
    base = own_tiny_run("base")
    path = base / "ranker" / "rank_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "retriever": "run/retriever"}, indent=2) + "\n")
    from llamarec.manifest import record

    record(base / "ranker", path)
    case = tmp_path / "case"
    monkeypatch.chdir(tmp_path)
    baseline = {}
    for command, args in COMMANDS.items():
        fresh(base, case)
        monkeypatch.chdir(case)
        code, out, err = one_line_error(capsys, monkeypatch, *args)
        assert code == 0, err
        baseline[command] = outputs(case, command, out)
    return {"base": base, "case": case, "baseline": baseline, "files": files_of(base)}


def fresh(base: Path, case: Path) -> Path:
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    shutil.copytree(base, case / "run")
    return case


def run_case(world: dict, command: str, capsys, monkeypatch) -> tuple[str, str]:
    """(outcome, detail) of one command on the tampered case directory."""
    case = world["case"]
    monkeypatch.chdir(case)
    code, out, err = one_line_error(capsys, monkeypatch, *COMMANDS[command])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    if code == 1 and len(errors) == 1:
        return "one-line error", errors[0]
    if code != 0:
        return "FAILED", f"exit {code}: {err[-1500:]}"
    try:
        produced = None if command == "report" else json.loads(out)
    except ValueError:
        return "FAILED", f"exit 0 without the JSON result: {out[:600]!r} {err[-1500:]}"
    if not all(math.isfinite(x) for x in numbers(produced)):
        return "FAILED", f"NaN or infinity in the output: {out[:500]}"
    if outputs(case, command, out) != world["baseline"][command]:
        return "FAILED", "exit 0 with a result that differs from the untouched run's"
    return "same result as the untouched run", ""


def numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [value] if isinstance(value, float) else []


def test_the_declared_reads_are_all_a_command_reads(world: dict, capsys, monkeypatch) -> None:
    """With every file outside READS deleted, each command gives the untouched run's result."""
    for command in COMMANDS:
        case = fresh(world["base"], world["case"])
        for name in world["files"]:
            if not reads(command, name):
                (case / "run" / name).unlink()
        outcome, detail = run_case(world, command, capsys, monkeypatch)
        assert outcome == "same result as the untouched run", (command, detail)


def sweep(world: dict, names: list[str], modes: tuple[str, ...], capsys, monkeypatch, suite: str) -> Counter:
    counts, failures, named, unchanged = Counter(), [], Counter(), []
    for name in names:
        for mode in modes:
            for command in COMMANDS:
                if not reads(command, name):
                    counts["file not read by the command (unaffected)"] += 1
                    continue
                fresh(world["base"], world["case"])
                tamper(world["case"] / "run", name, mode)
                outcome, detail = run_case(world, command, capsys, monkeypatch)
                after = world["case"] / "run" / name
                if outcome.startswith("same") and after.is_file() \
                        and after.read_bytes() == (world["base"] / name).read_bytes():
                    outcome = "rewritten by the command (regenerated)"
                counts[outcome] += 1
                if outcome.startswith("same"):
                    unchanged.append(f"{name} {mode} -> {command}")
                if outcome == "FAILED":
                    failures.append(f"{name} {mode} -> {command}: {detail}")
                elif outcome == "one-line error":
                    named["error names the tampered file" if Path(name).name in detail else
                          "error names another file"] += 1
    for key, value in (counts + named).items():
        tally(suite, key, value)
    cases = len(names) * len(modes)
    print(f"tampering: {len(names)} files x {len(modes)} modes = {cases} tampered runs; command outcomes "
          f"{dict(counts)}; {dict(named)}; same result as the untouched run: {'; '.join(unchanged)}")
    assert not failures, "\n".join(failures)
    return counts


def test_tampering_quick(world: dict, capsys, monkeypatch) -> None:
    """The files every command reads, each damaged one way."""
    names = [n for n in world["files"] if all(reads(c, n) for c in ("recommend", "rank evaluate"))]
    assert names
    counts = Counter()
    for i, name in enumerate(names):
        counts += sweep(world, [name], (MODES[i % len(MODES)],), capsys, monkeypatch, "tampering (quick)")
    assert counts["one-line error"] >= len(names)


@pytest.mark.slow
def test_tampering_every_file_every_way(world: dict, capsys, monkeypatch) -> None:
    counts = sweep(world, world["files"], MODES, capsys, monkeypatch, SUITE)
    tally(SUITE, "tampered runs (files x modes)", len(world["files"]) * len(MODES))
    assert counts["one-line error"] > 0
