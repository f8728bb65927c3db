"""The phase clock, the summary metrics and peak memory, on the CPU (and on CUDA where there is one)."""

import gc
import os

import numpy as np
import pytest
import torch
from conftest import load_model
from PIL import Image

from runner.measure import (
    CallTiming,
    PhaseClock,
    Stopwatch,
    denoiser_flop_per_step,
    peak_memory,
    steady_host,
    summarize,
)
from runner.pipelines import build_pipeline


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


def test_steady_host_pauses_gc_and_pins_only_cuda_work() -> None:
    before = os.sched_getaffinity(0)
    with steady_host(torch.device("cpu"), pin_cpu=True) as core:
        assert core == "none" and not gc.isenabled() and os.sched_getaffinity(0) == before
    assert gc.isenabled()
    with steady_host(torch.device("cuda"), pin_cpu=True) as core:  # pinning needs no GPU to be checked
        assert os.sched_getaffinity(0) == {int(core)} and int(core) == max(before)
    assert os.sched_getaffinity(0) == before and gc.isenabled()
    with steady_host(torch.device("cuda"), pin_cpu=False) as core:
        assert core == "none" and os.sched_getaffinity(0) == before
