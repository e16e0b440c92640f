import pytest
import torch

from llamarec.devices import resolve_device
from llamarec.errors import LlamarecError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LlamarecError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_missing_cuda_device_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(LlamarecError, match=r"device 'cuda:1': no such CUDA device here \(0 visible\)"):
        resolve_device("cuda:1")


def test_threads_come_from_the_argument_then_omp_num_threads_then_the_cores(monkeypatch):
    from llamarec import devices

    monkeypatch.setattr(devices, "available_cores", lambda: 6)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.resolve_threads(2) == 2
    assert devices.resolve_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert devices.resolve_threads() == 6
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert devices.resolve_threads() == 6
    with pytest.raises(LlamarecError, match="at least 1"):
        devices.resolve_threads(0)


def test_set_threads_sets_torchs_thread_count():
    from llamarec.devices import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_available_cores_count_hyperthread_siblings_once_within_the_quota(monkeypatch, tmp_path):
    from llamarec import devices

    for cpu, core in enumerate([0, 0, 1, 1]):  # two cores with two hardware threads each
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(devices, "_CPU_TOPOLOGY", tmp_path)
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(devices, "_CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert devices.available_cores() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert devices.available_cores() == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one thread
    assert devices.available_cores() == 1
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 4}, raising=False)  # no topology for 4
    (tmp_path / "cpu.max").unlink()
    assert devices.available_cores() == 2


@pytest.mark.parametrize(("flags", "fast"), [("fpu avx2 avx512f avx512_bf16 sse", True), ("fpu amx_bf16", True),
                                             ("fp asimd bf16 i8mm", True), ("fpu avx2 avx512f", False)])
def test_auto_dtype_is_bfloat16_on_cpus_with_bf16_instructions(monkeypatch, tmp_path, flags, fast):
    from llamarec import devices

    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    monkeypatch.setattr(devices, "_CPUINFO", tmp_path / "cpuinfo")
    assert devices.cpu_has_fast_bf16() is fast
    assert devices.auto_dtype(torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)
    assert devices.auto_dtype(torch.device("mps")) == torch.float32
    monkeypatch.setattr(devices, "_CPUINFO", tmp_path / "missing")
    assert devices.auto_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_on_cuda_is_bfloat16_where_supported(monkeypatch, bf16):
    from llamarec.devices import auto_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert auto_dtype(torch.device("cuda")) == (torch.bfloat16 if bf16 else torch.float32)
