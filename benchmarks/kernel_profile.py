"""Where one pipeline call's GPU time goes, kernel by kernel: the profile issue "Faster still" asks for.

    python benchmarks/kernel_profile.py OUT model=sdxl_base model.weights=random res=1024 \\
        accelerator=compile_graph cache_dir=/tmp/bench-cache
    python benchmarks/kernel_profile.py --trace OUT.trace.json.gz    # an earlier profile's tables, read again
    python benchmarks/kernel_profile.py --trace OUT.trace.json.gz group_norm    # its kernels named so, by phase

Takes the job's overrides like ``python -m runner`` (``cache_dir=/tmp/bench-cache``: the compiled modules
``benchmarks/table.sh`` keeps on the machine, so neither compiles again what the other did; a variant in
``benchmarks/conf`` needs ``hydra.searchpath=[file://$PWD/benchmarks/conf]``); builds the pipeline, applies the
accelerator and warms up as the runner does (cfg.warmup calls, unpinned, torch on one CPU thread where there is a
core to pin to), freezes the heap as the runner does, times ``cfg.runs`` calls with the runner's clock three times
(BLOCKS: back to back unpinned, back to back pinned to a core near the GPU as the runner pins it, and unpinned with
the GPU idle 0.5 s between calls), then records one more call with torch's profiler. Each denoiser call is marked as
a range, so every kernel is put in a phase: before the first step (text encoders, for image-to-image the VAE
encoder), inside a denoiser step, between steps (the scheduler and the guidance arithmetic), after the last step
(the VAE decoder). And in a kind: matrix products, float8 ones, convolutions, attention, inductor's fused Triton
kernels, norms, copies, other. And where the GPU sat idle: the gaps between its operations by what came before and
after each (kernel, memset, copy), and the kernels that memsets precede. And the host's time before the first step,
where the GPU has little to do and waits for it: how much of it the host spent inside torch's operations, and how
much waiting for the GPU in synchronisations (a blocking copy between host and GPU waits for all the work queued
before it), by the operation that waited. A second profiled call records Python's functions too (``with_stack``),
which slows the host, to say which functions the host's time before the first step went to. Writes OUT.json (the
tables below, the calls' phases, the GPU's busy and idle time, the Python functions), OUT.trace.json.gz and
OUT.python.trace.json.gz (the profiler's Chrome traces: chrome://tracing or ui.perfetto.dev), and prints the tables;
where OUT is a folder, those files go in it, named ``profile_<accelerator>_<res>.*``.
"""

import gc
import gzip
import json
import re
import sys
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prepare import Prepared, prepare

from runner.host import LaunchThread, cores_near
from runner.measure import GpuMeter, PhaseClock, energy_metrics, one_torch_thread, steady_host, synchronize
from runner.worker import pipeline_args

