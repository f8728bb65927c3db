"""The runner's own overhead: one pipeline call timed bare (CUDA events, or perf_counter on the CPU, around
``pipe(...)``) and as the runner times it (PhaseClock's hooks on the denoiser), alternating in one process
so both see the same GPU clocks and the same pipeline.

    python benchmarks/overhead.py OUT.json model=sdxl_base model.weights=random steps=30 res=1024

Takes the job's overrides like ``python -m runner``; writes every call's latency to OUT.json. Also times the
denoiser hooks on their own, a precise figure where the end-to-end difference is within the calls' noise.
"""

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

from runner.config import compose_job, to_config
from runner.measure import Marker, PhaseClock, steady_host, synchronize
from runner.pipelines import build_pipeline
from runner.worker import DTYPES, HARMLESS, TRUNCATION, call_args, drop_log_lines, resolve_device


def main(out: Path, overrides: list[str]) -> None:
    cfg = to_config(compose_job(*overrides))
    drop_log_lines(HARMLESS + TRUNCATION)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else DTYPES["fp16" if device.type == "cuda" else "fp32"]
    pipe = build_pipeline(cfg.model, cfg.names.task, device, dtype)
    denoiser = getattr(pipe, cfg.model.denoiser)
    for index in range(cfg.warmup):
        pipe(**call_args(cfg, [cfg.prompt], None, device, index))
    start, end = Marker(device), Marker(device)

    def bare(kwargs: dict) -> float:
        gc.collect()  # as PhaseClock.time_call does, outside the timed region
        start.mark()
        pipe(**kwargs)
        end.mark()
        synchronize(device)
        return start.seconds_until(end)

    def clocked(kwargs: dict) -> float:
        clock = PhaseClock(denoiser, device)
        _, timing = clock.time_call(lambda: pipe(**kwargs))
        clock.detach()
        return timing.latency_s

    bare_s, runner_s = [], []
    with steady_host(device, cfg.pin_cpu):  # the host as the runner's timed calls see it
        for index in range(cfg.runs):  # alternate which goes first, so drift favours neither
            pair = [(bare, bare_s), (clocked, runner_s)]
            for timer, into in pair if index % 2 == 0 else reversed(pair):
                into.append(timer(call_args(cfg, [cfg.prompt], None, device, index)))
    # The hooks' own cost, timed directly: what the runner adds to every denoising step.
    clock = PhaseClock(denoiser, device)
    clock.steps = 1  # past the first step, whose inputs are recorded once per job
    repeats = 10_000
    begin = time.perf_counter()
    for _ in range(repeats):
        clock._before_step(denoiser, (), {})
        clock._after_step(denoiser, (), None)
    hook_s_per_step = (time.perf_counter() - begin) / repeats
    clock.detach()
    result = {
        "overrides": overrides,
        "hook_us_per_step": hook_s_per_step * 1e6,
        "hook_pct_of_call": 100 * hook_s_per_step * cfg.steps / float(np.mean(bare_s)),
        "device": str(device),
        "bare_s": bare_s,
        "runner_s": runner_s,
        "bare_mean_s": float(np.mean(bare_s)),
        "runner_mean_s": float(np.mean(runner_s)),
        "bare_cv": float(np.std(bare_s, ddof=1) / np.mean(bare_s)),
        "runner_cv": float(np.std(runner_s, ddof=1) / np.mean(runner_s)),
        "overhead_pct": float(100 * (np.mean(runner_s) / np.mean(bare_s) - 1)),
        "overhead_median_pct": float(100 * (np.median(runner_s) / np.median(bare_s) - 1)),
    }
    out.write_text(json.dumps(result, indent=2))
    print(
        f"{' '.join(overrides)}: bare {result['bare_mean_s']:.4f} s (cv {result['bare_cv']:.2%}), "
        f"runner {result['runner_mean_s']:.4f} s (cv {result['runner_cv']:.2%}), "
        f"overhead {result['overhead_pct']:+.2f}% (median {result['overhead_median_pct']:+.2f}%); "
        f"hooks {result['hook_us_per_step']:.1f} us/step = {result['hook_pct_of_call']:.3f}% of a call"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
