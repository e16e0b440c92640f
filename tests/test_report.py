"""report.md and the plots of a run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from llamarec.errors import LlamarecError
from llamarec.manifest import forget
from llamarec.report import METHODS, METRICS, write_report


def section(text: str, heading: str) -> str:
    """The text under the first heading that starts with ``heading``, up to the next heading."""
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def table_rows(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in METHODS.values():
            rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


@pytest.fixture
def run(copy_tiny_run) -> Path:
    """A copy of the tiny run without its report."""
    run = copy_tiny_run()
    (run / "report.md").unlink()
    shutil.rmtree(run / "plots")
    return run


def test_the_report_has_both_tables_with_the_metrics(run: Path) -> None:
    path = write_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["ranker"]["test"]
    assert text.startswith("# llamarec run: custom\n")
    assert "36 users, 48 items, 406 interactions" in text
    for heading, view in (("## Test, overall", "overall"), ("## Test, valid subset", "valid_subset")):
        part = section(text, heading)
        assert "| method | " + " | ".join(METRICS) + " |" in part
        rows = table_rows(part)
        assert list(rows) == list(METHODS.values())
        for key, name in METHODS.items():
            assert rows[name] == pytest.approx([test[view][key][m] for m in METRICS], abs=5e-5), (view, key)
    assert f"## Test, overall ({test['users']} users)" in text
    assert (f"({test['valid_subset_users']} users whose true item is among the candidates; "
            f"measured on {test['evaluated_users']} of them)") in text
    assert f"fusion weight {metrics['ranker']['fusion']['weight']} (validation NDCG@10)" in text
    part = section(text, "## Test, difference to the retriever")
    c = test["comparisons"]["fusion_vs_retriever"]["overall"]["NDCG@10"]
    assert f"| fusion - retriever | overall | {c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] |" in part


def test_the_report_links_plots_that_exist(run: Path) -> None:
    text = write_report(run).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["plots/metrics.png", "plots/rank_shift.png", "plots/training_curves.png"]
    for link in links:
        assert (run / link).read_bytes().startswith(b"\x89PNG"), link
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(Path(link).name for link in links)


def test_without_per_user_ranks_the_rank_shift_plot_is_left_out(run: Path) -> None:
    (run / "ranker" / "eval" / "ranks.csv").unlink()
    with pytest.raises(LlamarecError, match="ranks.csv: missing, though manifest.json lists it"):
        write_report(run)
    forget(run / "ranker" / "eval", run / "ranker" / "eval" / "ranks.csv")  # evaluated before ranks were saved
    text = write_report(run).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["plots/metrics.png", "plots/training_curves.png"]
    assert all((run / link).is_file() for link in links)


def test_the_report_is_regenerated_the_same(run: Path) -> None:
    first = write_report(run).read_text()
    assert write_report(run).read_text() == first


def test_no_metrics_is_an_error(run: Path, tmp_path: Path) -> None:
    (run / "metrics.json").unlink()
    with pytest.raises(LlamarecError, match="metrics.json: missing, though manifest.json lists it"):
        write_report(run)
    forget(run, run / "metrics.json")  # a run not evaluated yet
    with pytest.raises(LlamarecError, match="no metrics.json; the run has not been evaluated yet"):
        write_report(run)
    assert not (run / "report.md").exists()
    with pytest.raises(LlamarecError, match="no metrics.json"):
        write_report(tmp_path / "nowhere")
