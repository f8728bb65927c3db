"""Timing and memory of pipeline calls (their FLOPs: runner/flops.py).

Each call is split at the denoiser's first and last step: ``text_encode_s`` runs from the call's start to the
first denoiser step (prompt encoding; for image-to-image also encoding the input image), ``denoise_s`` from
the first step's start to the last step's end (the denoiser and the scheduler), ``decode_s`` from there to
the call's end (VAE decoding and conversion to PIL). The three add up to ``latency_s``. On CUDA every mark
is a CUDA event, read after the call synchronises; on the CPU it is ``time.perf_counter``.
"""

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from runner.host import gpu_reading
from runner.record import Measurement, Steadiness

GIB = 2**30


class Marker:
    """A point in time on the device's clock: a CUDA event, or perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.at = 0.0

    def mark(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.at = time.perf_counter()

    def seconds_until(self, later: "Marker") -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event) / 1000.0
        return later.at - self.at


@dataclass
class CallTiming:
    latency_s: float
    text_encode_s: float
    denoise_s: float
    decode_s: float
    denoise_steps: int


class PhaseClock:
    """Times pipeline calls, split at the denoiser's first and last step.

    Hooks on the denoiser module (whatever an accelerator made of it) mark its steps and count them; the
    first step's inputs are kept as shapes only, for counting FLOPs afterwards.
    """

    def __init__(self, denoiser: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.start, self.first_step, self.last_step, self.end = (Marker(device) for _ in range(4))
        self.steps = 0
        self.step_inputs: tuple[tuple, dict] | None = None
        self._hooks = [
            denoiser.register_forward_pre_hook(self._before_step, with_kwargs=True),
            denoiser.register_forward_hook(self._after_step),
        ]

    def detach(self) -> None:
        """Remove the hooks from the denoiser."""
        for hook in self._hooks:
            hook.remove()

    def _before_step(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self.steps == 0:
            self.first_step.mark()
            if self.step_inputs is None:
                self.step_inputs = tree_map(_as_meta, (args, kwargs))
        self.steps += 1

    def _after_step(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.last_step.mark()

    def time_call(self, call: Callable[[], Any]) -> tuple[Any, CallTiming]:
        """Run ``call`` once; return its result and its timing (synchronised before reading).

        Python's garbage is collected first, outside the timed region (see ``steady_host``)."""
        gc.collect()
        self.steps = 0
        self.start.mark()
        result = call()
        self.end.mark()
        synchronize(self.device)
        if self.steps == 0:
            raise RuntimeError("the denoiser never ran during the call: check model.denoiser")
        timing = CallTiming(
            latency_s=self.start.seconds_until(self.end),
            text_encode_s=self.start.seconds_until(self.first_step),
            denoise_s=self.first_step.seconds_until(self.last_step),
            decode_s=self.last_step.seconds_until(self.end),
            denoise_steps=self.steps,
        )
        return result, timing


def _as_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graphs_compiled() -> int:
    """How many graphs torch.compile has captured in this process so far (0 if it never ran)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def compile_seconds() -> float:
    """Seconds Dynamo has spent compiling frames in this process so far, graph or no graph (torch's own timer,
    which reads the calendar clock: Stopwatch), 0 if it never ran."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


@contextmanager
def one_torch_thread(device: torch.device, core: int | None) -> Iterator[None]:
    """On CUDA with a leased core, torch's CPU operations (the pipeline's image pre- and post-processing) run
    on the launching thread alone: a pool of threads squeezed onto the one pinned core (``steady_host``) made
    image-to-image calls 2.3x slower. Set for the warmup and the timed calls together: torch.compile's guards
    include the thread count, so changing it between them recompiled on the first timed call (2.1 s instead
    of 0.4 s on the H100)."""
    if core is None or device.type != "cuda":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def steady_host(device: torch.device, core: int | None) -> Iterator[None]:
    """Keep the host from adding noise to timed calls.

    Eager pipelines on a GPU are launch-bound: the calling thread's speed is the pipeline's speed. Moving
    between cores and garbage-collection pauses made single calls vary by 5-25% on our GPU host (see
    BENCHMARKS.md), so on CUDA the calling thread is pinned to ``core``, a core of its own that the job leased
    (runner/host.py: never two jobs on one core), and Python's collector is paused throughout (time_call
    collects before each call instead). CPU jobs are never pinned: they need every core. Only the timed calls
    run inside it: the warmup's compilation starts worker processes, which would inherit the one core.
    """
    pin = core is not None and device.type == "cuda"
    allowed = os.sched_getaffinity(0) if pin else set()
    collecting = gc.isenabled()
    if pin:
        os.sched_setaffinity(0, {core})  # 0: the calling thread on Linux
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
        if pin:
            os.sched_setaffinity(0, allowed)


