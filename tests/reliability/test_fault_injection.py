"""Fault injection (issue 14): SIGKILL at seeded random points of data preparation, retriever
training, candidate generation, ranker fine-tuning, evaluation and ``llamarec run`` on the tiny
configuration; each rerun must end with the same artifacts as an uninterrupted run (bit for
bit on CPU, timing fields aside). A full disk (a file-size limit, and a small tmpfs where one
can be mounted) and a read-only run directory must give one clear line and leave the earlier
artifacts intact.

The commands run in processes forked from a server that imported llamarec once
(``forkserver.py``: the kill points are the N-th temporary file, the N-th ``os.replace`` — just
before or after it — the N-th optimizer step, or a timed SIGKILL), and the console script
itself is killed at random times (``python -m llamarec run``). Paths are relative to each
trial's directory, so that a trial can start from a copy of an earlier state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from reliability_helpers import tally

from llamarec.manifest import verify

pytestmark = pytest.mark.slow

SEED = 14
TIMING_KEYS = {"train_seconds", "seconds"}
SUITE = "fault injection: SIGKILL and rerun"


# --------------------------------------------------------------------------- the fork server
class ForkServer:
    def __init__(self, workdir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LLAMAREC_DEBUG"}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=workdir)
        assert json.loads(self._read(300))["ready"]

    def _read(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            raise AssertionError("the fork server did not answer in time")
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return line

    def run(self, cwd: Path, args: list[str], *, kill: dict | None = None, fsize: int | None = None,
            events: bool = False, log: str = "log.txt") -> dict:
        job = {"args": [str(a) for a in args], "cwd": str(cwd), "env": {"LLAMAREC_CACHE": str(cwd / "cache")},
               "log": str(cwd / log), "kill": kill, "fsize": fsize,
               "events": str(cwd / "events.json") if events else None}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        result = json.loads(self._read(600))
        result["log"] = (cwd / log).read_text(errors="replace")
        if events:
            result["events"] = json.loads((cwd / "events.json").read_text())
            (cwd / "events.json").unlink()
        return result

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


# --------------------------------------------------------------------------- comparing runs
def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def normalised(path: Path) -> object:
    """A file's content for comparison: JSON without timing fields (peft writes the LoRA target
    modules as a set, in hash order), the report without seconds, other files by sha256."""
    if path.name == "manifest.json":
        files = json.loads(path.read_text())["files"]
        # JSON files may differ in timing fields and set order: their content is compared on its own
        return {k: (None if k.endswith(".json") else v) for k, v in files.items()}
    if path.suffix == ".json":
        value = _strip(json.loads(path.read_text()))
        if isinstance(value, dict) and isinstance(value.get("target_modules"), list):
            value["target_modules"] = sorted(value["target_modules"])
        return value
    if path.name == "report.md":
        return re.sub(r"\(\d+ s\)", "(N s)", path.read_text())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_of(root: Path) -> dict[str, Path]:
    """Non-hidden files under ``root`` (hidden ones are temporary files a kill left behind)."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def hidden_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


def differences(want_root: Path, got_root: Path) -> list[str]:
    want, got = files_of(want_root), files_of(got_root)
    out = [f"missing {n}" for n in sorted(set(want) - set(got))] + [f"extra {n}" for n in sorted(set(got) - set(want))]
    out += [f"differs {n}" for n in sorted(set(want) & set(got)) if normalised(want[n]) != normalised(got[n])]
    for manifest in got_root.rglob("manifest.json"):
        try:
            verify(manifest.parent, ".")
        except Exception as exc:  # noqa: BLE001
            out.append(f"manifest {manifest.relative_to(got_root)}: {exc}")
    return out


def intact(root: Path) -> list[str]:
    """What a kill may never leave: a JSON or safetensors file that does not read."""
    from safetensors import safe_open

    bad = []
    for name, path in files_of(root).items():
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as fh:
                    [fh.get_tensor(k) for k in fh.keys()]
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{name}: {exc}")
    return bad


