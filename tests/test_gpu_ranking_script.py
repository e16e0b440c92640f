"""benchmarks/gpu_ranking.py cannot be measured without a GPU; its code paths are checked on a
CPU with a tiny shape, and without CUDA it says it has not run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_ranking.py"


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--json"], capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout)


def test_every_code_path_runs_on_a_cpu_with_a_tiny_shape():
    report = run("--device", "cpu", "--shape", "tiny", "--peak-size", "128", "--prompts", "6",
                 "--min-len", "5", "--max-len", "12", "--batch", "4")
    assert report["matmul_peak_tflops"] >= 0 and 5 <= report["mean_prompt_tokens"] <= 12
    methods = [r["method"] for r in report["results"]]
    assert methods[0].startswith("plain transformers") and methods[1].startswith("llamarec")
    assert all(r["prompts_per_s"] > 0 and r["fraction_of_peak"] >= 0 for r in report["results"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_it_has_not_run():
    assert run() == {"skipped": "no CUDA device here: gpu_ranking.py has not run"}
