"""The phase clock, the summary metrics and peak memory, on the CPU (and on CUDA where there is one)."""

import gc
import gzip
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, load_model
from PIL import Image

from runner import flops, worker
from runner.accelerators import build_accelerator
from runner.config import compose_job, to_config
from runner.flops import denoiser_flop_per_step
from runner.measure import (
    CallTiming,
    PhaseClock,
    Stopwatch,
    one_torch_thread,
    peak_memory,
    steadiness,
    steady_host,
    summarize,
)
from runner.pipelines import build_pipeline
from runner.record import Measurement, Steadiness, WorkerResult
from runner.timeline import Timeline
from runner.worker import heartbeat


def timed_call(device: torch.device, task: str = "t2i", steps: int = 3, **extra) -> tuple[CallTiming, PhaseClock]:
    pipe = build_pipeline(load_model("tiny_sdxl"), task, device, torch.float32)
    clock = PhaseClock(pipe.unet, device)
    kwargs = {"prompt": "a lighthouse", "num_inference_steps": steps, "guidance_scale": 5.0, **extra}
    _, timing = clock.time_call(lambda: pipe(**kwargs))
    return timing, clock


def test_phases_add_up_to_the_call_and_steps_are_counted() -> None:
    timing, clock = timed_call(torch.device("cpu"), steps=3, height=64, width=64)
    assert timing.denoise_steps == 3
    assert min(timing.text_encode_s, timing.denoise_s, timing.decode_s) > 0
    phases = timing.text_encode_s + timing.denoise_s + timing.decode_s
    assert phases == pytest.approx(timing.latency_s, rel=1e-9)
    args, _kwargs = clock.step_inputs
    assert args[0].device.type == "meta" and tuple(args[0].shape) == (2, 4, 8, 8)  # guided: batch 2


def test_image_to_image_counts_only_the_steps_it_runs() -> None:
    """SDXL img2img with strength 0.5 runs half the steps: it/s must divide by those, not by steps."""
    image = Image.new("RGB", (64, 64), (90, 120, 200))
    timing, _ = timed_call(torch.device("cpu"), task="i2i", steps=4, image=image, strength=0.5)
    assert timing.denoise_steps == 2


def test_summary_statistics() -> None:
    timings = [
        CallTiming(latency_s=x, text_encode_s=0.1, denoise_s=x - 0.3, decode_s=0.2, denoise_steps=10)
        for x in (1.0, 1.1, 1.2, 1.3)
    ]
    metrics = summarize(timings)
    assert metrics["latency_s"] == pytest.approx(1.15)
    assert metrics["latency_p50_s"] == pytest.approx(1.15)
    assert metrics["latency_p90_s"] == pytest.approx(np.percentile([1.0, 1.1, 1.2, 1.3], 90))
    assert metrics["latency_std_s"] == pytest.approx(np.std([1.0, 1.1, 1.2, 1.3], ddof=1))
    assert metrics["latency_cv"] == pytest.approx(metrics["latency_std_s"] / 1.15)
    assert metrics["its"] == pytest.approx(40 / (0.7 + 0.8 + 0.9 + 1.0))
    assert metrics["denoise_steps"] == 10


def test_flops_of_the_tiny_denoiser_match_its_real_inputs() -> None:
    _, clock = timed_call(torch.device("cpu"), height=64, width=64)
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32)
    flop = denoiser_flop_per_step(pipe.unet, clock.step_inputs)
    assert 1e6 < flop < 1e11


def test_flop_counts_are_kept_per_architecture_and_shape(tmp_path: Path, monkeypatch) -> None:
    _, clock = timed_call(torch.device("cpu"), height=64, width=64)
    _, wider = timed_call(torch.device("cpu"), height=64, width=96)
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32)
    cache = tmp_path / "flops.json"
    first = denoiser_flop_per_step(pipe.unet, clock.step_inputs, cache)
    assert first == denoiser_flop_per_step(pipe.unet, clock.step_inputs)  # the cache changes nothing
    counted = []
    monkeypatch.setattr(flops, "_count_flops", lambda *args: counted.append(args) or 1.0)
    assert denoiser_flop_per_step(pipe.unet, clock.step_inputs, cache) == first  # from the cache
    assert not counted
    assert denoiser_flop_per_step(pipe.unet, wider.step_inputs, cache) == 1.0  # another shape: counted
    assert denoiser_flop_per_step(pipe.unet.to(torch.float16), clock.step_inputs, cache) == 1.0  # another dtype
    assert len(counted) == 2 and len(json.loads(cache.read_text())) == 3