def lagging_manifest_entries(root: Path) -> int:
    """Files killed between their atomic write and their manifest entry (the rerun redoes them)."""
    n = 0
    for manifest in root.rglob("manifest.json"):
        files = json.loads(manifest.read_text())["files"]
        for key, entry in files.items():
            path = manifest.parent / key
            if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                n += 1
    return n


# --------------------------------------------------------------------------- the tiny world
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_values, tiny_data_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("faults")
    values = tiny_pipeline_values()
    configs = root / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(yaml.safe_dump(values))
    (configs / "retriever.yaml").write_text(yaml.safe_dump(
        {**values["retriever"], "dataset": values["dataset"], "data_dir": values["data_dir"]}))
    (configs / "ranker.yaml").write_text(yaml.safe_dump({**values["ranker"], "retriever": "run/retriever"}))
    cand = values["candidates"]
    commands = {
        "data": ["data", "prepare", "--dataset", "custom", "--data-dir", tiny_data_dir],
        "retriever": ["retrieve", "train", "--out", "run/retriever", "--config", configs / "retriever.yaml"],
        "candidates": ["retrieve", "candidates", "--run", "run/retriever", "--k", cand["k"],
                       "--train-prefixes", cand["train_prefixes"], "--device", "cpu"],
        "ranker": ["rank", "train", "--out", "run/ranker", "--config", configs / "ranker.yaml"],
        "evaluate": ["rank", "evaluate", "--ranker", "run/ranker", "--out", "run/ranker/eval",
                     "--limit", values["evaluation"]["limit"]],
    }
    return {"root": root, "configs": configs, "commands": commands,
            "run": ["run", "--config", configs / "tiny.yaml", "--out", "run"]}


