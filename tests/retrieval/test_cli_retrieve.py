"""The ``llamarec retrieve train`` and ``retrieve candidates`` commands, in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamarec.cli import app

runner = CliRunner()

TINY = ["--hidden", "8", "--n-blocks", "1", "--max-len", "10", "--batch-size", "8", "--max-epochs", "1",
        "--eval-every", "3"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAREC_CACHE", str(tmp_path / "cache"))


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def test_train_options_reach_the_config_and_metrics_are_written(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bert"
    result = invoke("retrieve", "train", "-d", "custom", "--data-dir", tiny_data_dir, "--model", "bert4rec",
                    "--dropout", "0.3", "--attn-dropout", "0.1", "--mask-prob", "0.4", "--weight-decay", "0",
                    "--seed", "7", "--device", "cpu", *TINY, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    saved = json.loads((out / "config.json").read_text())
    assert {k: saved["train"][k] for k in ("model", "dropout", "attn_dropout", "mask_prob", "weight_decay", "seed")} \
        == {"model": "bert4rec", "dropout": 0.3, "attn_dropout": 0.1, "mask_prob": 0.4, "weight_decay": 0.0, "seed": 7}
    assert saved["model"]["mask_prob"] == 0.4
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["test"] == metrics["test"] and "NDCG@10" in metrics["test"] and "Recall@10" in metrics["val"]
    assert metrics["device"] == "cpu"
    assert (out / "model.safetensors").is_file()

    cands = invoke("retrieve", "candidates", "--run", out, "--k", "5", "--device", "cpu", "--json")
    assert cands.exit_code == 0, cands.output
    summary = json.loads((out / "candidates.json").read_text())
    assert json.loads(cands.stdout) == summary and summary["k"] == 5 and summary["model"] == "bert4rec"


@pytest.mark.parametrize("option,value,message", [
    ("--mask-prob", "1.5", "mask_prob: Input should be less than 1 (got 1.5)"),
    pytest.param("--device", "cuda", "device 'cuda': no such CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
], ids=["out-of-range-option", "missing-cuda-device"])
def test_bad_option_is_named_before_anything_is_written(tiny_data_dir: Path, tmp_path: Path, option: str,
                                                        value: str, message: str) -> None:
    result = invoke("retrieve", "train", "-d", "custom", "--data-dir", tiny_data_dir, option, value,
                    "-o", tmp_path / "run")
    assert result.exit_code != 0
    assert message in str(result.exception)
    assert not (tmp_path / "run").exists()
