"""Choosing the torch device a model runs on, its thread count and its number format.

Rules, each with an explicit override:

- device (:func:`resolve_device`): ``"auto"`` is CUDA, then Apple MPS, then the CPU.
- threads (:func:`resolve_threads`): the ``threads`` argument (``--threads``), else
  ``OMP_NUM_THREADS``, else the physical cores this process may use (its CPU affinity, with
  hyperthread siblings counted once, capped by a cgroup v2 CPU quota). More threads than cores
  only make the compute-bound forward pass wait; with a busy neighbour process, also set
  ``OMP_WAIT_POLICY=PASSIVE`` in the environment (read once, when the process starts).
- dtype (:func:`auto_dtype`): bfloat16 on a CUDA GPU that supports it and on a CPU with bfloat16
  matrix instructions (AVX512-BF16, AMX or Arm BF16), else float32; an explicit dtype overrides
  it. It is what ``Recommender.load(dtype="auto")``, ``llamarec serve --dtype auto`` and
  ``benchmarks/ranking.py --dtype auto`` use; a ranker config's ``dtype: auto`` still follows
  :func:`llamarec.ranking.llm.resolve_dtype` (float32 on every CPU).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from llamarec.errors import LlamarecError

_CPUINFO = Path("/proc/cpuinfo")
_CPU_TOPOLOGY = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags, Arm features


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple MPS, then the CPU; anything else is taken as given,
    and a CUDA device must exist."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise LlamarecError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if target.type == "cuda" and (not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()):
        raise LlamarecError(f"device {device!r}: no such CUDA device here "
                            f"({torch.cuda.device_count()} visible); use --device cpu or auto")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise LlamarecError(f"device {device!r}: Apple MPS is not available here; use --device cpu or auto")
    return target


# --------------------------------------------------------------------------- threads
def available_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, hyperthread siblings counted
    once, at most the cgroup v2 CPU quota (a container's ``--cpus``)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = len({_core_of(cpu) for cpu in cpus})
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _core_of(cpu: int) -> str:
    """The physical core of a logical CPU (the CPU itself where Linux does not say)."""
    topology = _CPU_TOPOLOGY / f"cpu{cpu}" / "topology"
    try:
        return f"{(topology / 'physical_package_id').read_text().strip()}:{(topology / 'core_id').read_text().strip()}"
    except OSError:
        return f"cpu{cpu}"


def _cgroup_cpu_quota() -> int | None:
    """Whole CPUs allowed by the cgroup v2 quota (``cpu.max``, rounded up), None without one."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):  # no cgroup v2 file, or "max" (no quota)
        return None


def resolve_threads(threads: int | None = None) -> int:
    """Torch threads: ``threads`` if given, else ``OMP_NUM_THREADS`` if set to a whole number,
    else :func:`available_cores`."""
    if threads is not None:
        if threads < 1:
            raise LlamarecError(f"threads must be at least 1, got {threads}")
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count by :func:`resolve_threads`; returns it."""
    count = resolve_threads(threads)
    torch.set_num_threads(count)
    return count


# --------------------------------------------------------------------------- dtype
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (x86 AVX512-BF16 or AMX, Arm
    BF16). There bf16 about doubles matmul throughput (this project's 2-core EPYC: 423 against
    170-200 GFLOP/s in float32); elsewhere it is emulated and slower than float32."""
    try:
        return not _BF16_CPU_FLAGS.isdisjoint(_CPUINFO.read_text().split())
    except OSError:  # not Linux
        return False


def auto_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU that supports it and on a CPU with :func:`cpu_has_fast_bf16`,
    else float32 (also on Apple MPS). bfloat16 moves the letter logits slightly (see the
    README's bf16 vs float32 figures); pass ``float32`` explicitly to keep them exact."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