# A run's timed calls carry a verdict only if they look like draws from one steady distribution.
# Spread: over MAX_CV the mean of 10 calls has a standard error near 5%, the smallest difference the comparison
# calls a speedup, so it cannot carry one. Eager SDXL on our H100 hosts: 3-12% CV on quiet stretches; bursts of
# 1.5x slower calls took it to 20-23% and its mean 23% up (BENCHMARKS.md); graphed runs stay under 2%.
MAX_CV = 0.15
MAX_DRIFT = 0.10  # drift: the two halves' means may differ by this share of the mean...
DRIFT_ERRORS = 3.0  # ...unless the gap is also beyond this many standard errors (noise, not drift)
DRIFT_CALLS = 6  # the drift test needs this many calls (3 a half)


def steadiness(latencies: list[float]) -> Measurement:
    """Whether timed calls can carry a verdict: noisy when their spread is over MAX_CV of their mean, or when
    the second half of the calls ran more than MAX_DRIFT faster or slower than the first, beyond noise."""
    calls = np.array(latencies, dtype=float)
    if len(calls) < 2:
        return Measurement(Steadiness.UNCHECKED, "one timed call: its spread is unknown (use runs=2 or more)")
    mean = float(calls.mean())
    cv = float(calls.std(ddof=1)) / mean
    if cv > MAX_CV:
        return Measurement(Steadiness.NOISY, f"the calls' spread is {cv:.1%} of their mean (over {MAX_CV:.0%})")
    if len(calls) >= DRIFT_CALLS:
        half = len(calls) // 2
        first, second = calls[:half], calls[-half:]
        gap = float(second.mean() - first.mean())
        error = float(np.sqrt(first.var(ddof=1) / half + second.var(ddof=1) / half))
        if abs(gap) > MAX_DRIFT * mean and abs(gap) > DRIFT_ERRORS * error:
            return Measurement(
                Steadiness.NOISY,
                f"the second half of the calls ran {abs(gap) / first.mean():.0%} "
                f"{'slower' if gap > 0 else 'faster'} than the first: the host changed during the run",
            )
    return Measurement(Steadiness.STEADY, f"CV {cv:.1%}")


def summarize(timings: list[CallTiming], batch: int = 1) -> dict[str, float]:
    """Metrics over the timed calls. it/s is denoising steps per second of denoising (not per call); images/s
    is the images of all calls over their summed latency."""
    latency = np.array([t.latency_s for t in timings])
    denoise = np.array([t.denoise_s for t in timings])
    steps = np.array([t.denoise_steps for t in timings])
    std = float(latency.std(ddof=1)) if len(latency) > 1 else 0.0
    return {
        "latency_s": float(latency.mean()),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p90_s": float(np.percentile(latency, 90)),
        "latency_min_s": float(latency.min()),
        "latency_std_s": std,
        "latency_cv": std / float(latency.mean()),
        "text_encode_s": float(np.mean([t.text_encode_s for t in timings])),
        "denoise_s": float(denoise.mean()),
        "decode_s": float(np.mean([t.decode_s for t in timings])),
        "denoise_steps": float(steps.mean()),
        "its": float(steps.sum() / denoise.sum()),
        "images_per_s": float(batch * len(latency) / latency.sum()),
        "latency_per_image_s": float(latency.mean() / batch),
    }