@pytest.fixture(scope="module")
def server(world: dict):
    server = ForkServer(world["root"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def calibrated(world: dict, server: ForkServer) -> dict:
    """Every stage run once without faults, one after the other (the state after each is kept
    as the reference), and ``llamarec run`` once; with each command's event counts and time."""
    root, out = world["root"], {"states": {}, "events": {}, "seconds": {}}
    state = root / "state-initial"
    (state / "cache").mkdir(parents=True)
    out["states"]["initial"] = state
    for name, args in world["commands"].items():
        nxt = root / f"state-{name}"
        shutil.copytree(state, nxt)
        result = server.run(nxt, args, events=True)
        assert result["code"] == 0, result["log"][-3000:]
        out["states"][name], out["events"][name], out["seconds"][name] = nxt, result["events"], result["seconds"]
        state = nxt
    pipe = root / "pipeline"
    (pipe / "cache").mkdir(parents=True)
    result = server.run(pipe, world["run"], events=True)
    assert result["code"] == 0, result["log"][-3000:]
    out["states"]["run"], out["events"]["run"], out["seconds"]["run"] = pipe, result["events"], result["seconds"]
    return out


def test_the_stage_commands_write_what_llamarec_run_writes(calibrated: dict) -> None:
    """The references agree: the stages run one by one end as ``llamarec run`` does."""
    staged, pipe = calibrated["states"]["evaluate"] / "run", calibrated["states"]["run"] / "run"
    for part in ("retriever", "ranker"):
        assert differences(pipe / part, staged / part) == []


def draw_kill(rng: random.Random, events: dict[str, int], seconds: float) -> dict:
    kinds = [k for k in ("write", "replace-before", "replace-after", "step") if events.get(k)] + ["time"]
    kind = rng.choice(kinds)
    if kind == "time":
        return {"kind": "time", "seconds": round(rng.uniform(0.02, 0.95) * seconds, 3)}
    return {"kind": kind, "n": rng.randint(1, events[kind])}


# (command, trials, kills per trial before the rerun that must finish)
PLAN = [("data", 3, 1), ("retriever", 5, 1), ("candidates", 3, 1), ("ranker", 5, 1), ("evaluate", 3, 1),
        ("run", 5, 2)]
BEFORE = {"data": "initial", "retriever": "data", "candidates": "retriever", "ranker": "candidates",
          "evaluate": "ranker", "run": None}


def test_sigkill_and_rerun_end_with_the_artifacts_of_an_uninterrupted_run(world: dict, server: ForkServer,
                                                                        calibrated: dict) -> None:
    trials, outcomes, where = world["root"] / "trials", Counter(), Counter()
    failures: list[str] = []
    for command, n_trials, kills in PLAN:
        args = world["run"] if command == "run" else world["commands"][command]
        reference = calibrated["states"][command]
        for trial in range(n_trials):
            rng = random.Random(f"{SEED}-{command}-{trial}")
            t = trials / f"{command}-{trial}"
            if BEFORE[command] is None:
                (t / "cache").mkdir(parents=True)
            else:
                shutil.copytree(calibrated["states"][BEFORE[command]], t)
            drawn = []
            for _ in range(kills):
                kill = draw_kill(rng, calibrated["events"][command], calibrated["seconds"][command])
                drawn.append(kill)
                result = server.run(t, args, kill=kill)
                if result["code"] == -signal.SIGKILL:
                    outcomes[f"{command} killed"] += 1
                    where[kill["kind"]] += 1
                    failures += [f"{command}-{trial} after a kill: {b}" for b in intact(t)]
                    outcomes["kills that left a manifest entry behind its file"] += lagging_manifest_entries(t) > 0
                elif result["code"] == 0:
                    outcomes[f"{command} finished before its kill point"] += 1
                else:
                    failures.append(f"{command}-{trial} {kill}: exit {result['code']}: {result['log'][-2000:]}")
            result = server.run(t, args, log="rerun.txt")
            if result["code"] != 0:
                failures.append(f"{command}-{trial} rerun: exit {result['code']}: {result['log'][-2000:]}")
                continue
            if "Traceback" in result["log"]:
                failures.append(f"{command}-{trial} rerun printed a traceback: {result['log'][-2000:]}")
            part = "cache/processed" if command == "data" else "run"
            diff = differences(reference / part, t / part)
            failures += [f"{command}-{trial} (killed at {drawn}): {d}" for d in diff]
            outcomes["rerun identical to the uninterrupted run" if not diff else "rerun differs"] += 1
            outcomes["temporary files left by kills"] += hidden_files(t)
    kills = sum(v for k, v in outcomes.items() if k.endswith(" killed"))
    print(f"fault injection: {kills} SIGKILLs ({dict(where)}), outcomes {dict(outcomes)}")
    for key, value in outcomes.items():
        tally(SUITE, key, value)
    assert not failures, "\n".join(failures)
    assert kills >= 20


# --------------------------------------------------------------------------- the console script
def test_the_console_script_killed_at_random_times_resumes(world: dict, calibrated: dict, tmp_path: Path) -> None:
    """``python -m llamarec run`` SIGKILLed twice at random times once the data stage is done,
    then rerun: the same artifacts as the uninterrupted run."""
    env = {k: v for k, v in os.environ.items() if k != "LLAMAREC_DEBUG"}
    env.update(OMP_NUM_THREADS="1", LLAMAREC_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    rng, killed, finished = random.Random(f"{SEED}-console"), 0, False
    budget = calibrated["seconds"]["run"]
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-m", "llamarec", *map(str, world["run"])], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = threading.Event()
        lines: list[str] = []

        def watch(stream=proc.stderr, lines=lines, started=started) -> None:
            for line in stream:
                lines.append(line)
                if "✓ data" in line:
                    started.set()
            started.set()

        threading.Thread(target=watch, daemon=True).start()
        assert started.wait(300)
        time.sleep(rng.uniform(0.0, 0.9) * budget)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(60)
        if code == -signal.SIGKILL:
            killed += 1
            assert intact(tmp_path / "run") == []
        else:
            assert code == 0, "".join(lines)[-3000:]
            finished = True
            break
    result = subprocess.run([sys.executable, "-m", "llamarec", *map(str, world["run"])], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert differences(calibrated["states"]["run"] / "run", tmp_path / "run") == []
    print(f"console script: {killed} SIGKILLs at random times, then rerun identical"
          + (" (finished before a kill)" if finished else ""))
    tally(SUITE, "console script killed", killed)
    tally(SUITE, "console script rerun identical")


# --------------------------------------------------------------------------- full disk, read-only
def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error: ")]


def test_a_file_size_limit_stops_the_run_with_one_line_and_a_rerun_completes(world: dict, server: ForkServer,
                                                                          calibrated: dict, tmp_path: Path) -> None:
    """RLIMIT_FSIZE below the candidates file: the writes past it fail with EFBIG (Python
    ignores SIGXFSZ), the run stops naming the file; what was written before is intact."""
    (tmp_path / "cache").mkdir()
    limit = (calibrated["states"]["run"] / "run" / "retriever" / "candidates.safetensors").stat().st_size - 1
    result = server.run(tmp_path, world["run"], fsize=limit)
    lines = error_lines(result["log"])
    assert result["code"] == 1 and len(lines) == 1 and "Traceback" not in result["log"], result["log"][-3000:]
    assert "candidates.safetensors: cannot write (File too large)" in lines[0], lines
    assert intact(tmp_path / "run") == [] and lagging_manifest_entries(tmp_path / "run") == 0
    verify(tmp_path / "run" / "retriever", ".")
    assert not (tmp_path / "run" / "retriever" / "candidates.safetensors").exists()
    result = server.run(tmp_path, world["run"], log="rerun.txt")
    assert result["code"] == 0, result["log"][-3000:]
    assert differences(calibrated["states"]["run"] / "run", tmp_path / "run") == []
    tally("full disk and read-only directory", "file-size limit: one-line error, then identical rerun")
    print(f"file-size limit {limit} bytes: {lines[0]}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_tmpfs_stops_the_run_with_one_line_and_a_rerun_completes(world: dict, server: ForkServer,
                                                                       calibrated: dict, tmp_path: Path) -> None:
    reference = calibrated["states"]["run"] / "run"
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in reference.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "disk", f"{used // 2 // 1024}k") as disk:
        (disk / "cache").mkdir()
        result = server.run(disk, world["run"], log="../log.txt")
        lines = error_lines(result["log"])
        assert result["code"] == 1 and len(lines) == 1 and "Traceback" not in result["log"], result["log"][-3000:]
        assert "No space left on device" in lines[0], lines
        assert intact(disk / "run") == []  # (a manifest may lag behind a file written just before the disk
        # filled up; the rerun redoes that stage)
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        result = server.run(disk, world["run"], log="../rerun.txt")
        assert result["code"] == 0, result["log"][-3000:]
        assert differences(reference, disk / "run") == []
    tally("full disk and read-only directory", "full tmpfs: one-line error, then identical rerun")
    print(f"tmpfs of {used // 2 // 1024} KiB: {lines[0]}")


def test_a_read_only_run_directory_gives_one_line_and_is_left_intact(world: dict, server: ForkServer,
                                                                    calibrated: dict, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "64m") as ro:
        shutil.copytree(calibrated["states"]["run"], ro, dirs_exist_ok=True)
        (ro / "report.md").unlink(missing_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = {n: p.read_bytes() for n, p in files_of(ro).items()}
        outcomes = []
        for args in (["report", "--run", "run"], world["run"], ["run", "--config", world["configs"] / "tiny.yaml",
                                                                "--out", "run", "--force", "evaluate"]):
            result = server.run(ro, args, log="../log.txt")
            lines = error_lines(result["log"])
            assert result["code"] == 1 and len(lines) == 1 and "Traceback" not in result["log"], result["log"][-3000:]
            assert "Read-only file system" in lines[0], lines
            outcomes.append(lines[0])
        # Reading still works: recommending needs no write.
        result = server.run(ro, ["recommend", "--run", "run", "--history", "1", "2", "3", "--json"], log="../r.txt")
        assert result["code"] == 0, result["log"][-3000:]
        assert {n: p.read_bytes() for n, p in files_of(ro).items()} == before
    tally("full disk and read-only directory", "read-only directory: one-line errors, files unchanged", 3)
    print("read-only run directory:", *outcomes, sep="\n  ")
