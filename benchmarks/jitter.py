"""Where the spread of eager timings comes from on a host (a diagnostic, not a benchmark of the runner).

Times one SDXL UNet step (random fp16 weights, batch 2 as with classifier-free guidance) many times, eagerly
and replayed from a CUDA graph, as the process runs by default, with Python's garbage collector off, and
pinned to one CPU core; also a pure-Python loop, and the virtual machine's steal time for each.

    python benchmarks/jitter.py OUT.json [res]
"""

import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from runner.config import compose_job, to_config
from runner.pipelines import build_pipeline

STEPS = 40


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return values[7], sum(values)


def spread(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(xs),
        "cv": statistics.stdev(xs) / statistics.mean(xs),
        "min": min(xs),
        "max": max(xs),
    }


def main(out: Path, res: int) -> None:
    results: dict[str, dict] = {}
    loop = []
    for _ in range(30):
        start = time.perf_counter()
        sum(i * i for i in range(300_000))
        loop.append(time.perf_counter() - start)
    results["python_loop_s"] = spread(loop)

    cfg = to_config(compose_job("model=sdxl_base", "model.weights=random", f"res={res}"))
    device = torch.device("cuda")
    unet = build_pipeline(cfg.model, "t2i", device, torch.float16).unet
    latent = res // 8
    args = (torch.randn(2, 4, latent, latent, device=device, dtype=torch.float16), torch.tensor(500.0, device=device))
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, 2048, device=device, dtype=torch.float16),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=torch.float16),
            "time_ids": torch.randn(2, 6, device=device, dtype=torch.float16),
        },
        "return_dict": False,
    }

    def eager(label: str) -> None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            for _ in range(3):
                unet(*args, **kwargs)
            torch.cuda.synchronize()
            steal0, total0 = cpu_ticks()
            gpu, host = [], []
            for _ in range(STEPS):
                start.record()
                t0 = time.perf_counter()
                unet(*args, **kwargs)
                host.append(time.perf_counter() - t0)
                end.record()
                torch.cuda.synchronize()
                gpu.append(start.elapsed_time(end) / 1000)
            steal1, total1 = cpu_ticks()
        results[label] = {
            "step_s": spread(gpu),
            "launch_s": spread(host),
            "steal_pct": 100 * (steal1 - steal0) / max(1, total1 - total0),
        }

    eager("eager")
    gc.disable()
    eager("eager_gc_off")
    gc.enable()
    everything = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(everything)[2]})
    eager("eager_one_core")
    gc.disable()
    eager("eager_one_core_gc_off")
    gc.enable()
    os.sched_setaffinity(0, everything)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                unet(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            unet(*args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        replay = []
        for _ in range(STEPS):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            replay.append(start.elapsed_time(end) / 1000)
    results["graph_replay"] = {"step_s": spread(replay)}
    out.write_text(json.dumps(results, indent=2))
    for label, result in results.items():
        line = " ".join(
            f"{k} {v['mean'] * 1e3:.1f} ms cv {v['cv']:.1%}" for k, v in result.items() if isinstance(v, dict)
        )
        print(f"{res} {label}: {line}" + (f" steal {result['steal_pct']:.1f}%" if "steal_pct" in result else ""))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 512)
