"""Defect 3 of issue 14: an edited or damaged file of a run gives one line naming the file and
what is wrong, and exit code 1 — never a traceback. Most cases drop the run's manifests first
(a run from before manifests, or one whose manifest was edited too), so that the file's own
reader is what is tested; with the manifest, every such edit is a "mismatch with manifest.json"
line (see test_manifest.py and test_tampering.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from reliability_helpers import drop_manifests, error_line, one_line_error

HISTORY = ["1", "2", "3"]


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def set_in(keys: tuple[str, ...], value) -> Callable[[dict], None]:
    def change(values: dict) -> None:
        for key in keys[:-1]:
            values = values[key]
        if value is KeyError:
            del values[keys[-1]]
        else:
            values[keys[-1]] = value

    return change


RECOMMEND = ("recommend", "--history", *HISTORY)
# (case, file, how it is damaged, command, what the line says)
CASES = [
    ("truncated config", "retriever/config.json", lambda p: p.write_bytes(p.read_bytes()[:40]), RECOMMEND,
     "config.json: cannot read (Expecting"),
    ("non-UTF-8 config", "retriever/config.json", lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()), RECOMMEND,
     "config.json: cannot read ('utf-8' codec can't decode"),
    ("config not an object", "retriever/config.json", lambda p: p.write_text("[1, 2]"), RECOMMEND,
     "config.json: expected a JSON object"),
    ("config without its model section", "retriever/config.json", lambda p: edit_json(p, set_in(("model",), KeyError)),
     RECOMMEND, "config.json: not a valid retriever config (no 'model' section)"),
    ("config with an unknown model field", "retriever/config.json",
     lambda p: edit_json(p, set_in(("model", "width"), 3)), RECOMMEND,
     "config.json: retriever config: unknown field(s) width"),
    ("config shape disagrees with the weights", "retriever/config.json",
     lambda p: edit_json(p, set_in(("model", "hidden"), 16)), RECOMMEND,
     "model.safetensors: weights do not fit the model in config.json (blocks.0.ffn.net.0.bias: (32,) in the file, "
     "(64,) in the model)"),
    ("config with a huge n_items", "retriever/config.json",
     lambda p: edit_json(p, set_in(("model", "n_items"), 10**12)), RECOMMEND,
     "model.safetensors: weights do not fit the model in config.json (item_bias: (49,) in the file, "
     "(1000000000001,) in the model)"),
    ("config with a bad head count", "retriever/config.json", lambda p: edit_json(p, set_in(("model", "n_heads"), 3)),
     RECOMMEND, "config.json: retriever config: hidden (8) must be a multiple of n_heads (3)"),
    ("pydantic error in the training config", "retriever/config.json",
     lambda p: edit_json(p, set_in(("train", "lr"), "fast")), RECOMMEND,
     "config.json: train: lr: Input should be a valid number"),
    ("pydantic error in prompt.json", "ranker/prompt.json", lambda p: edit_json(p, set_in(("max_history",), "x")),
     RECOMMEND, "prompt.json: max_history: Input should be a valid integer"),
    ("unknown field in rank_config.json", "ranker/rank_config.json", lambda p: edit_json(p, set_in(("extra",), 1)),
     RECOMMEND, "rank_config.json: extra: Extra inputs are not permitted"),
    ("non-UTF-8 rank_config.json", "ranker/rank_config.json", lambda p: p.write_bytes(b"\x80"), RECOMMEND,
     "rank_config.json: cannot read"),
    ("candidates.json without k", "retriever/candidates.json", lambda p: edit_json(p, set_in(("k",), KeyError)),
     RECOMMEND, "candidates.json: k is None; expected the number of candidates"),
    ("garbage catalogue", "retriever/items.parquet", lambda p: p.write_bytes(b"PAR1 not parquet"), RECOMMEND,
     "items.parquet: not a readable item catalogue"),
    ("bad fusion weight", "metrics.json", lambda p: edit_json(p, set_in(("ranker", "scoring", "fusion_weight"), -1)),
     RECOMMEND, "metrics.json: ranker.scoring: fusion_weight: Input should be greater than or equal to 0"),
    ("a pickle instead of the adapter's safetensors", "ranker/adapter/adapter_model.safetensors",
     lambda p: (p.unlink(), (p.parent / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n."),
                (p.parent / "pytorch_model.bin").write_bytes(b"\x80\x04.")), RECOMMEND,
     "adapter: no adapter_model.safetensors (other weight formats are not loaded: they can run code)"),
    ("report: garbage metrics", "metrics.json", lambda p: p.write_text("nan nan"), ("report",),
     "metrics.json: cannot read (Expecting value"),
    ("report: metrics without the ranker", "metrics.json", lambda p: edit_json(p, set_in(("ranker",), KeyError)),
     ("report",), "metrics.json: incomplete or damaged metrics (no 'ranker')"),
    ("report: metrics of the wrong type", "metrics.json",
     lambda p: edit_json(p, set_in(("ranker_training", "best_val_NDCG@10"), "high")), ("report",),
     "metrics.json: incomplete or damaged metrics (ValueError: Unknown format code 'f'"),
    ("report: truncated ranks", "ranker/eval/ranks.csv", lambda p: p.write_text("split,user\n"), ("report",),
     "ranks.csv: not the per-user ranks of an evaluation (KeyError"),
    ("report: config without the model", "retriever/config.json", lambda p: edit_json(p, set_in(("train",), [])),
     ("report",), "config.json: no train.model"),
    ("evaluate: pydantic error in rank_config.json", "ranker/rank_config.json",
     lambda p: edit_json(p, set_in(("lora_r",), 0)), ("rank", "evaluate", "--limit", "2"),
     "rank_config.json: lora_r: Input should be greater than or equal to 1"),
    ("evaluate: damaged candidates", "retriever/candidates.safetensors", lambda p: p.write_bytes(b"\0" * 16),
     ("rank", "evaluate", "--limit", "2"), "candidates.safetensors: not a valid safetensors file"),
]


def command(args: tuple[str, ...], run: Path, tmp_path: Path) -> list[object]:
    if args[0] == "recommend":
        return [args[0], "--run", run, *args[1:]]
    if args[0] == "report":
        return ["report", "--run", run]
    return [*args[:2], "--ranker", run / "ranker", "--out", tmp_path / "eval", *args[2:]]


@pytest.mark.parametrize(("case", "name", "damage", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_a_damaged_file_is_one_error_line(own_tiny_run, capsys, monkeypatch, tmp_path: Path, case: str, name: str,
                                          damage, args, message: str) -> None:
    run = own_tiny_run()
    drop_manifests(run)
    damage(run / name)
    line = error_line(capsys, monkeypatch, *command(args, run, tmp_path))
    assert message in line, line


@pytest.mark.parametrize("name", ["retriever/config.json", "ranker/prompt.json", "metrics.json"])
def test_with_the_manifest_the_edit_itself_is_named(own_tiny_run, capsys, monkeypatch, name: str) -> None:
    run = own_tiny_run()
    text = (run / name).read_text()
    (run / name).write_text(text.replace(": ", ":  ", 1))  # one more space: still valid JSON
    line = error_line(capsys, monkeypatch, "recommend", "--run", run, "--history", *HISTORY)
    assert line.endswith(f"{name.split('/')[-1]}: size mismatch with manifest.json (the file was changed or "
                         "damaged; retrain or restore it)"), line
    (run / name).write_text(text.replace("e", "E", 1))  # same size, other bytes
    line = error_line(capsys, monkeypatch, "recommend", "--run", run, "--history", *HISTORY)
    assert "sha256 mismatch with manifest.json" in line, line


def test_report_of_a_retriever_run_is_one_error_line(tiny_pipeline_run: Path, capsys, monkeypatch) -> None:
    line = error_line(capsys, monkeypatch, "report", "--run", tiny_pipeline_run / "retriever")
    assert "a retriever run; `llamarec report` reports runs of `llamarec run`" in line


# --------------------------------------------------------------------------- resume checkpoints
STATE_CASES = {
    "garbage state.json": ("state.json", lambda p: p.write_bytes(b"\x00garbage")),
    "state.json of the wrong type": ("state.json", lambda p: p.write_text("[]")),
    "state.json with a bad field": ("state.json", lambda p: edit_json(p, set_in(("step",), "many"))),
    "foreign weights": ("weights.safetensors", None),
    "truncated optimizer state": ("optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
}


@pytest.fixture
def tiny_yaml(tiny_pipeline_values, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline_values()), encoding="utf-8")
    return path


@pytest.mark.parametrize("stage", ["retriever", "ranker"])
@pytest.mark.parametrize("case", list(STATE_CASES))
def test_a_damaged_resume_checkpoint_is_one_error_line(own_tiny_run, tiny_yaml: Path, capsys, monkeypatch,
                                                       stage: str, case: str) -> None:
    run = own_tiny_run()
    name, damage = STATE_CASES[case]
    path = run / stage / "last" / name
    if damage is None:  # the other stage's weights: valid safetensors of the wrong model
        other = run / ("ranker" if stage == "retriever" else "retriever") / "last" / name
        path.write_bytes(other.read_bytes())
    else:
        damage(path)
    # The stage was interrupted (not finished in stages.json), so `llamarec run` resumes it.
    stages = json.loads((run / "stages.json").read_text())
    keep = list(stages)[: list(stages).index(stage)]
    (run / "stages.json").write_text(json.dumps({k: stages[k] for k in keep}))
    (run / "stage-started.json").write_text(json.dumps({stage: stages[stage]}))
    line = error_line(capsys, monkeypatch, "run", "--config", tiny_yaml, "--out", run)
    assert f"{run / stage / 'last'}" in line and f"delete {run / stage / 'last'} to train from the start" in line, line


def test_garbage_stages_file_is_one_error_line(own_tiny_run, tiny_yaml: Path, capsys, monkeypatch) -> None:
    run = own_tiny_run()
    (run / "stages.json").write_text("{'data': 1}")
    line = error_line(capsys, monkeypatch, "run", "--config", tiny_yaml, "--out", run)
    assert "stages.json: cannot read" in line


def test_a_garbage_processed_cache_entry_is_rebuilt_by_data_prepare(tiny_data_dir: Path, capsys, monkeypatch) -> None:
    from llamarec.data import processed_dir

    args = ("data", "prepare", "--dataset", "custom", "--data-dir", tiny_data_dir, "--json")
    code, first, _ = one_line_error(capsys, monkeypatch, *args)
    assert code == 0
    cached, _ = processed_dir("custom", tiny_data_dir)
    (cached / "items.parquet").write_bytes(b"garbage")
    code, again, err = one_line_error(capsys, monkeypatch, *args)
    assert code == 0 and json.loads(again) == json.loads(first)
    assert (cached / "items.parquet").read_bytes()[:4] == b"PAR1"


@pytest.mark.parametrize(("name", "text", "message"), [
    ("ranker/prompt.json", "{", "prompt.json: cannot read"),
    ("ranker/rank_config.json", '{"eval_batch_size": "many"}', "cannot read the ranker's settings (ValueError"),
    ("retriever/candidates.json", "[]", "candidates.json: expected a JSON object"),
])
def test_batch_scoring_of_a_damaged_run_is_one_error_line(own_tiny_run, capsys, monkeypatch, tmp_path: Path,
                                                          name: str, text: str, message: str) -> None:
    run = own_tiny_run()
    drop_manifests(run)
    (run / name).write_text(text)
    line = error_line(capsys, monkeypatch, "score", "--run", run, "--out", tmp_path / "scores", "--device", "cpu")
    assert message in line, line