def test_a_flop_count_is_found_again_by_the_next_process() -> None:
    """Each job's worker is a process of its own, and Python orders a set's strings differently in each (diffusers
    lists the config keys it defaulted from a set): the cache's key must not depend on that."""
    count_key = (
        "import torch; from diffusers import UNet2DConditionModel as Unet; from runner.flops import _flop_key; "
        "unet = Unet.from_config(Unet.load_config('runner/architectures/tiny_sdxl/unet')); "
        "print(_flop_key(unet, ((torch.empty(2, 4, 8, 8, device='meta'), torch.empty((), device='meta')), {})))"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", count_key],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[1],
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1


def test_peak_rss_is_recorded_on_cpu() -> None:
    metrics: dict[str, float] = {}
    with peak_memory(torch.device("cpu"), into=metrics):
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
        block.sum()
    assert set(metrics) == {"peak_rss_gib"} and metrics["peak_rss_gib"] > 64 / 1024


def test_stopwatch_measures_wall_time() -> None:
    with Stopwatch(torch.device("cpu")) as watch:
        sum(range(100_000))
    assert 0 < watch.seconds < 5


@pytest.mark.gpu
def test_cuda_events_and_peak_memory() -> None:
    device = torch.device("cuda")
    metrics: dict[str, float] = {}
    with peak_memory(device, into=metrics):
        timing, _ = timed_call(device, height=64, width=64)
    assert timing.denoise_steps == 3 and timing.latency_s > 0
    phases = timing.text_encode_s + timing.denoise_s + timing.decode_s
    assert phases == pytest.approx(timing.latency_s, rel=1e-3)
    assert set(metrics) == {"peak_mem_gib", "peak_reserved_gib"}
    assert 0 < metrics["peak_mem_gib"] <= metrics["peak_reserved_gib"]


def test_steady_host_pins_only_cuda_work_to_its_core() -> None:
    before = os.sched_getaffinity(0)
    core = max(before)
    with steady_host(torch.device("cpu"), core):  # CPU jobs need every core
        assert not gc.isenabled() and os.sched_getaffinity(0) == before
    assert gc.isenabled()
    with steady_host(torch.device("cuda"), core):  # pinning needs no GPU to be checked
        assert os.sched_getaffinity(0) == {core} and not gc.isenabled()
    assert os.sched_getaffinity(0) == before and gc.isenabled()
    with steady_host(torch.device("cuda"), None):  # no core leased: not pinned
        assert os.sched_getaffinity(0) == before


def test_one_torch_thread_only_for_pinned_cuda_work() -> None:
    threads, core = torch.get_num_threads(), max(os.sched_getaffinity(0))
    with one_torch_thread(torch.device("cuda"), core):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    for device, leased in ((torch.device("cpu"), core), (torch.device("cuda"), None)):
        with one_torch_thread(device, leased):
            assert torch.get_num_threads() == threads


def test_what_was_compiled_in_the_warmup_is_not_recompiled_when_pinned() -> None:
    """torch.compile guards on torch's thread count: the timed calls must see the warmup's."""
    torch._dynamo.reset()
    double = torch.compile(lambda x: x * 2, backend="eager")
    cuda, core = torch.device("cuda"), max(os.sched_getaffinity(0))
    with one_torch_thread(cuda, core):
        double(torch.ones(2))  # the warmup
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with steady_host(cuda, core):
            double(torch.ones(2))  # a timed call
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_only_the_timed_calls_are_pinned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warmup (where compilation starts its worker processes, which inherit the starting thread's cores) runs
    on every core; the timed calls run on the leased one; torch's thread count is the same for both."""
    active = []

    def recorder(what: str) -> Callable:
        @contextmanager
        def recording(device: torch.device, core: int | None) -> Iterator[None]:
            active.append(f"{what} {core}")
            yield
            active.remove(f"{what} {core}")

        return recording

    monkeypatch.setattr(worker, "steady_host", recorder("pinned"))
    monkeypatch.setattr(worker, "one_torch_thread", recorder("one thread"))
    cfg = to_config(compose_job("res=64", "steps=2", "warmup=2", "runs=3", f"cache_dir={tmp_path}"))
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32)
    calls = []
    real_call = type(pipe).__call__

    def recording_call(self: object, **kwargs: object) -> object:
        calls.append(list(active))
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    clock = PhaseClock(pipe.unet, torch.device("cpu"))
    worker.time_calls(
        cfg, pipe, build_accelerator(cfg.accelerator), clock, ["a lighthouse"], None, 3, WorkerResult(), Timeline()
    )
    warmup, timed = ["one thread 3"], ["one thread 3", "pinned 3"]
    assert calls == [warmup, warmup, timed, timed, timed]


def test_a_compile_while_timed_takes_the_verdict_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Times that include compiling are not the accelerator's times, however steady they are."""
    torch._dynamo.reset()
    step = torch.compile(lambda x: x + 1, backend="eager", dynamic=False)
    cfg = to_config(compose_job("res=64", "steps=2", "warmup=1", "runs=3", f"cache_dir={tmp_path}"))
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32)
    real_call, calls = type(pipe).__call__, []

    def call_compiling_a_new_shape_in_the_second_timed_call(self: object, **kwargs: object) -> object:
        calls.append(None)
        step(torch.ones(3 if len(calls) == 3 else 2))  # warmup, timed 1: one shape; timed 2: a new one
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call_compiling_a_new_shape_in_the_second_timed_call)
    result = WorkerResult(facts={})
    clock = PhaseClock(pipe.unet, torch.device("cpu"))
    worker.time_calls(cfg, pipe, build_accelerator(cfg.accelerator), clock, ["a"], None, None, result, Timeline())
    assert result.metrics["timed_compiles"] == 1 and result.metrics["timed_compile_s"] > 0
    result.series["call_latency_s"] = [1.0, 1.0, 1.0]  # steady as can be
    verdict = worker.judge_measurement(result, None)
    assert verdict.steadiness is Steadiness.NOISY and "compiled 1 graph(s) during the timed calls" in verdict.why


