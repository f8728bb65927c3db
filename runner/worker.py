"""One job's measurement, in a process of its own: ``python -m runner.worker JOB_YAML FOLDER [CORES [GPU]]``.

``measure`` reads top to bottom: build the pipeline, apply the accelerator, warm up, time the calls, judge
how steady they were, count FLOPs, score quality. The job's process (runner/job.py) hands over the checked
config as JOB_YAML, the cores it leased (CORES: the core to pin the launching thread to, then its
hyperthread siblings, held idle) and the GPU it leased; the worker hands back a ``WorkerResult`` as
FOLDER/result.json, with its images beside it, and the job's process records them. A fresh process per job
keeps peak memory, compile caches and a broken CUDA context out of the next job.
"""

import contextlib
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image

from runner.accelerators import Accelerator, Target, build_accelerator
from runner.config import Config, ConfigError, job_name
from runner.environment import environment_tags
from runner.errors import RunnerError, one_line
from runner.flops import denoiser_flop_per_step
from runner.host import HOST, CpuLoad, JobRegistry, LaunchThread, boot_id, busy_threshold_cores, gpu_neighbours
from runner.inputs import load_image, load_prompts
from runner.launch import LAUNCHED_AT, RESULT, SWITCHED
from runner.measure import (
    CallTiming,
    GpuMeter,
    PhaseClock,
    Stopwatch,
    compile_seconds,
    energy_metrics,
    graphs_compiled,
    one_torch_thread,
    peak_memory,
    steadiness,
    steady_host,
    summarize,
)
from runner.pipelines import build_pipeline, parameter_count
from runner.quality import TINY, broken_images, clip_score, image_key, judge, load_clip
from runner.record import Conditions, Measurement, Quality, QualityResult, Steadiness, WorkerResult
from runner.timeline import Timeline
from runner.tracking import Tracker

HEARTBEAT_S = 15.0
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SWITCH_CALLS = 2  # calls at the other size after its first, for its steady latency
# The smallest step of the system clock during a warmup worth reporting: reading the two clocks one after the
# other differs by microseconds
CLOCK_STEP_S = 0.001
CALIBRATION_CALL = -1  # pipeline_args' index of the first calibration call (then -2, ...): seeds no timed call uses

# Library log lines that say nothing here and alarm users: diffusers' warning about an empty list of fp32
# modules, and transformers falling back from torchvision (deliberately not a dependency).
HARMLESS = ("should be kept in float32: []", "requires torchvision (not installed)")
# With weights=random the tokenizer is byte-level, so long prompts are cut at 77 tokens: harmless for
# timing, since the real tokenizers pad every prompt to 77 tokens too.
TRUNCATION = ("part of your input was truncated", "Token indices sequence length is longer")


