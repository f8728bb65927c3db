"""What else runs on the host while a job is timed: other processes on its GPU (a stand-in NVML), other
processes' CPU time, and the verdict they make of a run."""

import importlib.util
import os
import py_compile
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from runner import host, worker
from runner.host import CpuLoad, gpu_neighbours, parse_cpulist
from runner.launch import missing_bytecode_hint
from runner.record import Steadiness, WorkerResult

STEADY_CALLS = [1.00, 1.01, 0.99, 1.00, 1.01, 1.00, 0.99, 1.00, 1.01, 1.00]


def stand_in_nvml(monkeypatch: pytest.MonkeyPatch, pids: list[int]) -> None:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: uuid
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda handle: [types.SimpleNamespace(pid=pid) for pid in pids]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_other_processes_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_nvml(monkeypatch, [os.getpid()])
    assert gpu_neighbours("GPU-a") == []  # only this job
    stand_in_nvml(monkeypatch, [os.getpid(), 4_000_001])
    assert gpu_neighbours("GPU-a") == [4_000_001]
    stand_in_nvml(monkeypatch, [12, 13])  # NVML in another pid namespace: one of them is this job
    assert len(gpu_neighbours("GPU-a")) == 1
    monkeypatch.setitem(sys.modules, "pynvml", types.ModuleType("pynvml"))  # no NVML: nothing said
    assert gpu_neighbours("GPU-a") is None


def test_a_compilers_worker_process_is_not_a_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    with subprocess.Popen(["sleep", "30"]) as child:  # a child of this job, as inductor's compile workers are
        try:
            stand_in_nvml(monkeypatch, [os.getpid(), child.pid])
            assert gpu_neighbours("GPU-a") == []
        finally:
            child.kill()


def test_cpu_time_of_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([(0.0, 100.0, 1.0), (10.0, 130.0, 6.0)])  # wall, host busy and own CPU seconds
    monkeypatch.setattr(CpuLoad, "_now", staticmethod(lambda: next(readings)))
    assert CpuLoad().others_cores() == pytest.approx(2.5)  # 30 busy seconds, 5 of them ours, over 10 s


