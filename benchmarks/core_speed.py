"""Whether an eager call's time follows the speed of the core that launches it: the eager baseline's calls took
2.4-4.1 s pinned to a core that ran nothing but the launching thread (on a CPU 99.97% of the time, never waiting for
it, no steal; BENCHMARKS.md, "The launching core's speed").

    python3 benchmarks/core_speed.py OUT.json model=sdxl_base model.weights=random steps=30 res=1024 runs=15

Prepares the job as the runner does (benchmarks/prepare.py: built, accelerated, warmed up unpinned, torch on one
thread, the heap frozen), pins this thread to the core the runner would lease, then before each of ``runs`` timed
calls times two fixed pieces of work on that core: PROBE_LOOPS iterations of a pure-Python loop (the interpreter's
speed, which is most of an eager call's launching), and LAUNCHES launches of a tiny kernel (torch's and the driver's
launch path; the GPU runs each in microseconds, so the host is what is timed). Also the thread's page faults and
context switches over each call. Writes OUT.json (every call's latency and probes, the correlation of each probe
with the latency) and prints a line a call. Run it before and after a runner job on the same machine start: a
process of its own (the runner's workers are forked from a server).
"""

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from prepare import prepare

from runner.host import core_loop_s, cores_near
from runner.measure import PhaseClock, one_torch_thread, steady_host, synchronize
from runner.worker import pipeline_args

PROBE_LOOPS = 300_000  # about 15 ms of CPython on our GPU hosts
LAUNCHES = 2_000


def python_probe() -> float:
    """The runner's own loop (runner/host.py), longer: 300,000 iterations."""
    return core_loop_s(PROBE_LOOPS)


def launch_probe(device: torch.device) -> float:
    scratch = torch.zeros(16, device=device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(LAUNCHES):
        scratch.add_(1.0)
    launched = time.perf_counter() - started
    synchronize(device)
    return launched


def thread_counters() -> dict[str, int]:
    """The calling thread's minor and major page faults and its voluntary and involuntary context switches."""
    stat = Path("/proc/thread-self/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    status = dict(line.split(":", 1) for line in Path("/proc/thread-self/status").read_text().splitlines())
    return {
        "minor_faults": int(fields[7]),
        "major_faults": int(fields[9]),
        "voluntary_switches": int(status["voluntary_ctxt_switches"]),
        "involuntary_switches": int(status["nonvoluntary_ctxt_switches"]),
    }


def correlation(xs: list[float], ys: list[float]) -> float | None:
    try:
        return statistics.correlation(xs, ys)
    except statistics.StatisticsError:  # fewer than two calls, or a constant
        return None


def main(out: Path, overrides: list[str]) -> None:
    prepared = prepare(overrides)
    cfg, device, pipe, image = prepared.cfg, prepared.device, prepared.pipe, prepared.image
    gpu = f"GPU-{torch.cuda.get_device_properties(device).uuid}" if device.type == "cuda" else ""
    core = cores_near(gpu or None)[0] if device.type == "cuda" else None
    calls = []
    with one_torch_thread(device, core):
        for index in range(cfg.warmup):
            pipe(**pipeline_args(cfg, [cfg.prompt], image, device, index))
        synchronize(device)
        gc.collect()
        gc.freeze()
        clock = PhaseClock(getattr(pipe, cfg.model.denoiser), device)
        with steady_host(device, core):
            for index in range(cfg.runs):
                python_s, launch_s = python_probe(), launch_probe(device)
                kwargs = pipeline_args(cfg, [cfg.prompt], image, device, index)
                before = thread_counters()
                timing = clock.time_call(lambda kwargs=kwargs: pipe(**kwargs))[1]
                after = thread_counters()
                call = {
                    "wall": time.time(),
                    "latency_s": timing.latency_s,
                    "python_probe_s": python_s,
                    "launch_probe_s": launch_s,
                    **{key: after[key] - before[key] for key in after},
                }
                calls.append(call)
                print(
                    f"call {index + 1}: {timing.latency_s:.3f} s; python probe {python_s * 1e3:.1f} ms, "
                    f"{LAUNCHES} launches {launch_s * 1e3:.1f} ms; "
                    f"{call['minor_faults']} faults, {call['involuntary_switches']} involuntary switches",
                    flush=True,
                )
    latencies = [call["latency_s"] for call in calls]
    result = {
        "core": core,
        "overrides": overrides,
        "calls": calls,
        "latency_vs_python_probe": correlation(latencies, [call["python_probe_s"] for call in calls]),
        "latency_vs_launch_probe": correlation(latencies, [call["launch_probe_s"] for call in calls]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"core {core}: correlation of the latency with the python probe {result['latency_vs_python_probe']}, "
        f"with the launch probe {result['latency_vs_launch_probe']}",
        flush=True,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