def measure(
    cfg: Config, switched: Config | None, folder: Path, core: int | None, result: WorkerResult, timeline: Timeline
) -> None:
    """Measure the job, filling ``result`` as it goes (so a failure keeps what was measured before it), and
    ``timeline`` with where the time outside loading, applying the accelerator, warmup and the timed calls
    went; then, given the ``switched`` config, the cost of switching sizes."""
    with timeline.phase("setup"):
        drop_log_lines(HARMLESS + (TRUNCATION if cfg.model.weights == "random" else ()))
        device = resolve_device(cfg.device)
        dtype_name = resolve_dtype(cfg.dtype, device)
        dtype = DTYPES[dtype_name]
        result.params.update(device=str(device), dtype=dtype_name)
        result.facts.update(environment_tags(device))
        accelerator = build_accelerator(cfg.accelerator)
        accelerator.check(device)
        accelerator.check_dtype(dtype)
        tracker = Tracker(cfg.mlflow)
        prompts = load_prompts(cfg.prompts, cfg.prompt)
        image = input_image(cfg, tracker, folder, result)
        result.image_key = image_key(cfg, device, dtype_name, prompts, image)
        result.params["prompt_count"] = len(prompts)

    progress(cfg, f"loading ({cfg.model.weights} weights, {dtype_name}, {device})")
    with heartbeat(cfg, "loading"), Stopwatch(device) as load:
        pipe = build_pipeline(cfg.model, cfg.names.task, device, dtype)
    eager_denoiser = getattr(pipe, cfg.model.denoiser)
    result.params["denoiser_params"] = parameter_count(eager_denoiser)
    # The accelerator's cost, as its warmup is: float8's conversion and calibration call, fused projections
    with heartbeat(cfg, "applying the accelerator (float8 calibrates here)"), Stopwatch(device) as prepared:
        calibration = calibration_call(cfg, pipe, prompts, image, device)
        accelerator.apply(pipe, accelerator_target(cfg, device, dtype_name, calibration))
    clock = PhaseClock(getattr(pipe, cfg.model.denoiser), device)

    applied = f", accelerator applied in {prepared.seconds:.1f} s" if prepared.seconds >= 0.05 else ""
    progress(cfg, f"loaded in {load.seconds:.1f} s{applied}; warming up ({cfg.warmup} call(s))")
    result.metrics.update(load_s=load.seconds, accelerate_s=prepared.seconds)
    try:
        timings, images, jobs_at_once, others_cores = time_calls(
            cfg, pipe, accelerator, clock, prompts, image, core, result, timeline
        )
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(
            f"batch={cfg.batch} does not fit on {result.facts['device_name']}: {one_line(error)}"
        ) from None
    result.metrics.update(summarize(timings, cfg.batch))
    result.metrics.update(price(cfg, result))
    result.series["call_latency_s"] = [t.latency_s for t in timings]
    result.conditions = Conditions(
        host=HOST,
        boot_id=boot_id(),
        device_name=result.facts["device_name"],
        gpu_uuid=result.facts.get("gpu_uuid", ""),
        concurrent_jobs=jobs_at_once,
        cores=str(core) if core is not None and device.type == "cuda" else "",
    )
    result.measurement = judge_measurement(result, others_cores)
    if result.measurement.steadiness is not Steadiness.STEADY:
        progress(cfg, f"WARNING: measurement {result.measurement.steadiness}: {result.measurement.why}")

    assert clock.step_inputs is not None
    with timeline.phase("flops"):
        flops_cache = Path(cfg.cache_dir).expanduser() / "flops.json"
        flop_per_step = denoiser_flop_per_step(eager_denoiser, clock.step_inputs, flops_cache)
    result.metrics["denoiser_tflop_per_step"] = flop_per_step / 1e12
    result.metrics["achieved_tflops"] = flop_per_step * result.metrics["its"] / 1e12
    result.metrics.update(accelerator.metrics())
    result.facts.update(accelerator.tags())
    if switched is not None:
        progress(cfg, f"switching to {switched.res} px and back ({SWITCH_CALLS + 3} calls)")
        with heartbeat(cfg, f"switching to {switched.res} px (a compile may land here)"), Stopwatch(device) as spent:
            result.metrics.update(time_switch(cfg, switched, pipe, clock, prompts, image, core))
        result.metrics["switch_s"] = spent.seconds
    if cfg.log_images:
        with timeline.phase("images"):
            save_images(images, folder / "images")
    latency, its = result.metrics["latency_s"], result.metrics["its"]
    progress(cfg, f"latency {latency:.3f} s, {its:.2f} it/s; scoring quality")
    prompts_used = [prompts[i % len(prompts)] for i in range(cfg.runs) for _ in range(cfg.batch)]  # image order
    with heartbeat(cfg, "scoring quality"), timeline.phase("quality"):
        score_quality(cfg, tracker, result, images, prompts_used, device)


