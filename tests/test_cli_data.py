"""The ``llamarec data`` commands, in process (CliRunner) and as the installed console script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamarec.cli import app
from llamarec.errors import LlamarecError

runner = CliRunner()

# u0: a b c d; u1: c a b; u2: d b a; u3: a c -> u3 has 2 < 3 and goes with --min-uc 3
INTERACTIONS = """user_id,item_id,timestamp
u0,a,1
u0,b,2
u0,c,3
u0,d,4
u1,c,1
u1,a,2
u1,b,3
u2,d,9
u2,b,8
u2,a,7
u3,a,1
u3,c,2
"""
ITEMS = "item_id,title\na,Alpha\nb,Beta &amp; Co\nc,Gamma\nd,Delta\n"
# 3 users, 4 items, 10 interactions: lengths 4, 3, 3
EXPECTED = {"dataset": "custom", "users": 3, "items": 4, "interactions": 10, "mean_seq_len": 3.33,
            "median_seq_len": 3.0, "density": 0.833333,
            # what each filter dropped (u3 has too few interactions for the k-core)
            "raw_users": 4, "raw_interactions": 12, "dropped_untitled_items": 0,
            "dropped_interactions_untitled_item": 0, "dropped_interactions_unknown_item": 0,
            "dropped_kcore_users": 1, "dropped_kcore_items": 0, "dropped_kcore_interactions": 2}


@pytest.fixture
def custom_dir(tmp_path: Path) -> Path:
    root = tmp_path / "custom"
    root.mkdir()
    (root / "interactions.csv").write_text(INTERACTIONS, encoding="utf-8")
    (root / "items.csv").write_text(ITEMS, encoding="utf-8")
    return root


@pytest.mark.parametrize("args", [["--help"], ["data", "--help"], ["data", "prepare", "--help"]])
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_prepare_help_lists_options() -> None:
    out = runner.invoke(app, ["data", "prepare", "--help"]).output
    for option in ("--dataset", "--data-dir", "--min-uc", "--min-sc", "--json"):
        assert option in out


def test_data_list() -> None:
    result = runner.invoke(app, ["data", "list"], terminal_width=200)
    assert result.exit_code == 0
    for name in ("ml-latest-small", "ml-100k", "beauty", "games", "custom"):
        assert name in result.output


def test_prepare_json(custom_dir: Path, llamarec_cache: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "--dataset", "custom", "--data-dir", str(custom_dir),
                                 "--min-uc", "3", "--min-sc", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED
    assert len(list((llamarec_cache / "processed").iterdir())) == 1
    # second run is served from the cache and prints the same
    again = runner.invoke(app, ["data", "prepare", "-d", "custom", "--data-dir", str(custom_dir),
                                "--min-uc", "3", "--min-sc", "1", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == EXPECTED


def test_prepare_with_random_ties(custom_dir: Path, llamarec_cache: Path) -> None:
    """Same statistics (ties only reorder), cached apart from the default order."""
    args = ["data", "prepare", "-d", "custom", "--data-dir", str(custom_dir), "--min-uc", "3", "--min-sc", "1"]
    result = runner.invoke(app, [*args, "--ties", "random", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED
    assert runner.invoke(app, [*args, "--json"]).exit_code == 0
    assert len(list((llamarec_cache / "processed").iterdir())) == 2
    bad = runner.invoke(app, [*args, "--ties", "time"])
    assert bad.exit_code != 0 and "ties='time': use one of item, random" in str(bad.exception)


def test_prepare_table(custom_dir: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "-d", "custom", "--data-dir", str(custom_dir),
                                 "--min-uc", "3", "--min-sc", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "users" in result.output and "interactions" in result.output
    assert "0.833333" in result.output


def test_prepare_default_core_empties_small_data(custom_dir: Path) -> None:
    result = runner.invoke(app, ["data", "prepare", "-d", "custom", "--data-dir", str(custom_dir), "--json"])
    assert result.exit_code != 0
    assert isinstance(result.exception, LlamarecError)
    assert "5/5-core" in str(result.exception)


def test_prepare_bad_input_in_process(custom_dir: Path) -> None:
    (custom_dir / "interactions.csv").write_text(INTERACTIONS + "u4,a,later\n", encoding="utf-8")
    result = runner.invoke(app, ["data", "prepare", "-d", "custom", "--data-dir", str(custom_dir)])
    assert result.exit_code != 0
    assert isinstance(result.exception, LlamarecError)
    assert "line 14: column 'timestamp' has value 'later'" in str(result.exception)


def test_prepare_missing_option() -> None:
    result = runner.invoke(app, ["data", "prepare"])
    assert result.exit_code == 2
    assert "--dataset" in result.output


def test_script_prepare_json(custom_dir: Path, run_llamarec) -> None:
    proc = run_llamarec("data", "prepare", "-d", "custom", "--data-dir", str(custom_dir),
                      "--min-uc", "3", "--min-sc", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == EXPECTED


def test_script_bad_input_is_one_error_line(custom_dir: Path, run_llamarec) -> None:
    (custom_dir / "items.csv").write_text(ITEMS + "b,Beta again\n", encoding="utf-8")
    proc = run_llamarec("data", "prepare", "-d", "custom", "--data-dir", str(custom_dir))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert f"{custom_dir / 'items.csv'} lines 3 and 6: duplicate item id" in lines[0]
    assert "Traceback" not in proc.stderr


def test_script_unknown_dataset_and_missing_dir(tmp_path: Path, run_llamarec) -> None:
    proc = run_llamarec("data", "prepare", "-d", "nope", "--data-dir", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: unknown dataset 'nope'; known datasets: ml-latest-small, ml-100k, beauty, games, custom"]