def test_a_clock_set_during_the_warmup_is_reported_since_torchs_compile_timers_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A time-keeping daemon stepping the system clock by 1,000 s in the middle of a compile (far more than a
    loaded machine's warmup takes): torch's compile timer reads more than the whole warmup around it lasted (CI of
    6c0e5c0: compile_s 54.1 s in a 44.3 s warmup), and the job says by how much the clock was set, so the reading
    is not taken for a measurement."""
    from torch._dynamo.utils import compilation_time_metrics

    torch._dynamo.reset()
    stepped, real_time_ns = [0], time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + stepped[0])

    def backend_while_the_clock_is_set(graph: torch.fx.GraphModule, inputs: list) -> Callable:
        stepped[0] += 1000 * 10**9
        return graph.forward

    step = torch.compile(lambda x: x + 1, backend=backend_while_the_clock_is_set, dynamic=False)
    cfg = to_config(compose_job("res=64", "steps=2", "warmup=1", "runs=1", f"cache_dir={tmp_path}"))
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32)
    real_call = type(pipe).__call__

    def call_compiling(self: object, **kwargs: object) -> object:
        step(torch.ones(2))
        return real_call(self, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call_compiling)

    def warm_and_time() -> WorkerResult:
        result = WorkerResult(facts={})
        accelerator, clock = build_accelerator(cfg.accelerator), PhaseClock(pipe.unet, torch.device("cpu"))
        worker.time_calls(cfg, pipe, accelerator, clock, ["a"], None, None, result, Timeline())
        return result

    before = sum(compilation_time_metrics.get("_compile.compile_inner", ()))
    result = warm_and_time()
    compile_s = sum(compilation_time_metrics["_compile.compile_inner"]) - before
    assert compile_s > result.metrics["warmup_s"]  # torch's timer, across the step
    assert compile_s - 1000 <= result.metrics["warmup_s"]  # less the step, within the warmup
    assert result.metrics["warmup_clock_step_s"] == pytest.approx(1000, abs=0.01)
    assert "timed_compile_s" not in result.metrics  # the compile was the warmup's
    said = re.search(r"WARNING: the system clock was set by \+([0-9.]+) s during the warmup", capsys.readouterr().out)
    assert said and float(said[1]) == pytest.approx(1000, abs=0.01)
    stepped[0] = 0  # no step: nothing said
    result = warm_and_time()
    assert "warmup_clock_step_s" not in result.metrics and "system clock" not in capsys.readouterr().out


def test_the_calendar_offset_keeps_the_read_least_delayed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread preempted between its reads of the two clocks would count its pause as a step of the clock: of a
    few reads, each bracketed by the monotonic clock, the tightest bracket is kept."""
    from runner import measure

    monotonic = iter([0, 3_000_000, 10_000_000, 10_000_100, 20_000_000, 20_000_200])  # 3 ms, 100 ns, 200 ns
    calendar = iter([5_000_000, 10_000_050, 20_000_100])  # the first read came late, mid-pause
    monkeypatch.setattr(time, "monotonic_ns", lambda: next(monotonic))
    monkeypatch.setattr(time, "time_ns", lambda: next(calendar))
    assert measure._calendar_offset_ns(reads=3) == 0


def test_steadiness_of_timed_calls() -> None:
    assert steadiness([1.0]).steadiness is Steadiness.UNCHECKED
    assert steadiness([1.00, 1.02, 0.99, 1.01, 1.00, 0.98, 1.01, 1.00, 1.02, 0.99]) == Measurement(
        Steadiness.STEADY, "CV 1.3%"
    )
    # The deepcache run on a loaded host: 0.6 to 24 s.
    noisy = steadiness([4.5, 19.6, 13.6, 10.4, 24.4, 7.8, 4.2, 0.78, 0.63, 0.65])
    assert noisy.steadiness is Steadiness.NOISY and noisy.why == "the calls' spread is 96.2% of their mean (over 15%)"
    # A host that slowed down halfway: small spread within each half, a 12% step between them.
    drift = steadiness([1.00, 1.01, 0.99, 1.00, 1.01, 1.12, 1.13, 1.12, 1.11, 1.12])
    assert drift.steadiness is Steadiness.NOISY and drift.why.startswith("the second half of the calls ran 12% slower")
    # The same step inside the noise of noisier calls is not drift.
    assert steadiness([1.0, 1.25, 0.85, 1.2, 0.95, 1.05, 1.3, 0.9, 1.15, 1.1]).steadiness is Steadiness.STEADY


def test_steadiness_on_the_h100_runs_behind_benchmarks() -> None:
    """The rule against measured calls (BENCHMARKS.md): every graphed or compiled run of 2026-11-25 is steady;
    the eager ones with bursts of slow calls (CV 16-23%) are not."""
    results = ROOT / "benchmarks" / "results"
    runs = json.loads((results / "2026-11-25-h100" / "runs_accelerators.json").read_text())
    runs += json.loads((results / "2026-11-26-h100x2" / "runs_parallel_start2.json").read_text())
    verdicts = {}
    for run in runs:
        calls = run["series"]["call_latency_s"]
        verdicts[(run["name"], run["tags"]["sweep_id"][:4])] = steadiness(calls).steadiness
    graphed = {key: v for key, v in verdicts.items() if "graph" in key[0] or "compile" in key[0]}
    assert graphed and set(graphed.values()) == {Steadiness.STEADY}
    assert verdicts[("sdxl_base/t2i/512/deepcache", "015e")] is Steadiness.NOISY  # CV 18.7%
    assert verdicts[("sdxl_base/t2i/1024/none", "2a10")] is Steadiness.NOISY  # CV 23%: bursts to 3.6 s
    assert verdicts[("sdxl_base/t2i/1024/none", "9472")] is Steadiness.STEADY  # CV 7.8%


@pytest.mark.parametrize(
    ("results", "rows", "row"),
    [
        ("2026-12-06-h200-bf16-pinned", 21, "| t2i 1024, 3 | `cg_bf16_pinned` | 0.9261, 0.4% |"),
        ("2026-12-06-h100-bf16-layout", 24, "| t2i 1024, 3 | `compile_graph_bf16` | 0.9390, 0.4% |"),
        ("2026-12-06-h100-512-profile", 6, "| t2i 512, 2 | `cg_fast_text_attention` | 0.3315, 0.3% |"),
        ("2026-12-06-h100-text-attention-promoted", 15, "| t2i 512, 3 | `cg_fast_short_attention` | 0.3269, 0.1% |"),
    ],
)
def test_a_sections_run_table_is_what_runs_table_makes_of_its_raw_results(results: str, rows: int, row: str) -> None:
    """BENCHMARKS.md's "compile_graph_bf16 with the layout parts", "compile_graph_bf16 on an H100" and "text_attention
    in compile_graph_fast" give their tables as benchmarks/runs_table.py's output on that start's runs.json: the
    figures a reader sees are the ones the raw results hold, row for row."""
    made = subprocess.run(
        [sys.executable, "benchmarks/runs_table.py", f"benchmarks/results/{results}/runs.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert made.count("\n| ") == rows  # every finished run but the baselines measured again
    assert row in made
    assert made in (ROOT / "BENCHMARKS.md").read_text()


def test_a_heartbeat_says_what_is_still_running(capsys: pytest.CaptureFixture) -> None:
    cfg = to_config(compose_job("res=64"))
    deadline = time.monotonic() + 30
    with heartbeat(cfg, "warming up", every_s=0.01):
        while "still warming up: " not in capsys.readouterr().out and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = time.monotonic() < deadline
    assert seen
    capsys.readouterr()  # beats said between the loop's last read and the block's end (CI once caught one here)
    time.sleep(0.05)
    assert capsys.readouterr().out == ""  # it stops with the block: its thread is joined on the way out


def run_script(script: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT OUT OVERRIDES`` as BENCHMARKS.md runs it, its caches beside ``out``; it must
    succeed."""
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", str(out), *overrides, f"cache_dir={out.parent}/cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.parametrize("task", ["t2i", "i2i"])
def test_the_runner_against_bare_benchmark_runs_as_benchmarks_md_runs_it(task: str, tmp_path: Path) -> None:
    """benchmarks/overhead.py end to end on a tiny CPU pipeline, for both tasks: every series timed, the phases
    read, nothing compiled while they alternate. (Pinning and the thread count act on CUDA only; the GPU runs
    behind BENCHMARKS.md are where they show.)"""
    out = tmp_path / "overhead.json"
    done = run_script("overhead.py", out, "model=tiny_sdxl", f"task={task}", "res=64", "runs=2")
    result = json.loads(out.read_text())
    assert [len(result["series"][name]) for name in ("bare", "bare_hooked", "runner")] == [2, 2, 2]
    assert result["compiled_during_series"] == 0 and result["bare_mean_s"] > 0
    assert 0 < result["runner_text_encode_s"] < result["runner_mean_s"]
    assert "runner vs bare" in done.stdout


def test_the_profile_script_writes_into_a_folder_given_as_out(tmp_path: Path) -> None:
    """benchmarks/kernel_profile.py's OUT: a prefix as given; an existing folder holds profile_<accelerator>_<res>."""
    from kernel_profile import output_prefix

    overrides = ["model=sdxl_base", "res=1024", "accelerator=fp8_layout", "hydra.searchpath=[file://x]"]
    assert output_prefix(tmp_path / "run", overrides) == tmp_path / "run"
    assert output_prefix(tmp_path, overrides) == tmp_path / "profile_fp8_layout_1024"
    assert output_prefix(tmp_path, ["model=tiny_sdxl"]) == tmp_path / "profile_none_default"


def test_the_profile_script_times_its_calls_unpinned_pinned_and_paused(capsys: pytest.CaptureFixture) -> None:
    """benchmarks/kernel_profile.py's timed calls, three blocks of cfg.runs, the second under the runner's
    steady_host with the core given (on the CPU nothing is pinned, as in the runner), the third with a pause
    between calls; no core, no pinned block."""
    from kernel_profile import warm_and_time
    from prepare import prepare

    prepared = prepare(["model=tiny_sdxl", "res=64", "runs=2", "steps=2", "accelerator=none"])
    args = (prepared.cfg, prepared.pipe, prepared.image, prepared.device, "")
    timed = warm_and_time(*args, core=0)
    assert list(timed) == ["unpinned", "pinned", "unpinned, calls 0.5 s apart"]
    assert [block["core"] for block in timed.values()] == [None, 0, None]
    for block in timed.values():
        assert len(block["calls"]) == 2 and block["mean_latency_s"] > 0 and block["gpu"] == {}
        assert {"launch_thread_cpu_share", "launch_thread_wait_share", "launch_core_loop_ms"} <= set(block["host"])
    # the pause is outside the timed calls, and counted as the time between them: one pause among two calls
    assert timed["unpinned, calls 0.5 s apart"]["between_calls_s"] >= 0.25
    said = capsys.readouterr().out  # each block said as it ends, before any profiling
    assert said.count(" s a call, ") == 3 and "pinned to core 0: " in said and "launch_thread_cpu_share" in said
    assert list(warm_and_time(*args, core=None)) == ["unpinned", "unpinned, calls 0.5 s apart"]


def test_the_core_speed_script_times_its_probes_before_each_call(tmp_path: Path) -> None:
    """benchmarks/core_speed.py end to end on a tiny CPU pipeline: both probes and the thread's counters for every
    call (nothing pinned on the CPU, as in the runner)."""
    out = tmp_path / "core_speed.json"
    done = run_script("core_speed.py", out, "model=tiny_sdxl", "res=64", "runs=3", "steps=2")
    result = json.loads(out.read_text())
    assert result["core"] is None and len(result["calls"]) == 3
    for call in result["calls"]:
        assert call["latency_s"] > 0 and call["python_probe_s"] > 0 and call["launch_probe_s"] > 0
        assert call["minor_faults"] >= 0 and call["involuntary_switches"] >= 0
    lines = done.stdout.splitlines()
    assert sum(line.startswith("call ") for line in lines) == 3 and "correlation of the latency" in lines[-1]


def test_the_threads_watch_puts_a_pinned_threads_time_on_its_core(tmp_path: Path) -> None:
    """benchmarks/threads_watch.py as a process beside this one: this thread, pinned to a core and spinning for
    0.3 s of its own CPU time, is seen on that core with about that many ticks (the kernel counts in ticks of 10
    ms or less: half allowed), and the core's own ticks hold them (each counted by the kernel apart: 20% allowed)."""
    from threads_watch import summarise

    out, core = tmp_path / "threads.json", max(os.sched_getaffinity(0))
    watcher = subprocess.Popen([sys.executable, "benchmarks/threads_watch.py", str(out), "0.05"], cwd=ROOT)
    allowed = os.sched_getaffinity(0)
    try:
        time.sleep(0.3)  # its first reading
        os.sched_setaffinity(0, {core})
        began = time.thread_time()
        while time.thread_time() - began < 0.3:
            pass
    finally:
        os.sched_setaffinity(0, allowed)
        watcher.terminate()  # it reads once more, while this thread still exists, then writes
        assert watcher.wait(timeout=30) == 0
    watch = json.loads(out.read_text())
    seen = summarise(watch, core, 0, time.time() + 1)
    mine = [ticks for name, ticks in seen["threads"].items() if f"tid {threading.get_native_id()}," in name]
    tick = watch["tick_s"]
    assert mine and mine[0] * tick >= 0.15, seen
    assert seen["core_ticks"]["user"] + seen["core_ticks"]["system"] >= 0.8 * mine[0], seen  # counted apart
    assert len(watch["interrupts"]) == 2 and watch["samples"][-1]["t"] > watch["samples"][0]["t"]


def test_kernel_breakdown_puts_each_kernel_in_its_phase_and_kind() -> None:
    """benchmarks/kernel_profile.py's reading of a profiler trace, on events written here: two denoiser steps."""
    from kernel_profile import STEP, breakdown

    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = [
        kernel("ampere_sgemm_128x64_tn", 0, 10),  # text encoder
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP, "ts": 20, "dur": 30},
        kernel("sm90_xmma_fprop_implicit_gemm_f16f16", 20, 12),
        kernel("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 32, 8),
        kernel("triton_poi_fused_add_mul_0", 40, 5),
        kernel("triton_red_fused_native_group_norm_1", 45, 5),  # fused: Triton before norm
        kernel("vectorized_elementwise_kernel", 55, 2),  # the scheduler, between the steps
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP, "ts": 60, "dur": 20},
        kernel("sm90_xmma_gemm_e4m3e4m3_f32_bf16", 60, 15),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 70, "dur": 4},  # overlaps
        kernel("sm90_xmma_fprop_implicit_gemm_f16f16", 90, 10),  # the VAE decoder
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # not a kernel
    ]
    result = breakdown(events)
    assert result["steps_seen"] == 2 and result["kernels"] == 9
    assert result["ms_by_phase_and_kind"] == {
        "before first step": {"matmul": 0.01},
        "denoiser steps": {
            "attention": 0.008,
            "convolution": 0.012,
            "copy": 0.004,
            "float8 matmul": 0.015,
            "fused (Triton)": 0.01,
        },
        "between steps": {"other": 0.002},
        "after last step": {"convolution": 0.01},
    }
    assert result["gpu_span_ms"] == 0.1 and result["gpu_busy_ms"] == pytest.approx(0.067)  # 4 us overlapped
    assert result["busiest_kernels"][0] == {
        "name": "sm90_xmma_fprop_implicit_gemm_f16f16",
        "kind": "convolution",
        "ms": 0.022,
        "count": 2,
    }


def test_the_kernels_named_like_a_pattern_are_listed_by_phase_with_their_grids() -> None:
    """benchmarks/kernel_profile.py's --trace PATTERN: each matching kernel once a phase, its launches and mean time,
    the first launch's grid and block; kernels of other names and other categories left out."""
    from kernel_profile import STEP, matching

    def kernel(name: str, ts: float, dur: float, grid: list[int]) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"grid": grid, "block": [128]}}

    events = [
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP, "ts": 0, "dur": 40},
        kernel("triton_poi_fused_native_group_norm_silu_1", 0, 10, [30720, 1, 1]),
        kernel("sm90_xmma_fprop_implicit_gemm", 10, 10, [110, 1, 1]),
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP, "ts": 50, "dur": 40},
        kernel("triton_poi_fused_native_group_norm_silu_1", 50, 20, [30720, 1, 1]),
        kernel("triton_red_fused_native_group_norm_2", 100, 30, [57664, 1, 1]),  # after the last step: the VAE
        {"ph": "X", "cat": "cpu_op", "name": "aten::native_group_norm", "ts": 0, "dur": 5},
    ]
    assert matching(events, "group_norm") == [
        {
            "phase": "denoiser steps",
            "name": "triton_poi_fused_native_group_norm_silu_1",
            "launches": 2,
            "us": 30.0,
            "grid": [30720, 1, 1],
            "block": [128],
            "mean_us": 15.0,
        },
        {
            "phase": "after last step",
            "name": "triton_red_fused_native_group_norm_2",
            "launches": 1,
            "us": 30.0,
            "grid": [57664, 1, 1],
            "block": [128],
            "mean_us": 30.0,
        },
    ]