STEP = "denoiser_step"  # the range around each denoiser call
CALL = "pipeline_call"  # the range around the profiled call
# CUDA runtime calls in which the host waits for the GPU's queued work.
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
KINDS = (  # the first pattern a kernel's name matches gives its kind
    ("attention", r"flash|fmha|attention|sdpa"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    # Products, not inductor's kernels named after what they fused: triton_poi_fused__scaled_mm__to_copy_clamp_gelu
    # is a float8 product's input quantised with the GELU before it.
    ("float8 matmul", r"^(?!triton_).*(e4m3|f8f8|fp8|float8|scaled_mm|nvjet_sm90_qq)"),  # nvjet's fp8 GEMMs: "qq"
    ("matmul", r"^(?!triton_).*(gemm|gemv|cutlass|nvjet|xmma|cublas|matmul|_mm_)"),
    ("fused (Triton)", r"^triton_"),
    ("norm", r"norm"),
    ("copy", r"memcpy|memset|copy|cat_"),
)
PHASES = ("before first step", "denoiser steps", "between steps", "after last step")


def kind(name: str) -> str:
    for label, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def step_ranges(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """Each denoiser step's start and end on the GPU: the ranges the profiler draws there for each ``STEP`` range
    (category ``gpu_user_annotation``)."""
    return sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name") == STEP
    )


def phase_of(steps: list[tuple[float, float]]) -> Callable[[dict[str, Any]], str]:
    """Which of PHASES a GPU operation falls in, by the steps' ranges."""
    starts = [start for start, _ in steps]

    def phase(kernel: dict[str, Any]) -> str:
        if not steps or kernel["ts"] < steps[0][0]:
            return PHASES[0]
        if kernel["ts"] >= steps[-1][1]:
            return PHASES[3]
        index = bisect_right(starts, kernel["ts"]) - 1
        return PHASES[1] if kernel["ts"] < steps[index][1] else PHASES[2]

    return phase


def breakdown(events: list[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """The kernels of a Chrome trace (torch's profiler export) by phase and kind, the busiest kernels, and
    how long the GPU was busy from the first kernel to the last. Kernels are placed in phases by the GPU-side
    ranges the profiler draws for each ``STEP`` range (category ``gpu_user_annotation``)."""
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"),
        key=lambda e: e["ts"],
    )
    steps = step_ranges(events)
    phase = phase_of(steps)
    by_phase: dict[str, dict[str, float]] = {name: defaultdict(float) for name in PHASES}
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    busy_us, reach = 0.0, float("-inf")
    for kernel in kernels:
        start, end = kernel["ts"], kernel["ts"] + kernel["dur"]
        by_phase[phase(kernel)][kind(kernel["name"])] += kernel["dur"] / 1e3
        by_name[kernel["name"]][0] += kernel["dur"] / 1e3
        by_name[kernel["name"]][1] += 1
        busy_us += max(0.0, end - max(start, reach))  # the union of kernel intervals (streams may overlap)
        reach = max(reach, end)
    span_us = (kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]) if kernels else 0.0
    busiest = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "gpu_span_ms": span_us / 1e3,
        "gpu_busy_ms": busy_us / 1e3,
        "gpu_idle_ms": (span_us - busy_us) / 1e3,
        "steps_seen": len(steps),
        "kernels": len(kernels),
        "ms_by_phase_and_kind": {name: dict(sorted(kinds.items())) for name, kinds in by_phase.items()},
        "busiest_kernels": [
            {"name": name[:120], "kind": kind(name), "ms": ms, "count": count} for name, (ms, count) in busiest
        ],
    }