def time_calls(
    cfg: Config,
    pipe: Any,
    accelerator: Accelerator,
    clock: PhaseClock,
    prompts: list[str],
    image: Image.Image | None,
    core: int | None,
    result: WorkerResult,
    timeline: Timeline,
) -> tuple[list[CallTiming], dict[str, Image.Image], int, float | None]:
    """Warm up, then time the calls on the steady host, reading peak memory, the GPU's counters (energy, time
    held down by its power limit or heat, its utilisation samples), where the launching thread's time went
    around them and how fast its core ran a fixed loop before each; return the calls' timings and images, the
    most jobs seen at once, and others' CPU use.

    The warmup runs unpinned, on every allowed core: compilation starts a pool of worker processes, and each
    process or thread inherits the affinity of the thread that starts it, so a pool started on the pinned
    thread would compile on that one core. Only the timed calls are pinned (``steady_host``); torch's thread
    count is one for both (``one_torch_thread``)."""
    device, gpu = clock.device, result.facts.get("gpu_uuid", "")
    timings, images = [], {}
    running = Path(cfg.cache_dir).expanduser() / "running"
    with JobRegistry(running) as registry, one_torch_thread(device, core):
        warming = heartbeat(cfg, "warming up (compilation and graph capture land here)")
        with warming, GpuMeter(gpu) as warm_energy, Stopwatch(device) as warmup:
            for index in range(cfg.warmup):
                pipe(**pipeline_args(cfg, prompts, image, device, index))
        accelerator.warmed_up(pipe)
        result.metrics["warmup_s"] = warmup.seconds
        if abs(warmup.clock_step_s) >= CLOCK_STEP_S:
            result.metrics["warmup_clock_step_s"] = warmup.clock_step_s
            progress(
                cfg,
                f"WARNING: the system clock was set by {warmup.clock_step_s:+.3f} s during the warmup; torch's "
                "compile timers read that clock, so compile_s and its stages may be off by as much",
            )
        # Each timed call is preceded by a garbage collection (PhaseClock.time_call); with the pipeline, its
        # compiled graphs and the libraries' objects frozen out of the collector's reach, that takes
        # milliseconds, not the 0.35-1.1 s per call it took on our H100 host. This one collection is the
        # runner's own cost, seconds after a compile: timed as such.
        with timeline.phase("collect"):
            gc.collect()
            gc.freeze()
        note = accelerator.warmup_note()
        progress(cfg, f"warmup {warmup.seconds:.2f} s{f': {note}' if note else ''}; timing {cfg.runs} call(s)")
        with steady_host(device, core):
            jobs_at_once, host_load, compiled = registry.count(), CpuLoad(), graphs_compiled()
            compiling = compile_seconds()
            launching = LaunchThread(core if device.type == "cuda" else None)  # steady_host pins it on CUDA only
            with timeline.phase("timed"), peak_memory(device, into=result.metrics), GpuMeter(gpu) as timed_gpu:
                for index in range(cfg.runs):
                    kwargs = pipeline_args(cfg, prompts, image, device, index)
                    launching.probe()
                    output, timing = clock.time_call(lambda kwargs=kwargs: pipe(**kwargs))
                    jobs_at_once = max(jobs_at_once, registry.count())
                    timings.append(timing)
                    for number, picture in enumerate(output.images):
                        images[image_name(cfg, len(prompts), index, number)] = picture
                    progress(cfg, f"timed {index + 1}/{cfg.runs}: {timing.latency_s:.3f} s")
            others_cores = host_load.others_cores()
            result.metrics.update(launching.metrics())
            result.series.update(launching.series())
        result.metrics["timed_compiles"] = graphs_compiled() - compiled
        if (spent := compile_seconds() - compiling) > 0:  # frames compiled while timed, with a graph or without
            result.metrics["timed_compile_s"] = spent
    if warm_energy.joules is not None:
        result.metrics["warmup_energy_j"] = warm_energy.joules
    result.metrics.update(energy_metrics(timed_gpu, cfg.runs * cfg.batch))
    result.metrics.update(timed_gpu.clock_limits)
    result.metrics.update(timed_gpu.busy)
    busy = "NVML utilisation samples" if not timed_gpu.busy_why else f"unavailable: {timed_gpu.busy_why}"
    result.facts["gpu_busy"] = busy
    result.facts["energy"] = "NVML energy counter" if timed_gpu.joules is not None else f"unavailable: {timed_gpu.why}"
    clocks = "NVML violation counters" if not timed_gpu.clocks_why else f"unavailable: {timed_gpu.clocks_why}"
    result.facts["clock_limits"] = clocks
    return timings, images, jobs_at_once, others_cores