def test_where_the_launching_threads_time_went(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Stand-in /proc files, rewritten between the two reads: over the stretch the thread ran 0.6 of its wall
    time and waited 0.3 for its core, and its core 3 had 50 of its 200 ticks stolen."""
    schedstat, stat = tmp_path / "schedstat", tmp_path / "stat"
    monkeypatch.setattr(host, "THREAD_STAT", schedstat)
    monkeypatch.setattr(host, "STAT", stat)
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(host, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))  # host's clock alone

    def write(on_cpu_ns: int, waiting_ns: int, steal: int, idle: int) -> None:
        schedstat.write_text(f"{on_cpu_ns} {waiting_ns} 7\n")
        cpu = "cpu3 {} 0 0 {} 0 0 0 {} 0 0"
        stat.write_text(f"cpu 1 2 3 4 5 6 7 8 0 0\ncpu2 9 9 9 9 9 9 9 9 0 0\n{cpu.format(100, idle, steal)}\n")

    write(5_000_000_000, 1_000_000_000, 10, 1000)
    launching = host.LaunchThread(3)
    write(6_200_000_000, 1_600_000_000, 60, 1150)  # +1.2 s on a CPU, +0.6 s waiting; core 3: +50 steal, +150 idle
    assert launching.metrics() == {
        "launch_thread_cpu_share": pytest.approx(0.6),
        "launch_thread_wait_share": pytest.approx(0.3),
        "pinned_core_steal_share": pytest.approx(50 / 200),
    }
    loops = iter([0.002, 0.004, 0.003])
    monkeypatch.setattr(host, "core_loop_s", lambda: next(loops))
    for _ in range(3):
        launching.probe()  # before each timed call: the fixed loop's time on this thread
    clock = iter([102.0])  # read again at the same moment
    assert launching.metrics() == {
        "launch_thread_cpu_share": pytest.approx(0.6),
        "launch_thread_wait_share": pytest.approx(0.3),
        "pinned_core_steal_share": pytest.approx(50 / 200),
        "launch_core_loop_ms": pytest.approx(3.0),  # the median
        "launch_core_loop_cv": pytest.approx(0.0008165 / 0.003, rel=1e-3),  # population spread over the mean
    }
    assert launching.series() == {"call_core_loop_ms": pytest.approx([2.0, 4.0, 3.0])}  # in call order
    schedstat.unlink()  # a kernel without scheduler statistics, and no pinned core: nothing made up
    clock = iter([0.0, 1.0])
    assert host.LaunchThread(None).metrics() == {}


def test_the_launching_threads_shares_read_from_this_machines_proc() -> None:
    """The real files, on Linux: a thread that never sleeps, pinned to a core, is on it, waiting for it, or kept off
    it by the hypervisor (steal, where the kernel counts it apart) all the time, and never more than its wall time
    on it or waiting. Unpinned and without the steal, a CI run on this 2-core VM once read only 82% of such a
    thread's time on a CPU and 0.3% waiting, the rest unaccounted (stolen, it seems, on a core it did not read). So the
    bound below is loose (half): what it catches is the counts of another thread, or none (a sleeping thread's
    read near 0), not how well a busy host serves this one. The counts move at the kernel's ticks: hence 0.5 s."""
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    os.sched_setaffinity(0, {core})  # this thread only
    try:
        launching = host.LaunchThread(core)
        began = time.monotonic()
        while time.monotonic() - began < 0.5:
            pass
        shares = launching.metrics()
    finally:
        os.sched_setaffinity(0, allowed)
    assert set(shares) == {"launch_thread_cpu_share", "launch_thread_wait_share", "pinned_core_steal_share"}
    on_or_waiting = shares["launch_thread_cpu_share"] + shares["launch_thread_wait_share"]
    assert on_or_waiting + shares["pinned_core_steal_share"] >= 0.5 and on_or_waiting <= 1.1, shares
    assert 0.0 <= shares["pinned_core_steal_share"] <= 1.0, shares


def test_a_busy_gpu_or_host_makes_the_run_contended(monkeypatch: pytest.MonkeyPatch) -> None:
    result = WorkerResult(series={"call_latency_s": STEADY_CALLS}, facts={"gpu_uuid": "GPU-a"})
    monkeypatch.setattr(worker, "gpu_neighbours", lambda uuid: [])
    assert worker.judge_measurement(result, 0.1).steadiness is Steadiness.STEADY
    monkeypatch.setattr(worker, "gpu_neighbours", lambda uuid: [4242])
    busy = worker.judge_measurement(result, 0.1)
    assert (busy.steadiness, busy.why) == (Steadiness.CONTENDED, "1 other process(es) on its GPU")
    assert result.facts["gpu_other_processes"] == "4242"
    monkeypatch.setattr(worker, "gpu_neighbours", lambda uuid: [])
    monkeypatch.setattr(worker, "busy_threshold_cores", lambda: 4.0)
    busy = worker.judge_measurement(result, 6.5)
    assert (
        busy.why == "other processes used 6.5 CPU cores while it was timed" and result.metrics["other_cpu_cores"] == 6.5
    )


def test_cpulists_and_cores_near_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    monkeypatch.setattr(host, "allowed_cores", lambda: list(range(8)))
    monkeypatch.setattr(host, "_numa_cores", lambda uuid: [4, 5, 6, 7, 8])
    assert host.cores_near("GPU-a") == [7, 6, 5, 4, 3, 2, 1, 0]  # the GPU's node first, allowed cores only
    monkeypatch.setattr(host, "_numa_cores", lambda uuid: [0, 1])
    assert host.cores_near("GPU-a") == [1, 0, 7, 6, 5, 4, 3, 2]


def test_a_host_that_keeps_no_bytecode_is_told_how_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "heavy_library"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hint = missing_bytecode_hint("heavy_library", writes_bytecode=False)
    assert "no bytecode for heavy_library" in hint and "PYTHONPYCACHEPREFIX=" in hint
    assert "unset PYTHONDONTWRITEBYTECODE" in hint
    assert missing_bytecode_hint("heavy_library", writes_bytecode=True) == ""  # it will be written at first import
    py_compile.compile(
        str(package / "__init__.py"), cfile=importlib.util.cache_from_source(str(package / "__init__.py"))
    )
    assert missing_bytecode_hint("heavy_library", writes_bytecode=False) == ""  # shipped, or kept by a prefix
    assert missing_bytecode_hint("no_such_library_here", writes_bytecode=False) == ""
