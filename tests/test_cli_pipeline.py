"""The ``llamarec run``, ``report`` and ``recommend`` commands, in process and as the console script."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llamarec import cli
from llamarec.cli import app
from llamarec.errors import LlamarecError
from llamarec.pipeline import Recommender
from llamarec.runner import STAGES

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output without whitespace, so that rich's line wrapping does not matter."""
    return "".join(text.split())


def main_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run the console entry point in process; returns the last line of stderr after exit code 1."""
    monkeypatch.setattr(sys, "argv", ["llamarec", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.fixture
def tiny_yaml(tiny_pipeline_values, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_values()), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- run
def test_run_then_rerun_is_up_to_date(tiny_yaml: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("run", "--config", tiny_yaml, "--out", out)
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "stages.json").read_text())) == list(STAGES)
    assert (out / "report.md").is_file() and (out / "plots" / "metrics.png").is_file()
    assert "up to date" not in result.stderr
    assert flat(f"report: {out / 'report.md'}") in flat(result.stdout)

    again = invoke("run", "--config", tiny_yaml, "--out", out)
    assert again.exit_code == 0, again.output
    for stage in STAGES:
        assert f"✓ {stage}: up to date (skipped)" in again.stderr

    forced = invoke("run", "--config", tiny_yaml, "--out", out, "--force", "report", "--force", "evaluate")
    assert forced.exit_code == 0, forced.output
    for stage in ("data", "retriever", "candidates", "ranker"):
        assert f"✓ {stage}: up to date (skipped)" in forced.stderr
    for stage in ("evaluate", "report"):
        assert f"✓ {stage}: up to date" not in forced.stderr and f"✓ {stage} (" in forced.stderr


def test_run_errors(tiny_yaml: Path, tmp_path: Path) -> None:
    both = invoke("run", "--config", tiny_yaml, "--preset", "default", "--out", tmp_path / "a")
    assert isinstance(both.exception, LlamarecError)
    assert "give --config or --preset, not both" in str(both.exception)
    bogus = invoke("run", "--config", tiny_yaml, "--out", tmp_path / "b", "--force", "bogus")
    assert isinstance(bogus.exception, LlamarecError)
    assert "--force bogus: stages are data, retriever, candidates, ranker, evaluate, report" in str(bogus.exception)
    preset = invoke("run", "--preset", "nope", "--out", tmp_path / "c")
    assert isinstance(preset.exception, LlamarecError)
    assert "presets: cpu-quality, default, gpu-quality, paper-beauty, paper-games, paper-ml" in str(preset.exception)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_run_overrides_the_dataset_of_the_config(tiny_yaml: Path, tmp_path: Path) -> None:
    result = invoke("run", "--config", tiny_yaml, "--dataset", "no-such-dataset", "--out", tmp_path / "out")
    assert isinstance(result.exception, LlamarecError)
    assert "no-such-dataset" in str(result.exception)


# --------------------------------------------------------------------------- recommend
def test_recommend_json(tiny_pipeline_run: Path) -> None:
    result = invoke("recommend", "--run", tiny_pipeline_run, "--history", "3", "--history", "Item 4",
                    "--history", "item 5", "-k", "6", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"items", "retrieval_ms", "ranking_ms", "error", "history"}
    assert data["error"] is None and data["history"] == ["3", "4", "5"]
    assert len(data["items"]) == 6
    assert set(data["items"][0]) == {"item_id", "title", "score", "retriever_score", "ranker_score"}
    expected = Recommender.load(tiny_pipeline_run).recommend(["3", "4", "5"], k=6)
    assert [i["item_id"] for i in data["items"]] == [r.item_id for r in expected.items]
    assert [i["score"] for i in data["items"]] == pytest.approx([r.score for r in expected.items], abs=1e-5)


def test_recommend_takes_several_values_after_one_history_option(tiny_pipeline_run: Path) -> None:
    """As the README shows: ``--history "A" "B"``."""
    repeated = invoke("recommend", "--run", tiny_pipeline_run, "--history", "3", "--history", "Item 4",
                      "--no-ranker", "--json")
    several = invoke("recommend", "--run", tiny_pipeline_run, "--history", "3", "Item 4", "--no-ranker", "--json")
    assert several.exit_code == 0, several.output
    items = [i["item_id"] for i in json.loads(several.stdout)["items"]]
    assert items == [i["item_id"] for i in json.loads(repeated.stdout)["items"]]
    one = invoke("recommend", "--run", tiny_pipeline_run, "--history", "3", "--no-ranker", "--json")
    assert items != [i["item_id"] for i in json.loads(one.stdout)["items"]]
    mixed = invoke("recommend", "--run", tiny_pipeline_run, "--history", "3", "5", "--history", "Item 4",
                   "--no-ranker")
    assert isinstance(mixed.exception, LlamarecError)  # the order of the items is unknown


def test_recommend_table_without_the_ranker(tiny_pipeline_run: Path) -> None:
    result = invoke("recommend", "--run", tiny_pipeline_run, "--history", "Item 7", "-k", "3", "--no-ranker")
    assert result.exit_code == 0, result.output
    expected = Recommender.load(tiny_pipeline_run, with_ranker=False).recommend(["7"], k=3)
    for r in expected.items:
        assert r.title in result.stdout
    assert "retrieval" in result.stdout and "ranking" in result.stdout
    data = json.loads(invoke("recommend", "--run", tiny_pipeline_run, "--history", "7", "-k", "3",
                             "--no-ranker", "--json").stdout)
    assert all(i["ranker_score"] is None for i in data["items"])


def test_recommend_errors_are_one_line(tiny_pipeline_run: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    line = main_error(monkeypatch, capsys, "recommend", "--run", tiny_pipeline_run, "--history", "Itme 4",
                      "--no-ranker")
    assert line.startswith("error: history item 'Itme 4' is neither an item id nor a title")
    assert "close matches: Item 4" in line
    line = main_error(monkeypatch, capsys, "recommend", "--run", tiny_pipeline_run, "--history", "4",
                      "-k", "21", "--no-ranker")
    assert line.startswith("error: k=21: must be between 1")
    monkeypatch.setenv("LLAMAREC_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["llamarec", "recommend", "--run", str(tiny_pipeline_run),
                                      "--history", "Itme 4", "--no-ranker"])
    with pytest.raises(LlamarecError):
        cli.main()


# --------------------------------------------------------------------------- report
def test_report_regenerates_the_report(copy_tiny_run) -> None:
    run = copy_tiny_run()
    (run / "report.md").unlink()
    shutil.rmtree(run / "plots")
    result = invoke("report", "--run", run)
    assert result.exit_code == 0, result.output
    assert flat(f"wrote {run / 'report.md'}") in flat(result.stdout)
    assert "## Test, overall" in (run / "report.md").read_text()
    assert (run / "plots" / "training_curves.png").is_file()


def test_report_of_an_unevaluated_run_is_one_error_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = main_error(monkeypatch, capsys, "report", "--run", tmp_path)
    assert line == f"error: {tmp_path}: no metrics.json; the run has not been evaluated yet"


def test_console_script_prints_one_error_line(tmp_path: Path, run_llamarec) -> None:
    proc = run_llamarec("run", "--preset", "nope", "--out", str(tmp_path / "out"),
                        OMP_NUM_THREADS="1", LLAMAREC_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 1
    assert proc.stderr == ("error: unknown preset 'nope'; presets: cpu-quality, default, gpu-quality, "
                           "paper-beauty, paper-games, paper-ml, title-similarity\n")
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()