def time_switch(
    cfg: Config,
    switched: Config,
    pipe: Any,
    clock: PhaseClock,
    prompts: list[str],
    image: Image.Image | None,
    core: int | None,
) -> dict[str, float]:
    """What serving a second size from the same process costs: a call at the job's size, the first call at
    ``switched``'s (where a compile, a load from the caches or a graph capture for the new shapes lands),
    ``SWITCH_CALLS`` more there (the last one is its steady latency), and the first call back, whose cost
    against the call before the switch, and the graphs torch.compile compiled for it, say whether the job's
    own compiled code and graphs survived the switch. Unpinned, like the warmup (a compile there
    starts worker processes); its images are not kept."""
    device = clock.device
    other = None if image is None else image.resize((switched.width, switched.height))

    def latency(config: Config, picture: Image.Image | None, index: int) -> float:
        kwargs = pipeline_args(config, prompts, picture, device, index)
        return clock.time_call(lambda: pipe(**kwargs))[1].latency_s

    with one_torch_thread(device, core):
        here = latency(cfg, image, 0)
        first = latency(switched, other, 0)
        steady = [latency(switched, other, index) for index in range(1, 1 + SWITCH_CALLS)][-1]
        compiled = graphs_compiled()
        back = latency(cfg, image, 1)
        back_compiles = graphs_compiled() - compiled
    progress(
        cfg,
        f"switched to {switched.res} px: first call {first:.3f} s, then {steady:.3f} s; "
        f"back at {cfg.res} px: {back:.3f} s (before switching {here:.3f} s)",
    )
    return {
        "switch_first_call_s": first,
        "switch_latency_s": steady,
        "switch_cost_s": first - steady,
        "switch_back_call_s": back,
        "switch_back_cost_s": back - here,
        "switch_back_compiles": back_compiles,
    }


def save_images(images: dict[str, Image.Image], folder: Path) -> None:
    """The timed calls' images as PNG files. Compression level 1: lossless like any level, several times
    faster than Pillow's default 6 on 1024 px images, and barely larger (random weights' images are noise,
    which no level compresses)."""
    folder.mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=4) as pool:  # zlib lets go of the GIL: the files encode side by side
        list(pool.map(lambda item: item[1].save(folder / item[0], compress_level=1), images.items()))


def image_name(cfg: Config, prompt_count: int, index: int, number: int) -> str:
    """Call ``index``'s image ``number``: call, prompt and seed, and the image's place in its batch."""
    name = f"{index:03d}_p{index % prompt_count:02d}_seed{cfg.seed + index}"
    return f"{name}_{number}.png" if cfg.batch > 1 else f"{name}.png"


def price(cfg: Config, result: WorkerResult) -> dict[str, float]:
    """What 1,000 images cost at the configured price per hour of this device; nothing without a price."""
    per_hour = cfg.cost.gpu_hour_usd
    if per_hour is None:
        per_hour = cfg.cost.per_device.get(result.facts.get("device_name", ""))
    if per_hour is None:
        return {}
    return {"usd_per_1k_images": per_hour / 3600 / result.metrics["images_per_s"] * 1000}


def judge_measurement(result: WorkerResult, others_cores: float | None) -> Measurement:
    """Contended when another process used the job's GPU or a busy share of the host's CPUs while it was
    timed; else noisy when torch.compile compiled during the timed calls (their times include compilation,
    however steady they look); else whatever the calls themselves say (runner/measure.py, ``steadiness``)."""
    spread = steadiness(result.series["call_latency_s"])
    compiles = int(result.metrics.get("timed_compiles", 0))
    if compiles:
        spread = Measurement(
            Steadiness.NOISY,
            f"torch.compile compiled {compiles} graph(s) during the timed calls, so their times include "
            "compilation (a guard failed after the warmup: TORCH_LOGS=recompiles says which)",
        )
    busy = []
    if others_cores is not None:
        result.metrics["other_cpu_cores"] = others_cores
        if others_cores > busy_threshold_cores():
            busy.append(f"other processes used {others_cores:.1f} CPU cores while it was timed")
    neighbours = gpu_neighbours(result.facts["gpu_uuid"]) if result.facts.get("gpu_uuid", "") else None
    if neighbours:
        result.facts["gpu_other_processes"] = " ".join(map(str, neighbours))
        busy.append(f"{len(neighbours)} other process(es) on its GPU")
    if busy:
        noisy = f"; and {spread.why}" if spread.steadiness is Steadiness.NOISY else ""
        return Measurement(Steadiness.CONTENDED, "; ".join(busy) + noisy)
    return spread