@contextmanager
def peak_memory(device: torch.device, into: dict[str, float]):
    """Record peak memory of the block into ``into``: CUDA allocated and reserved, or process RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # so reserved memory reflects the pipeline, not what loading left cached
        torch.cuda.reset_peak_memory_stats(device)
        yield
        into["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        into["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    else:
        _reset_peak_rss()
        yield
        into["peak_rss_gib"] = _peak_rss_bytes() / GIB


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the current RSS (Linux >= 4.0).
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")


def _peak_rss_bytes() -> int:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: the process's lifetime peak, an upper bound

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class GpuMeter:
    """What a GPU's cumulative counters say about a block: NVML's counters read before and after it. The energy
    it drew (millijoules, kept by the driver at its own resolution, so short spikes between the reads count,
    unlike sampled power: the whole GPU's, idle power included), and how long its clocks were held below those
    asked for by its power limit or by its temperature, with its temperature at either end. ``joules`` stays
    None, with ``why``, where there is no energy counter (CPU jobs, GPUs before Volta); a clock counter this
    GPU does not keep is left out of ``clock_limits``, and ``clocks_why`` says why. ``busy`` holds the share of
    the block in which the GPU ran a kernel, from the driver's utilisation samples (``gpu_busy_share``, with their
    count): an eager pipeline whose host cannot launch its kernels fast enough leaves the GPU idle between them, so
    its latency measures the host's CPU as much as the GPU; ``busy_why`` says why it is missing."""

    def __init__(self, gpu_uuid: str) -> None:
        self.gpu_uuid = gpu_uuid
        self.joules: float | None = None
        self.seconds = 0.0
        self.why = "not on a GPU" if not gpu_uuid else ""
        self.clock_limits: dict[str, float] = {}
        self.clocks_why = self.why
        self.busy: dict[str, float] = {}
        self.busy_why = self.why

    def __enter__(self) -> "GpuMeter":
        self._start = gpu_reading(self.gpu_uuid) if self.gpu_uuid else (None, self.why)
        self._began = time.perf_counter()
        self._began_us = time.time_ns() // 1000  # NVML stamps its samples with the wall clock, in microseconds
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._began
        start, why = self._start
        end, why = gpu_reading(self.gpu_uuid, self._began_us) if start is not None else (None, why)
        if start is None or end is None:
            self.why = self.clocks_why = self.busy_why = self.why or why
            return
        self.busy = busy_share(end.busy_samples, self.seconds)
        self.busy_why = "" if self.busy else end.missing.get("busy_samples", "no samples in the block")
        if start.energy_mj is None or end.energy_mj is None:
            self.why = end.missing.get("energy_mj") or start.missing.get("energy_mj", "no energy counter")
        else:
            self.joules = (end.energy_mj - start.energy_mj) / 1000
        for name, before, after in (
            ("power_capped_share", start.power_capped_ns, end.power_capped_ns),
            ("thermal_capped_share", start.thermal_capped_ns, end.thermal_capped_ns),
        ):
            if before is not None and after is not None and self.seconds > 0:
                self.clock_limits[name] = (after - before) / 1e9 / self.seconds
        self.clocks_why = end.missing.get("power_capped_ns") or end.missing.get("thermal_capped_ns", "")
        for name, reading in (("gpu_temp_start_c", start), ("gpu_temp_end_c", end)):
            if reading.temperature_c is not None:
                self.clock_limits[name] = reading.temperature_c


def busy_share(samples: tuple[tuple[int, float], ...], seconds: float) -> dict[str, float]:
    """The share of a block of ``seconds`` in which the GPU ran a kernel, from the driver's utilisation samples
    taken in it ((timestamp µs, percent), oldest first), with their count and the share of the block they cover:
    the driver keeps only its last samples (71 on an H200: 14 s), so for a longer block the share is its end's."""
    if not samples:
        return {}
    percents = [percent for _, percent in samples]
    shares = {"gpu_busy_share": sum(percents) / len(percents) / 100, "gpu_busy_samples": float(len(samples))}
    if len(samples) > 1 and seconds > 0:  # each sample covers the period before it, as long as the gap between two
        span_s = (samples[-1][0] - samples[0][0]) / 1e6
        shares["gpu_busy_covered_share"] = min(1.0, span_s * len(samples) / (len(samples) - 1) / seconds)
    return shares


def energy_metrics(meter: GpuMeter, images: int) -> dict[str, float]:
    """Energy per image, average power and images per kWh of the timed calls; empty without a counter."""
    if meter.joules is None or meter.seconds <= 0 or images <= 0:
        return {}
    return {
        "energy_j_per_image": meter.joules / images,
        "avg_power_w": meter.joules / meter.seconds,
        "images_per_kwh": images / (meter.joules / 3.6e6) if meter.joules > 0 else float("inf"),
    }


class Stopwatch:
    """Wall time of a block, synchronising the device before reading the clock at either end, on the monotonic
    clock; and ``clock_step_s``, how far the system's calendar clock (CLOCK_REALTIME) was set meanwhile against it.
    Time-keeping daemons step that clock, and torch's compile timers read it (``time.time_ns``), so a compile
    timed across a step reads that much more or less than it took."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.clock_step_s = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._offset = _calendar_offset_ns()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        self.clock_step_s = (_calendar_offset_ns() - self._offset) / 1e9


def _calendar_offset_ns(reads: int = 5) -> int:
    """The calendar clock less the monotonic one: constant but where the calendar clock is set (a daemon's
    slewing speeds or slows both alike; only CLOCK_MONOTONIC_RAW escapes it). Each read of the calendar clock sits
    between two of the monotonic one, and the tightest of a few is kept: a thread preempted between two reads on a
    loaded machine (CI read a 1,000 s step as 999.997 s) would otherwise put its pause into the offset."""
    brackets = []
    for _ in range(reads):
        before, calendar, after = time.monotonic_ns(), time.time_ns(), time.monotonic_ns()
        brackets.append((after - before, calendar - (before + after) // 2))
    return min(brackets)[1]
