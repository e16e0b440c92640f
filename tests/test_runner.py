"""``llamarec run`` (the Runner): stages, skipping, redoing, resuming, config files and presets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from llamarec.errors import LlamarecError
from llamarec.ranking.finetune import Finetuner
from llamarec.retrieval.train import Trainer
from llamarec.runner import STAGES, PipelineConfig, Runner, load_pipeline_config, preset_path

PRESETS = ("cpu-quality", "default", "gpu-quality", "paper-beauty", "paper-games", "paper-ml", "title-similarity")


def stages_of(run: Path) -> dict[str, str]:
    return json.loads((run / "stages.json").read_text())


@pytest.fixture
def tiny_config(tiny_pipeline_values):
    """``make(**sections)``: a validated PipelineConfig of the tiny pipeline."""
    return lambda **sections: PipelineConfig.model_validate(tiny_pipeline_values(**sections))


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stages the Runner executes (in order) from now on."""
    calls: list[str] = []
    for stage in STAGES:
        original = getattr(Runner, f"_{stage}")

        def spy(self, _stage=stage, _original=original):
            calls.append(_stage)
            return _original(self)

        monkeypatch.setattr(Runner, f"_{stage}", spy)
    return calls


def fail_on_call(monkeypatch: pytest.MonkeyPatch, target, name: str, at_call: int) -> list[int]:
    """Make ``target.name`` raise RuntimeError at its ``at_call``-th call; returns the call counter."""
    original, count = getattr(target, name), [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == at_call:
            raise RuntimeError(f"interrupted at call {at_call}")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return count


def forbid_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every function a stage calls to do its work raises."""
    import llamarec.data
    import llamarec.ranking.evaluate
    import llamarec.ranking.finetune
    import llamarec.report
    import llamarec.retrieval.candidates
    import llamarec.retrieval.train

    def boom(*args, **kwargs):
        raise AssertionError("a stage ran that should have been skipped")

    for module, name in [(llamarec.data, "load_dataset"), (llamarec.retrieval.train, "train_retriever"),
                         (llamarec.retrieval.candidates, "generate_candidates"),
                         (llamarec.ranking.finetune, "finetune_ranker"),
                         (llamarec.ranking.evaluate, "evaluate_ranker"), (llamarec.report, "write_report")]:
        monkeypatch.setattr(module, name, boom)


def mtime(path: Path) -> int:
    return os.stat(path).st_mtime_ns


# --------------------------------------------------------------------------- a full run
def test_full_run_writes_every_artifact(tiny_pipeline_run: Path, tiny_pipeline_values) -> None:
    run = tiny_pipeline_run
    assert list(stages_of(run)) == list(STAGES)
    for name in ("config.yaml", "data.json", "metrics.json", "report.md", "retriever/model.safetensors",
                 "retriever/candidates.safetensors", "ranker/adapter/adapter_config.json",
                 "ranker/train_metrics.json", "ranker/eval/metrics.json", "ranker/eval/ranks.csv"):
        assert (run / name).is_file(), name
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert plots == ["metrics.png", "rank_shift.png", "training_curves.png"]
    assert all((run / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)

    assert json.loads((run / "data.json").read_text())["users"] == 36
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"data", "retriever", "ranker_training", "ranker"}
    assert metrics["ranker"]["test"]["evaluated_users"] == 4  # evaluation.limit
    assert metrics["ranker_training"]["steps"] == 2  # 8 examples in batches of 4
    # config.yaml is the run's whole config, usable as a config file.
    assert yaml.safe_load((run / "config.yaml").read_text())["candidates"] == {"k": 20, "train_prefixes": 30}
    saved = load_pipeline_config(run / "config.yaml", {})
    assert saved == PipelineConfig.model_validate(tiny_pipeline_values())


def test_run_returns_the_metrics_and_a_rerun_skips_every_stage(
        copy_tiny_run, tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_tiny_run()
    before = stages_of(run)
    forbid_work(monkeypatch)
    metrics = Runner(tiny_config(), run, progress=False).run()
    assert metrics == json.loads((run / "metrics.json").read_text())
    assert ran == []
    assert stages_of(run) == before
    err = capsys.readouterr().err
    assert all(f"{stage}: up to date (skipped)" in err for stage in STAGES)


def test_stage_keys_do_not_depend_on_how_the_run_directory_is_named(
        copy_tiny_run, tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run moved elsewhere, or named by a relative path, is still up to date."""
    run = copy_tiny_run("moved")
    before = stages_of(run)
    forbid_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    Runner(tiny_config(), Path("moved"), progress=False).run()
    assert ran == []
    assert stages_of(run) == before


@pytest.mark.parametrize(("change", "redone"), [
    ({"ranker": {"lr": 5e-3}}, ["ranker", "evaluate", "report"]),
    ({"evaluation": {"limit": 3}}, ["evaluate", "report"]),
], ids=["ranker", "evaluation"])
def test_a_changed_option_redoes_its_stage_and_those_after_it(
        copy_tiny_run, tiny_config, ran: list[str], change: dict, redone: list[str]) -> None:
    run = copy_tiny_run()
    before, retriever_mtime = stages_of(run), mtime(run / "retriever" / "model.safetensors")
    candidates_mtime = mtime(run / "retriever" / "candidates.safetensors")
    Runner(tiny_config(**change), run, progress=False).run()
    assert ran == redone
    after = stages_of(run)
    assert list(after) == list(STAGES)
    for stage in STAGES:
        assert (after[stage] == before[stage]) == (stage not in redone), stage
    assert mtime(run / "retriever" / "model.safetensors") == retriever_mtime
    assert mtime(run / "retriever" / "candidates.safetensors") == candidates_mtime
    if "ranker" in change:
        assert json.loads((run / "ranker" / "rank_config.json").read_text())["lr"] == 5e-3
    else:
        assert json.loads((run / "metrics.json").read_text())["ranker"]["test"]["evaluated_users"] == 3
    # And the changed config is up to date now.
    ran.clear()
    Runner(tiny_config(**change), run, progress=False).run()
    assert ran == []


def test_force_redoes_the_stage_and_everything_after_it(copy_tiny_run, tiny_config, ran: list[str]) -> None:
    run = copy_tiny_run()
    before = stages_of(run)
    candidates_mtime = mtime(run / "retriever" / "candidates.safetensors")
    retriever_mtime = mtime(run / "retriever" / "model.safetensors")
    Runner(tiny_config(), run, force={"candidates"}, progress=False).run()
    assert ran == ["candidates", "ranker", "evaluate", "report"]
    assert stages_of(run) == before  # same config, same keys
    assert mtime(run / "retriever" / "candidates.safetensors") != candidates_mtime
    assert mtime(run / "retriever" / "model.safetensors") == retriever_mtime


def test_unknown_force_stage_is_an_error(tiny_config, tmp_path: Path) -> None:
    with pytest.raises(LlamarecError, match="--force bogus: stages are data, retriever"):
        Runner(tiny_config(), tmp_path / "run", force={"bogus", "ranker"})
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- interruptions
def test_an_interrupted_ranker_resumes_from_its_last_checkpoint(
        copy_tiny_run, tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_tiny_run()
    keys = stages_of(run)
    # Validations at steps 0, 1 and 2: the third raises, after the checkpoint of step 1.
    with monkeypatch.context() as mp:
        fail_on_call(mp, Finetuner, "_validate", at_call=3)
        with pytest.raises(RuntimeError, match="interrupted"):
            Runner(tiny_config(), run, force={"ranker"}, progress=False).run()
    # Only the stages before the interrupted one count as done: the forced ranker and what
    # depends on it are no longer up to date, even though they were before.
    assert stages_of(run) == {s: keys[s] for s in ("data", "retriever", "candidates")}
    assert not (run / "metrics.json").exists()  # it was about the ranker just removed
    assert json.loads((run / "ranker" / "last" / "state.json").read_text())["step"] == 1

    resumed_at: list[int] = []
    original_resume = Finetuner._resume

    def resume(self):
        found = original_resume(self)
        resumed_at.append(self.state.step if found else -1)
        return found

    monkeypatch.setattr(Finetuner, "_resume", resume)
    validations = fail_on_call(monkeypatch, Finetuner, "_validate", at_call=0)  # counts, never raises
    ran.clear()
    Runner(tiny_config(), run, progress=False).run()
    assert ran == ["ranker", "evaluate", "report"]
    assert resumed_at == [1]
    assert validations[0] == 1  # only step 2's validation was left to do
    assert stages_of(run) == keys
    train = json.loads((run / "ranker" / "train_metrics.json").read_text())
    assert train["steps"] == 2
    assert [h["step"] for h in train["history"]] == [0, 1, 2]


def test_an_interrupted_forced_retriever_resumes_and_redoes_everything_after_it(
        copy_tiny_run, tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_tiny_run()
    keys = stages_of(run)
    ranker_mtime = mtime(run / "ranker" / "adapter" / "adapter_model.safetensors")
    # Validations every 3 of 12 steps: the second (step 6) raises, after the checkpoint of step 3.
    with monkeypatch.context() as mp:
        fail_on_call(mp, Trainer, "_validate", at_call=2)
        with pytest.raises(RuntimeError, match="interrupted"):
            Runner(tiny_config(), run, force={"retriever"}, progress=False).run()
    assert stages_of(run) == {"data": keys["data"]}
    assert not (run / "ranker").exists()  # built on the old retriever: gone

    resumed_at: list[int] = []
    original_resume = Trainer._resume

    def resume(self):
        found = original_resume(self)
        resumed_at.append(self.state.step if found else -1)
        return found

    monkeypatch.setattr(Trainer, "_resume", resume)
    Runner(tiny_config(), run, progress=False).run()
    assert ran == ["retriever", "retriever", "candidates", "ranker", "evaluate", "report"]
    assert resumed_at == [3]
    assert stages_of(run) == keys
    assert json.loads((run / "retriever" / "metrics.json").read_text())["steps"] == 12
    assert mtime(run / "ranker" / "adapter" / "adapter_model.safetensors") != ranker_mtime


def test_a_fresh_run_interrupted_in_the_ranker_resumes(
        tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        fail_on_call(mp, Finetuner, "_validate", at_call=3)
        with pytest.raises(RuntimeError, match="interrupted"):
            Runner(tiny_config(), run, progress=False).run()
    assert list(stages_of(run)) == ["data", "retriever", "candidates"]
    assert not (run / "metrics.json").exists()
    ran.clear()
    Runner(tiny_config(), run, progress=False).run()
    assert ran == ["ranker", "evaluate", "report"]
    assert list(stages_of(run)) == list(STAGES)
    assert (run / "report.md").is_file()


# --------------------------------------------------------------------------- config files
def write_config(path: Path, values) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def test_a_config_file_loads_with_top_level_overrides(tiny_pipeline_values, tmp_path: Path) -> None:
    path = write_config(tmp_path / "tiny.yaml", tiny_pipeline_values())
    cfg = load_pipeline_config(path, {"dataset": None, "data_dir": tmp_path})
    assert cfg.dataset == "custom" and cfg.data_dir == tmp_path  # None leaves the file's value
    assert cfg.retrieval_config().hidden == 8
    assert cfg.rank_config(tmp_path / "run").retriever == tmp_path / "run" / "retriever"


@pytest.mark.parametrize(("change", "field"), [
    ({"colour": "blue"}, "colour"),
    ({"candidates": {"k": 21}}, "candidates.k"),
    ({"candidates": {"top": 5}}, "candidates.top"),
    ({"evaluation": {"order": "random"}}, "evaluation.order"),
    ({"retriever": {"hidden": 0}}, "hidden"),
    ({"retriever": {"layers": 2}}, "layers"),
    ({"retriever": "lru"}, "retriever"),
], ids=["top-level key", "candidates value", "candidates key", "evaluation value", "retriever value",
        "retriever key", "section not a mapping"])
def test_a_bad_config_file_names_the_field(tiny_pipeline_values, tmp_path: Path, change: dict, field: str) -> None:
    path = write_config(tmp_path / "bad.yaml", tiny_pipeline_values(**change))
    with pytest.raises(LlamarecError, match=field.replace(".", r"\.")) as info:
        load_pipeline_config(path, {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "field"), [({"lr": -1.0}, "lr"), ({"rank": 4}, "rank")])
def test_a_bad_ranker_section_is_an_error_before_any_work(
        tiny_pipeline_values, tmp_path: Path, change: dict, field: str) -> None:
    path = write_config(tmp_path / "bad.yaml", tiny_pipeline_values(ranker=change))
    with pytest.raises(LlamarecError, match=f"ranker.*{field}"):
        Runner(load_pipeline_config(path, {}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("- retriever\n- ranker\n", "expected a mapping"),
    ("retriever: [unclosed\n", "cannot read config"),
    (None, "cannot read config"),
], ids=["list", "bad yaml", "missing file"])
def test_an_unreadable_config_file_is_an_error(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(LlamarecError, match=message) as info:
        load_pipeline_config(path, {})
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- presets
def test_the_default_preset_is_the_default_config() -> None:
    path = preset_path("default")
    assert path.is_file() and path.name == "default.yaml"
    assert load_pipeline_config(None, {}) == load_pipeline_config(path, {})
    cfg = load_pipeline_config(None, {})
    assert cfg.dataset == "ml-100k" and cfg.candidates.k == 20


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name: str, tmp_path: Path) -> None:
    cfg = load_pipeline_config(preset_path(name), {})
    assert cfg.retrieval_config().model == "lru"
    Runner(cfg, tmp_path / "run")  # the ranker section validates too
    assert not (tmp_path / "run").exists()


def test_the_preset_list_is_complete() -> None:
    found = sorted(p.stem for p in preset_path("default").parent.glob("*.yaml"))
    assert found == sorted(PRESETS)


def test_an_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(LlamarecError, match="unknown preset 'nope'; presets: " + ", ".join(sorted(PRESETS))):
        preset_path("nope")


def test_an_interrupted_stage_whose_config_changed_starts_afresh(
        copy_tiny_run, tiny_config, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted ranker is resumed only with the config it started with: with another
    config it is cleared and trained anew (its trainer would refuse the old checkpoint)."""
    run = copy_tiny_run()
    with monkeypatch.context() as mp:
        fail_on_call(mp, Finetuner, "_validate", at_call=3)
        with pytest.raises(RuntimeError, match="interrupted"):
            Runner(tiny_config(), run, force={"ranker"}, progress=False).run()
    started_key = Runner(tiny_config(), run).keys()["ranker"]
    assert json.loads((run / "stage-started.json").read_text()) == {"ranker": started_key}
    changed = tiny_config(ranker={"max_examples": 4})
    Runner(changed, run, progress=False).run()  # no "different config" error
    assert json.loads((run / "ranker" / "rank_config.json").read_text())["max_examples"] == 4
    assert stages_of(run) == Runner(changed, run).keys()
    assert not (run / "stage-started.json").exists()


def test_a_new_option_at_its_default_keeps_the_stage_keys(tiny_config, tmp_path: Path) -> None:
    """An option added to llamarec later must not redo the finished stages of existing runs."""
    runner = Runner(tiny_config(), tmp_path / "run", progress=False)
    before = runner.keys()

    class WithNewOption(type(runner.rank_cfg)):
        new_option: int | None = None

    runner.rank_cfg = WithNewOption(**runner.rank_cfg.model_dump())
    assert runner.keys() == before
    runner.rank_cfg = WithNewOption(**runner.rank_cfg.model_dump(exclude={"new_option"}), new_option=3)
    changed = runner.keys()
    assert [s for s in STAGES if changed[s] != before[s]] == ["ranker", "evaluate", "report"]


def test_the_data_stage_key_follows_the_preprocessing_options_when_set(tiny_config, tmp_path: Path) -> None:
    before = Runner(tiny_config(), tmp_path / "run", progress=False).keys()
    config = tiny_config()
    config.retriever = {**config.retriever, "ties": "item"}  # the default, written out
    assert Runner(config, tmp_path / "run", progress=False).keys() == before
    config.retriever = {**config.retriever, "ties": "random"}
    changed = Runner(config, tmp_path / "run", progress=False).keys()
    assert all(changed[s] != before[s] for s in STAGES)


def test_stage_keys_of_an_older_llamarec_are_read_as_current(
        copy_tiny_run, tiny_config, ran: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs recorded when keys hashed the whole config (defaults included) stay up to date."""
    run = copy_tiny_run()
    legacy = Runner(tiny_config(), run, progress=False).keys(omit_defaults=False)
    (run / "stages.json").write_text(json.dumps(legacy))
    forbid_work(monkeypatch)
    Runner(tiny_config(), run, progress=False).run()
    assert ran == []