def score_quality(
    cfg: Config,
    tracker: Tracker,
    result: WorkerResult,
    images: dict[str, Image.Image],
    prompts: list[str],
    device: torch.device,
) -> None:
    """CLIP score; similarity to the baseline run of the same job; broken images; the verdict."""
    q = cfg.quality
    random_weights = cfg.model.weights == "random"
    clip_name = q.clip_model if q.clip_model != "auto" else (TINY if random_weights else q.reference_clip)
    meaningless = "random weights" if random_weights else "tiny CLIP" if clip_name == TINY else ""
    clip = clip_score(load_clip(clip_name, q.clip_revision), list(images.values()), prompts, device)
    result.metrics["clip_score"] = clip
    broken = tuple(broken_images(images))
    if broken:
        progress(cfg, f"WARNING: {len(broken)} broken image(s): {broken[0]}")
    about = {"clip_model": clip_name, "clip_meaningless": meaningless, "broken": broken}

    is_baseline = cfg.names.accelerator == q.baseline
    baseline = (
        None
        if is_baseline
        else tracker.find_quality_baseline(result.image_key, q.baseline, cfg.sweep_id, device_name(result))
    )
    if is_baseline:
        verdict = Quality.AFFECTED if broken else Quality.UNAFFECTED
        why = f"{len(broken)} broken image(s)" if broken else "this is the baseline"
        result.quality = QualityResult(verdict, why, "self", **about)
    elif baseline is None:
        why = f"no baseline: run accelerator={q.baseline} for this job too; the comparison judges it then"
        result.quality = QualityResult(Quality.UNKNOWN, why, "", **about)
    else:
        similar, verdict, why = judge(
            images,
            tracker.download_images(baseline.run_id),
            None if meaningless else clip,
            None if meaningless else baseline.metrics.get("clip_score"),
            list(broken),
            q.min_ssim,
            q.max_clip_drop_pct,
            device,
        )
        result.metrics.update(similar)
        result.quality = QualityResult(verdict, why, baseline.run_id, **about)
    summary = f"CLIP score {clip:.2f}" + (f" ({meaningless}: meaningless)" if meaningless else "")
    if "ssim_vs_baseline" in result.metrics:
        ssim, psnr = result.metrics["ssim_vs_baseline"], result.metrics["psnr_vs_baseline"]
        summary += f", SSIM {ssim:.4f} / PSNR {psnr:.1f} dB vs baseline"
    progress(cfg, f"{summary}; quality unaffected: {result.quality.verdict} ({result.quality.why})")


def device_name(result: WorkerResult) -> str:
    return result.facts.get("device_name", "")


class OutOfMemory(RunnerError):
    """The job does not fit on its device; the message names the memory."""


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype= setting's name, with auto resolved: fp16 on a GPU, fp32 on the CPU."""
    return name if name != "auto" else "fp16" if device.type == "cuda" else "fp32"


def accelerator_target(
    cfg: Config, device: torch.device, dtype_name: str, calibration: Callable[[list[str]], None] | None = None
) -> Target:
    """What the job's accelerator works on; its shape key names what one compiled graph serves."""
    shape = f"{cfg.height}x{cfg.width}-b{cfg.batch}-{dtype_name}"
    shape_key = f"{cfg.names.model}-{cfg.model.weights}-{cfg.names.task}-{shape}"
    cache_dir = Path(cfg.cache_dir).expanduser()
    return Target(cfg.model.denoiser, device, DTYPES[dtype_name], cache_dir, shape_key, calibration)