def matching(events: list[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    """The kernels whose name matches ``pattern`` (a regular expression), each name in each phase once, in the order
    of its first launch: launches a call (the trace's launches over its steps' calls: one call profiled), the mean
    µs, and the first launch's grid and block, which tell a kernel's tiling (a 2-D grid of an inductor kernel that
    reads one layout and writes another is tiled; a 1-D one is not)."""
    phase = phase_of(step_ranges(events))
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for kernel in sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"]):
        if not re.search(pattern, kernel["name"]):
            continue
        key = (phase(kernel), kernel["name"])
        if key not in found:
            args = kernel.get("args", {})
            found[key] = {"phase": key[0], "name": key[1], "launches": 0, "us": 0.0}
            found[key] |= {"grid": args.get("grid"), "block": args.get("block")}
        found[key]["launches"] += 1
        found[key]["us"] += kernel["dur"]
    return [entry | {"mean_us": entry["us"] / entry["launches"]} for entry in found.values()]


OPERATIONS = {"kernel": "kernel", "gpu_memset": "memset", "gpu_memcpy": "copy"}


def idle_between(events: list[dict[str, Any]], top: int = 5) -> dict[str, Any]:
    """Where the GPU's idle time sits: each gap between one GPU operation's end (the latest end so far, as streams
    may overlap) and the next one's start, put by what came before and after it (kernel, memset, copy). Inside a
    CUDA graph the launches cost nothing on the host, so these gaps are the GPU's own time between nodes. Also
    the memsets: how many, their sizes, and the ``top`` kernels that follow them (a library that zeroes a
    counter before each of its kernels puts a memset node in front of every launch)."""
    operations = sorted((e for e in events if e.get("cat") in OPERATIONS and e.get("ph") == "X"), key=lambda e: e["ts"])
    idle: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    reach, previous = float("-inf"), None
    for operation in operations:
        gap = operation["ts"] - reach
        if previous is not None and gap > 0:
            entry = idle[f"{OPERATIONS[previous['cat']]} → {OPERATIONS[operation['cat']]}"]
            entry[0] += 1
            entry[1] += gap / 1e3
        reach, previous = max(reach, operation["ts"] + operation["dur"]), operation
    memsets: dict[int, int] = defaultdict(int)
    followed_by: dict[str, int] = defaultdict(int)
    for index, operation in enumerate(operations):
        if operation["cat"] == "gpu_memset":
            memsets[operation.get("args", {}).get("bytes", -1)] += 1
            if index + 1 < len(operations):
                followed_by[operations[index + 1]["name"][:120]] += 1
    return {
        "idle_by_neighbours": [
            {"between": name, "gaps": count, "ms": ms, "mean_us": 1e3 * ms / count}
            for name, (count, ms) in sorted(idle.items(), key=lambda item: -item[1][1])
        ],
        "memsets_by_bytes": dict(sorted(memsets.items())),
        "memsets_followed_by": dict(sorted(followed_by.items(), key=lambda item: -item[1])[:top]),
    }


def host_before_first_step(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The host's time from the profiled call's start (its ``CALL`` range) to the first denoiser step's (the
    first ``STEP`` range on the CPU): how much of it was inside torch's operations (the outermost ones, their
    union), how much waiting for the GPU in ``WAITS``, and which outermost operations waited, how often."""
    on_cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("user_annotation", "cpu_op", "cuda_runtime")]
    calls = [e for e in on_cpu if e["cat"] == "user_annotation" and e["name"] == CALL]
    steps = [e["ts"] for e in on_cpu if e["cat"] == "user_annotation" and e["name"] == STEP]
    if not calls or not steps:
        return {}
    begin, end = calls[0]["ts"], min(steps)
    inside = [e for e in on_cpu if begin <= e["ts"] and e["ts"] + e["dur"] <= end]
    ops = sorted((e for e in inside if e["cat"] == "cpu_op"), key=lambda e: (e["ts"], -e["dur"]))
    outermost, reach = [], float("-inf")
    for op in ops:
        if op["ts"] >= reach:  # not inside the last outermost operation
            outermost.append(op)
            reach = op["ts"] + op["dur"]
    waits = [e for e in inside if e["cat"] == "cuda_runtime" and e["name"] in WAITS]
    waited_in: dict[str, int] = defaultdict(int)
    for wait in waits:
        around = [op for op in outermost if op["ts"] <= wait["ts"] < op["ts"] + op["dur"]]
        waited_in[around[0]["name"] if around else "(outside torch's operations)"] += 1
    return {
        "ms": (end - begin) / 1e3,
        "in_torch_ops_ms": sum(op["dur"] for op in outermost) / 1e3,
        "waiting_ms": sum(wait["dur"] for wait in waits) / 1e3,
        "waits": len(waits),
        "waits_by_op": dict(sorted(waited_in.items())),
    }


def python_before_first_step(events: list[dict[str, Any]], top: int = 30) -> dict[str, Any]:
    """From a trace recorded with Python's functions (``with_stack=True``): the host's time from the call's start
    to the first denoiser step, and the ``top`` Python functions by their time inside it, each counted once where
    it calls itself. Tracing every function slows the host, so the shares tell more than the milliseconds."""
    on_cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("user_annotation", "python_function")]
    calls = [e for e in on_cpu if e["cat"] == "user_annotation" and e["name"] == CALL]
    steps = [e["ts"] for e in on_cpu if e["cat"] == "user_annotation" and e["name"] == STEP]
    if not calls or not steps:
        return {}
    begin, end = calls[0]["ts"], min(steps)
    functions = sorted(
        (e for e in on_cpu if e["cat"] == "python_function" and begin <= e["ts"] and e["ts"] + e["dur"] <= end),
        key=lambda e: (e["ts"], -e["dur"]),
    )
    by_name: dict[str, float] = defaultdict(float)
    open_until: dict[str, float] = {}  # per name, where its outermost occurrence ends
    for function in functions:
        name = function["name"]
        if function["ts"] >= open_until.get(name, float("-inf")):
            by_name[name] += function["dur"] / 1e3
            open_until[name] = function["ts"] + function["dur"]
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return {"ms": (end - begin) / 1e3, "functions_ms": {name[:160]: round(ms, 3) for name, ms in ranked}}


def mark_steps(denoiser: torch.nn.Module) -> None:
    """A profiler range around every denoiser call (hooks on whatever the accelerator made of it)."""
    open_ranges: list[Any] = []

    def before(module: torch.nn.Module, args: tuple) -> None:
        open_ranges.append(torch.profiler.record_function(STEP).__enter__())

    def after(module: torch.nn.Module, args: tuple, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    denoiser.register_forward_pre_hook(before)
    denoiser.register_forward_hook(after)


def table(result: dict[str, Any]) -> str:
    kinds = sorted({k for kinds in result["ms_by_phase_and_kind"].values() for k in kinds})
    lines = ["| phase | " + " | ".join(kinds) + " | all |", "|---" * (len(kinds) + 2) + "|"]
    for name, row in result["ms_by_phase_and_kind"].items():
        cells = [f"{row.get(k, 0.0):.1f}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(row.values()):.1f} |")
    lines += ["", "| kernel | kind | ms | calls |", "|---|---|---:|---:|"]
    lines += [f"| `{k['name'][:70]}` | {k['kind']} | {k['ms']:.2f} | {k['count']} |" for k in result["busiest_kernels"]]
    return "\n".join(lines)


def output_prefix(out: Path, overrides: list[str]) -> Path:
    """Where the files go: ``OUT`` names their common prefix; an existing folder as ``OUT`` (e.g. a device call's
    ``$OUT``) holds them as ``profile_<accelerator>_<res>``, where they would otherwise land beside it (on 2026-12-06
    a trace written so stayed on the device machine)."""
    if not out.is_dir():
        return out
    given = dict(item.split("=", 1) for item in overrides if "=" in item and not item.startswith("hydra."))
    return out / f"profile_{given.get('accelerator', 'none')}_{given.get('res', 'default')}"


def main(out: Path, overrides: list[str]) -> None:
    out = output_prefix(out, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared = prepare(overrides)
    print(f"built and accelerated in {time.perf_counter() - started:.1f} s", flush=True)
    cfg, device, pipe, image = prepared.cfg, prepared.device, prepared.pipe, prepared.image
    gpu = f"GPU-{torch.cuda.get_device_properties(device).uuid}" if device.type == "cuda" else ""
    core = cores_near(gpu or None)[0] if device.type == "cuda" else None  # the runner leases one of these
    # Throughout, as the runner's warmup and timed calls: torch.compile's guards include the thread count, so a
    # change between the warmup and a later call would compile again
    with one_torch_thread(device, core):
        timed = warm_and_time(cfg, pipe, image, device, gpu, core)
        profile(out, overrides, prepared, timed)


BLOCKS = (  # name, pinned (to the core given), the GPU's idle pause between calls (s)
    ("unpinned", False, 0.0),
    ("pinned", True, 0.0),
    ("unpinned, calls 0.5 s apart", False, 0.5),
)


def warm_and_time(cfg: Any, pipe: Any, image: Any, device: torch.device, gpu: str, core: int | None) -> dict:
    """The warmup, the heap frozen as the runner freezes it, then a block of ``cfg.runs`` timed calls for each of
    BLOCKS, each with the GPU's counters around it as the runner reads them. Why the blocks: this script once
    collected a large heap before every call, 0.44 s a call with the GPU idle, where the runner's calls run back
    to back; both power-capped, the script's `compile_graph_fast` took 8 ms less a call at 1024 px on an H200
    (BENCHMARKS.md, "Power-capped at 1024 px"): the pause and the pinning are now each timed alone."""
    prompts = [cfg.prompt]
    started = time.perf_counter()
    for index in range(cfg.warmup):
        pipe(**pipeline_args(cfg, prompts, image, device, index))
    synchronize(device)
    print(f"warmup ({cfg.warmup} calls) took {time.perf_counter() - started:.1f} s", flush=True)
    gc.collect()
    gc.freeze()  # as the runner does before its timed calls: each call's collection then takes milliseconds
    clock = PhaseClock(getattr(pipe, cfg.model.denoiser), device)
    timed = {}
    for block, pinned, pause in BLOCKS:
        if pinned and core is None:
            continue  # not on a GPU: nothing to pin
        calls = []
        with steady_host(device, core if pinned else None), GpuMeter(gpu) as meter:
            launching = LaunchThread(core if pinned else None)  # where this thread's time went, as the runner logs
            for index in range(cfg.runs):
                time.sleep(pause if index else 0.0)
                kwargs = pipeline_args(cfg, prompts, image, device, index)  # outside the timed call, as the runner
                launching.probe()  # the core's speed before each call, as the runner times it
                calls.append(vars(clock.time_call(lambda kwargs=kwargs: pipe(**kwargs))[1]))
        timed[block] = {
            "core": core if pinned else None,
            "pause_s": pause,
            "calls": calls,
            "mean_latency_s": sum(call["latency_s"] for call in calls) / len(calls),
            # the block's wall time outside the timed calls, a call: the GPU idle (0 in the runner's sweeps)
            "between_calls_s": (meter.seconds - sum(call["latency_s"] for call in calls)) / len(calls),
            "gpu": {**energy_metrics(meter, cfg.runs * cfg.batch), **meter.clock_limits, **meter.busy},
            "host": launching.metrics(),
        }
        # said as each block ends: a call's time limit that stops the profiling after them still leaves them
        print(block_line(block, timed[block]), flush=True)
    clock.detach()
    gc.unfreeze()
    return timed


def block_line(block: str, measured: dict[str, Any]) -> str:
    pinned = f" to core {measured['core']}" if measured["core"] is not None else ""
    gpu_said = ", ".join(f"{name} {value:.3g}" for name, value in measured["gpu"].items())
    host_said = ", ".join(f"{name} {value:.3g}" for name, value in measured["host"].items())
    said = (f"; the GPU: {gpu_said}" if gpu_said else "") + (f"; the host: {host_said}" if host_said else "")
    between = f", {measured['between_calls_s']:.3f} s between calls"
    return f"{block}{pinned}: {measured['mean_latency_s']:.4f} s a call{between}{said}"


def profile(out: Path, overrides: list[str], prepared: Prepared, timed: dict) -> None:
    """One call recorded by torch's profiler (unpinned), then one with Python's functions too; the tables
    written and printed."""
    cfg, device, pipe, image = prepared.cfg, prepared.device, prepared.pipe, prepared.image
    prompts = [cfg.prompt]
    denoiser = getattr(pipe, cfg.model.denoiser)
    mark_steps(denoiser)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    kwargs = pipeline_args(cfg, prompts, image, device, 0)  # outside the call's range
    with torch.profiler.profile(activities=activities) as profiler:
        with torch.profiler.record_function(CALL):
            pipe(**kwargs)
        synchronize(device)
    events = exported(profiler, out.with_suffix(".trace.json"))
    kwargs = pipeline_args(cfg, prompts, image, device, 0)
    with torch.profiler.profile(activities=activities, with_stack=True) as profiler:  # again, Python's functions too
        with torch.profiler.record_function(CALL):
            pipe(**kwargs)
        synchronize(device)
    python = python_before_first_step(exported(profiler, out.with_suffix(".python.trace.json")), top=40)
    result = {
        "overrides": overrides,
        "accelerator": cfg.names.accelerator,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "calls": timed["unpinned"]["calls"],
        "mean_latency_s": timed["unpinned"]["mean_latency_s"],
        "timed_calls_gpu": timed["unpinned"]["gpu"],
        "timed_blocks": timed,
        **breakdown(events),
        **idle_between(events),
        "host_before_first_step": host_before_first_step(events),
        "python_before_first_step": python,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(
        f"{cfg.names.accelerator} {cfg.height}x{cfg.width}: {result['mean_latency_s']:.3f} s a call "
        f"({cfg.runs} calls); the profiled call's GPU span {result['gpu_span_ms']:.1f} ms, busy "
        f"{result['gpu_busy_ms']:.1f}, idle {result['gpu_idle_ms']:.1f}; {result['steps_seen']} steps seen"
    )
    host = result["host_before_first_step"]
    if host:
        print(
            f"before the first step the host took {host['ms']:.1f} ms: {host['in_torch_ops_ms']:.1f} in torch's "
            f"operations, {host['waiting_ms']:.1f} waiting for the GPU in {host['waits']} synchronisation(s) "
            f"({', '.join(f'{op} {n}' for op, n in host['waits_by_op'].items()) or 'none'})"
        )
    if python:
        print(f"the same, Python's functions traced ({python['ms']:.1f} ms), the longest:")
        print("\n".join(f"  {ms:8.3f} ms  {name}" for name, ms in list(python["functions_ms"].items())[:25]))
    print(table(result))
    print(idle_table(result))


def idle_table(result: dict[str, Any]) -> str:
    lines = ["| idle between | gaps | ms | µs a gap |", "|---|---:|---:|---:|"]
    lines += [
        f"| {row['between']} | {row['gaps']} | {row['ms']:.2f} | {row['mean_us']:.2f} |"
        for row in result["idle_by_neighbours"]
    ]
    sizes = ", ".join(f"{count} of {size} B" for size, count in result["memsets_by_bytes"].items())
    lines.append(f"memsets: {sizes or 'none'}; the kernels after them:")
    lines += [f"  {count:6d}  {name}" for name, count in result["memsets_followed_by"].items()]
    return "\n".join(lines)


def read_trace(trace: Path, pattern: str | None = None) -> None:
    """``--trace OUT.trace.json.gz``: the kernel tables of a trace this script wrote before, read again (a
    reading added since can be applied to an older profile); with a pattern, the kernels whose names match it."""
    with gzip.open(trace, "rt") as packed:
        events = json.load(packed)
    if pattern is not None:
        print(f"{'phase':18s} {'launches':>8s} {'mean us':>9s} {'ms':>8s}  grid, block  kernel")
        for k in matching(events, pattern):
            print(
                f"{k['phase']:18s} {k['launches']:8d} {k['mean_us']:9.1f} {k['us'] / 1e3:8.2f}  {k['grid']}, "
                f"{k['block']}  {k['name']}"
            )
        return
    result = {**breakdown(events), **idle_between(events)}
    print(
        f"{trace.name}: GPU span {result['gpu_span_ms']:.1f} ms, busy {result['gpu_busy_ms']:.1f}, idle "
        f"{result['gpu_idle_ms']:.1f}; {result['kernels']} operations; {result['steps_seen']} steps seen"
    )
    print(table(result))
    print(idle_table(result))


def exported(profiler: torch.profiler.profile, trace: Path) -> list[dict[str, Any]]:
    """The profile's events; the Chrome trace kept beside them, compressed (``trace`` + ``.gz``)."""
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    with gzip.open(f"{trace}.gz", "wt") as packed:
        json.dump(events, packed)
    trace.unlink()
    return events


if __name__ == "__main__":
    if sys.argv[1] == "--trace":
        read_trace(Path(sys.argv[2]), *sys.argv[3:4])
    else:
        main(Path(sys.argv[1]), sys.argv[2:])