def test_idle_time_is_put_between_the_operations_around_it() -> None:
    """benchmarks/kernel_profile.py's idle reading: each gap by what came before and after it, overlapping
    operations leaving none, and the kernels the memsets came before."""
    from kernel_profile import idle_between

    def op(cat: str, name: str, ts: float, dur: float, **args) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    events = [
        op("kernel", "gemm", 0, 10),
        op("gpu_memset", "Memset (Device)", 11, 1, bytes=4),  # 1 us after the kernel
        op("kernel", "cudnn_sdpa", 15, 10),  # 3 us after the memset
        op("gpu_memset", "Memset (Device)", 26, 1, bytes=4),
        op("kernel", "cudnn_sdpa", 30, 5),
        op("gpu_memcpy", "Memcpy DtoD", 32, 6),  # overlaps the kernel: no gap
        op("kernel", "triton_poi_fused_add_0", 40, 2),  # 2 us after the copy's end
        op("kernel", "gemm", 42.5, 1),
        op("cpu_op", "aten::mm", 0, 50),  # not on the GPU
    ]
    result = idle_between(events)
    assert {row["between"]: (row["gaps"], row["ms"]) for row in result["idle_by_neighbours"]} == {
        "memset → kernel": (2, pytest.approx(0.006)),
        "kernel → memset": (2, pytest.approx(0.002)),
        "copy → kernel": (1, pytest.approx(0.002)),
        "kernel → kernel": (1, pytest.approx(0.0005)),
    }
    assert result["idle_by_neighbours"][0]["mean_us"] == pytest.approx(3.0)
    assert result["memsets_by_bytes"] == {4: 2}
    assert result["memsets_followed_by"] == {"cudnn_sdpa": 2}