def calibration_call(
    cfg: Config, pipe: Any, prompts: list[str], image: Image.Image | None, device: torch.device
) -> Callable[[list[str]], None]:
    """For an accelerator to calibrate on before it compiles anything (float8's calibrated scales): a function
    that calls the pipeline once per prompt it is given, or once with one of the job's own prompts if none,
    with the job's other arguments and seeds no warmup or timed call uses (below ``seed``)."""

    def calibrate(chosen: list[str]) -> None:
        for number, prompt in enumerate(chosen or [None]):
            kwargs = pipeline_args(cfg, prompts, image, device, CALIBRATION_CALL - number)
            pipe(**kwargs | ({"prompt": prompt} if prompt is not None else {}))

    return calibrate


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is visible here; use device=cpu or device=auto")
    return device


def input_image(cfg: Config, tracker: Tracker, folder: Path, result: WorkerResult) -> Image.Image | None:
    """The task's input image (None for tasks without one), kept as the run's input.png."""
    if "image" not in cfg.task.inputs:
        return None
    image, origin = load_image(cfg.task.image, cfg.names.model, cfg.width, cfg.height, tracker.find_t2i_image)
    result.facts["input_image"] = origin
    image.save(folder / "input.png")
    return image


def pipeline_args(
    cfg: Config, prompts: list[str], image: Image.Image | None, device: torch.device, index: int
) -> dict[str, Any]:
    """The pipeline call's arguments for call ``index``: prompt ``index mod P``, seed ``seed + index``."""
    kwargs: dict[str, Any] = {
        "prompt": prompts[index % len(prompts)],
        "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "generator": torch.Generator(device).manual_seed(cfg.seed + index),
        **cfg.task.call_args,
        **cfg.model.tasks[cfg.names.task].call_args,
        "num_images_per_prompt": cfg.batch,
    }
    if image is not None:
        kwargs["image"] = image
    return kwargs


def progress(cfg: Config, message: str) -> None:
    print(f"[{job_name(cfg)}] {message}", flush=True)


@contextlib.contextmanager
def heartbeat(cfg: Config, doing: str, every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Say every ``every_s`` seconds that the block is still running, and for how long: a compile or a
    model on the CPU can take minutes. Never used around timed calls."""
    done, began = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            progress(cfg, f"still {doing}: {time.monotonic() - began:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def drop_log_lines(fragments: tuple[str, ...]) -> None:
    """Filter log lines containing any of ``fragments`` out of diffusers' and transformers' handlers."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(fragment in record.getMessage() for fragment in fragments)

    for library in ("diffusers", "transformers"):
        for handler in logging.getLogger(library).handlers:
            handler.addFilter(Drop())


def load_config(job_file: Path) -> Config:
    """The job's config as the job's process wrote it: already checked there, converted here without checks."""
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(job_file)))
    assert isinstance(config, Config)
    return config


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group: the job's process answers it (it closes the run and ends this
    # process), so the worker does not add a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A crash in native code (a segmentation fault in a compiled kernel's loader, say) prints every thread's
    # Python stack into worker.log before the process dies, so the failed run says where it happened.
    faulthandler.enable()
    job_file, folder = Path(argv[0]), Path(argv[1])
    cores = [int(core) for core in argv[2].split(",")] if len(argv) > 2 and argv[2] else []
    timeline, result = Timeline(), WorkerResult()
    launched = os.environ.get(LAUNCHED_AT, "")
    if launched:  # the process's start and its imports
        timeline.seconds["start"] = time.time() - float(launched)
    result.facts["gpu_lease"] = argv[3] if len(argv) > 3 and argv[3] else "none"
    if len(cores) > 1:
        result.facts["cpu_siblings_held"] = ",".join(map(str, cores[1:]))
    try:
        switched = load_config(folder / SWITCHED) if (folder / SWITCHED).exists() else None
        measure(load_config(job_file), switched, folder, cores[0] if cores else None, result, timeline)
    except Exception as error:
        result.error = one_line(error)
        (folder / "error.txt").write_text(traceback.format_exc())
        if not isinstance(error, RunnerError):  # a user's mistake needs no trace; anything else does
            traceback.print_exc()
        return 1
    finally:
        result.metrics.update(timeline.metrics())
        result.save(folder / RESULT)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is handed back (result.json, images): skip the interpreter's teardown, which takes seconds
    # with torch, diffusers and a pipeline loaded (timed as the job's worker_exit).
    os._exit(code)
