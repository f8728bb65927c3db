"""The runner's timing against bare diffusers, for text-to-image and image-to-image alike: one pipeline
built once, its calls alternating between

- **bare**: what a user's own script does, ``pipe(...)`` between two CUDA events (perf_counter on the CPU),
  on the host as it is (no pinning, torch's default threads, the garbage collector on); a second bare series
  adds only the runner's step hooks, to read bare diffusers' time from the call's start to the first
  denoising step (``bare_to_first_step_s``);
- **runner**: the call as the runner times it (runner/measure.py: PhaseClock's hooks, the steady host with
  the launching thread pinned to one core, and torch's CPU work on that thread alone: ``one_torch_thread``).

The warmup runs as the runner's does, unpinned. Alternating thread counts between the series suits eager
and graphed pipelines; torch.compile guards on the thread count, so a compiled accelerator would recompile
at each switch: ``compiled_during_series`` in OUT.json counts such compilations (it should read 0).

    python benchmarks/overhead.py OUT.json model=sdxl_base model.weights=random steps=30 task=i2i res=1024 \\
        accelerator=cuda_graph runs=20

Takes the job's overrides like ``python -m runner`` (the accelerator is applied as the runner applies it);
writes every call's latency and phases to OUT.json. Also times the hooks on their own: a precise figure
where the end-to-end difference is within the calls' noise.
"""

import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
from prepare import prepare

from runner.host import allowed_cores
from runner.measure import Marker, PhaseClock, graphs_compiled, one_torch_thread, steady_host, synchronize
from runner.worker import pipeline_args


def main(out: Path, overrides: list[str]) -> None:
    prepared = prepare(overrides)
    cfg, device, pipe, image = prepared.cfg, prepared.device, prepared.pipe, prepared.image
    denoiser = getattr(pipe, cfg.model.denoiser)
    core = max(allowed_cores()) if cfg.pin_cpu else None
    for index in range(cfg.warmup):  # unpinned, as the runner warms up: compile workers get every core
        pipe(**pipeline_args(cfg, [cfg.prompt], image, device, index))
    start, end = Marker(device), Marker(device)

    def bare(kwargs: dict) -> dict:
        start.mark()
        pipe(**kwargs)
        end.mark()
        synchronize(device)
        return {"latency_s": start.seconds_until(end)}

    def phases(kwargs: dict) -> dict:
        clock = PhaseClock(denoiser, device)
        _, timing = clock.time_call(lambda: pipe(**kwargs))
        clock.detach()
        return vars(timing)

    def runner(kwargs: dict) -> dict:
        with one_torch_thread(device, core), steady_host(device, core):
            return phases(kwargs)

    series: dict[str, list[dict]] = {"bare": [], "bare_hooked": [], "runner": []}
    timers = {"bare": bare, "bare_hooked": phases, "runner": runner}
    compiled = graphs_compiled()
    for index in range(cfg.runs):  # rotate which goes first, so drift favours none
        names = list(timers)
        for name in names[index % 3 :] + names[: index % 3]:
            gc.collect()
            series[name].append(timers[name](pipeline_args(cfg, [cfg.prompt], image, device, index)))
    compiled = graphs_compiled() - compiled
    clock = PhaseClock(denoiser, device)
    clock.steps = 1  # past the first step, whose inputs are recorded once per job
    repeats = 10_000
    begin = time.perf_counter()
    for _ in range(repeats):
        clock._before_step(denoiser, (), {})
        clock._after_step(denoiser, (), None)
    hook_us = (time.perf_counter() - begin) / repeats * 1e6
    clock.detach()

    def mean(name: str, key: str = "latency_s") -> float:
        return float(np.mean([call[key] for call in series[name]]))

    def cv(name: str) -> float:
        values = [call["latency_s"] for call in series[name]]
        return float(np.std(values, ddof=1) / np.mean(values))

    result = {
        "overrides": overrides,
        "device": str(device),
        "pinned_core": core,
        "compiled_during_series": compiled,
        "series": series,
        "hook_us_per_step": hook_us,
        "bare_mean_s": mean("bare"),
        "bare_cv": cv("bare"),
        "bare_to_first_step_s": mean("bare_hooked", "text_encode_s"),
        "runner_mean_s": mean("runner"),
        "runner_cv": cv("runner"),
        "runner_text_encode_s": mean("runner", "text_encode_s"),
        "runner_denoise_s": mean("runner", "denoise_s"),
        "runner_decode_s": mean("runner", "decode_s"),
        "runner_vs_bare_pct": 100 * (mean("runner") / mean("bare") - 1),
        "runner_vs_bare_median_pct": 100
        * (
            np.median([c["latency_s"] for c in series["runner"]]) / np.median([c["latency_s"] for c in series["bare"]])
            - 1
        ),
    }
    out.write_text(json.dumps(result, indent=1))
    print(
        f"{' '.join(overrides)}: bare {result['bare_mean_s']:.4f} s (cv {result['bare_cv']:.1%}, first step after "
        f"{result['bare_to_first_step_s'] * 1000:.0f} ms), runner {result['runner_mean_s']:.4f} s (cv "
        f"{result['runner_cv']:.1%}, text_encode {result['runner_text_encode_s'] * 1000:.0f} ms), runner vs bare "
        f"{result['runner_vs_bare_pct']:+.1f}% (median {result['runner_vs_bare_median_pct']:+.1f}%); hooks "
        f"{hook_us:.1f} us/step"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