def test_host_before_first_step_says_where_the_host_waited_for_the_gpu() -> None:
    """benchmarks/kernel_profile.py's reading of the host's side before the first step, on events written here:
    outermost operations counted once, each synchronisation put in the operation it happened in."""
    from kernel_profile import CALL, STEP, host_before_first_step

    def on_cpu(cat: str, name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        on_cpu("user_annotation", CALL, 100, 900),
        on_cpu("cpu_op", "aten::to", 110, 50),  # the text's ids to the GPU: a blocking copy
        on_cpu("cpu_op", "aten::_to_copy", 112, 45),  # inside aten::to: not counted again
        on_cpu("cuda_runtime", "cudaMemcpyAsync", 120, 5),
        on_cpu("cuda_runtime", "cudaStreamSynchronize", 126, 30),
        on_cpu("cuda_runtime", "cudaGraphLaunch", 170, 10),  # a replay: no wait
        on_cpu("cpu_op", "aten::nonzero", 300, 100),
        on_cpu("cuda_runtime", "cudaStreamSynchronize", 310, 80),
        on_cpu("cuda_runtime", "cudaDeviceSynchronize", 420, 20),  # outside torch's operations
        on_cpu("user_annotation", STEP, 500, 100),
        on_cpu("cpu_op", "aten::to", 520, 40),  # inside the step: not before it
        on_cpu("cuda_runtime", "cudaStreamSynchronize", 530, 20),
        {"ph": "X", "cat": "gpu_user_annotation", "name": STEP, "ts": 505, "dur": 100},  # the GPU's side
    ]
    assert host_before_first_step(events) == {
        "ms": 0.4,
        "in_torch_ops_ms": 0.15,
        "waiting_ms": 0.13,
        "waits": 3,
        "waits_by_op": {"(outside torch's operations)": 1, "aten::nonzero": 1, "aten::to": 1},
    }
    assert host_before_first_step([e for e in events if e["name"] != CALL]) == {}  # no call range: nothing said


