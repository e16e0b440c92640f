"""Defect 2 of issue 14: every artifact is listed in a manifest with its sha256 and size, and a
changed or damaged one stops the load with one line naming it, never NaN or wrong results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import drop_manifests, error_line
from safetensors.torch import load_file, save_file

from llamarec.errors import LlamarecError
from llamarec.manifest import record, verify
from llamarec.pipeline import Recommender

HISTORY = ["1", "2", "3"]

# What each manifest of a finished `llamarec run` lists (the adapter's files are those peft writes).
LISTED = {
    ".": {"data.json", "metrics.json"},
    "retriever": {"config.json", "model.safetensors", "items.parquet", "metrics.json", "candidates.safetensors",
                  "candidates.json"},
    "ranker": {"rank_config.json", "prompt.json", "train_metrics.json", "adapter/adapter_model.safetensors",
               "adapter/adapter_config.json"},
    "ranker/eval": {"metrics.json", "ranks.csv"},
}


def flip(path: Path, offset: int = -64) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- the module
def test_record_and_verify_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"\0" * 10)
    (tmp_path / "sub" / ".w.bin.123.tmp").write_bytes(b"half")  # a temporary file: not listed
    record(tmp_path, tmp_path / "a.json")
    record(tmp_path, tmp_path / "sub")
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert set(files) == {"a.json", "sub/w.bin"}
    assert files["sub/w.bin"]["size"] == 10 and len(files["sub/w.bin"]["sha256"]) == 64
    verify(tmp_path, "a.json", "sub")

    (tmp_path / "a.json").write_text("[]")  # same size, other content
    with pytest.raises(LlamarecError, match=r"a.json: sha256 mismatch with manifest.json \(the file was changed"):
        verify(tmp_path, "a.json")
    (tmp_path / "sub" / "w.bin").unlink()
    with pytest.raises(LlamarecError, match="w.bin: missing, though manifest.json lists it"):
        verify(tmp_path, "sub")
    # Re-recording a directory forgets the files that are gone.
    (tmp_path / "sub" / "new.bin").write_bytes(b"1")
    record(tmp_path, tmp_path / "sub")
    verify(tmp_path, "sub")
    assert set(json.loads((tmp_path / "manifest.json").read_text())["files"]) == {"a.json", "sub/new.bin"}


def test_without_a_manifest_nothing_is_checked(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    verify(tmp_path, "a.json", "missing.json")


@pytest.mark.parametrize("text", ["{", "[]", '{"files": {"a": 1}}', "\xff"])
def test_a_damaged_manifest_is_one_error_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(LlamarecError, match="manifest.json: .*delete it to load the run unverified") as info:
        verify(tmp_path, "a.json")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- a run
def test_a_finished_run_lists_every_artifact(tiny_pipeline_run: Path) -> None:
    for directory, names in LISTED.items():
        files = json.loads((tiny_pipeline_run / directory / "manifest.json").read_text())["files"]
        assert names <= set(files), (directory, names - set(files))
        verify(tiny_pipeline_run / directory, ".")
    # Resume checkpoints are not artifacts: a rerun rewrites them.
    assert not any(name.startswith("last/") for name in json.loads(
        (tiny_pipeline_run / "retriever" / "manifest.json").read_text())["files"])


def test_a_bit_flipped_model_is_an_error_naming_it(copy_tiny_run, capsys, monkeypatch) -> None:
    run = copy_tiny_run()
    flip(run / "retriever" / "model.safetensors")
    line = error_line(capsys, monkeypatch, "recommend", "--run", run, "--history", *HISTORY)
    assert line == (f"error: {run / 'retriever' / 'model.safetensors'}: sha256 mismatch with manifest.json "
                    "(the file was changed or damaged; retrain or restore it)")


def test_a_run_without_manifests_still_loads(copy_tiny_run, tiny_pipeline_run: Path) -> None:
    run = copy_tiny_run()
    drop_manifests(run)
    got = Recommender.load(run).recommend(HISTORY, k=5)
    want = Recommender.load(tiny_pipeline_run).recommend(HISTORY, k=5)
    assert [r.item_id for r in got.items] == [r.item_id for r in want.items]


@pytest.mark.parametrize("name", ["ranker/adapter/adapter_model.safetensors", "ranker/prompt.json",
                                  "ranker/rank_config.json", "retriever/items.parquet", "metrics.json",
                                  "retriever/candidates.json"])
def test_every_file_the_recommender_reads_is_verified(copy_tiny_run, name: str) -> None:
    run = copy_tiny_run()
    flip(run / name, offset=len((run / name).read_bytes()) // 2)
    with pytest.raises(LlamarecError, match=f"{Path(name).name}: sha256 mismatch with manifest.json"):
        Recommender.load(run)


def test_damaged_candidates_stop_the_ranker_stage(copy_tiny_run) -> None:
    from llamarec.candidates import load_candidates

    run = copy_tiny_run()
    flip(run / "retriever" / "candidates.safetensors")
    with pytest.raises(LlamarecError, match="candidates.safetensors: sha256 mismatch"):
        load_candidates(run / "retriever", "val")
    drop_manifests(run)  # no manifest: the tensors are still checked
    path = run / "retriever" / "candidates.safetensors"
    tensors = load_file(path)
    tensors["val.scores"][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(LlamarecError, match="val scores are NaN or infinite"):
        load_candidates(run / "retriever", "val")
    del tensors["test.items"]
    save_file(tensors, path)
    with pytest.raises(LlamarecError, match=r"no test.items \(a damaged or foreign file\)"):
        load_candidates(run / "retriever", "test")


def test_candidates_are_not_written_from_nan_scores(copy_tiny_run, capsys, monkeypatch) -> None:
    run = copy_tiny_run()
    retriever = run / "retriever"
    path = retriever / "model.safetensors"
    tensors = load_file(path)
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()},
              path)
    record(retriever, path)  # even with a manifest that vouches for the NaN weights
    before = (retriever / "candidates.safetensors").read_bytes()
    line = error_line(capsys, monkeypatch, "retrieve", "candidates", "--run", retriever, "--device", "cpu")
    assert "model.safetensors: the retriever gives NaN or infinite scores, so no candidates were written" in line
    assert (retriever / "candidates.safetensors").read_bytes() == before


def test_a_damaged_processed_cache_entry_is_rebuilt(tiny_data_dir: Path, caplog) -> None:
    from llamarec.data import load_dataset, processed_dir

    first = load_dataset("custom", tiny_data_dir)
    cached, _ = processed_dir("custom", tiny_data_dir)
    flip(cached / "interactions.parquet", offset=200)
    with caplog.at_level(logging.WARNING):
        again = load_dataset("custom", tiny_data_dir)
    assert "rebuilding the processed dataset" in caplog.text and "mismatch with manifest.json" in caplog.text
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in first.sequences]
    verify(cached, ".")
    # Without a manifest, a cache entry that cannot be read is rebuilt too.
    (cached / "manifest.json").unlink()
    (cached / "meta.json").write_text("{")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert load_dataset("custom", tiny_data_dir).titles == first.titles
    assert "not a readable processed dataset" in caplog.text


def test_recorded_sizes_match_the_files(tiny_pipeline_run: Path) -> None:
    files = json.loads((tiny_pipeline_run / "retriever" / "manifest.json").read_text())["files"]
    sizes = np.array([files[n]["size"] for n in sorted(files)])
    assert (sizes == [(tiny_pipeline_run / "retriever" / n).stat().st_size for n in sorted(files)]).all()