def test_python_before_first_step_ranks_functions_in_the_window() -> None:
    """kernel_profile's reading of a trace with Python's functions: only what lies between the call's start and
    the first step, a function that calls itself counted once."""
    from kernel_profile import CALL, STEP, python_before_first_step

    def event(cat: str, name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [
        event("python_function", "runner(1): before the call", 0, 50),  # before the call: not counted
        event("user_annotation", CALL, 100, 2000),
        event("python_function", "pipeline.py(10): __call__", 100, 1900),  # runs past the first step: not counted
        event("python_function", "pipeline.py(20): encode_prompt", 110, 600),
        event("python_function", "torch_utils.py(5): walk", 120, 300),
        event("python_function", "torch_utils.py(5): walk", 130, 100),  # inside the walk above: once
        event("python_function", "torch_utils.py(5): walk", 500, 200),
        event("python_function", "tokenizer.py(7): __call__", 750, 150),
        event("user_annotation", STEP, 1000, 100),
        event("python_function", "torch_utils.py(5): walk", 1200, 50),  # after the first step: not counted
    ]
    assert python_before_first_step(events) == {
        "ms": 0.9,
        "functions_ms": {
            "pipeline.py(20): encode_prompt": 0.6,
            "torch_utils.py(5): walk": 0.5,
            "tokenizer.py(7): __call__": 0.15,
        },
    }
    assert python_before_first_step([e for e in events if e["name"] != STEP]) == {}


def test_kernel_profile_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/kernel_profile.py on a tiny CPU pipeline: its calls timed, the profiled call's trace written with a
    range around every denoiser step (the GPU's kernels and their ranges exist on a GPU only)."""
    done = run_script("kernel_profile.py", tmp_path / "profile", "model=tiny_sdxl", "res=64", "runs=2", "steps=3")
    result = json.loads((tmp_path / "profile.json").read_text())
    assert len(result["calls"]) == 2 and result["calls"][0]["denoise_steps"] == 3 and result["mean_latency_s"] > 0
    assert result["timed_calls_gpu"] == {}  # no GPU: no energy or clock counters, and none made up
    with gzip.open(tmp_path / "profile.trace.json.gz", "rt") as packed:
        events = json.load(packed)
    assert sum(event.get("name") == "denoiser_step" for event in events) == 3
    assert "| phase |" in done.stdout
    host = result["host_before_first_step"]  # the CPU's own: no GPU to wait for
    assert host["ms"] > 0 and host["waits"] == 0 and "before the first step the host took" in done.stdout
    python = result["python_before_first_step"]  # the second profiled call's, with Python's functions
    assert any("encode_prompt" in name for name in python["functions_ms"]) and "Python's functions" in done.stdout
    assert (tmp_path / "profile.python.trace.json.gz").exists()
