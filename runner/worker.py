"""One job's measurement, in a process of its own: ``python -m runner.worker JOB_YAML RUN_ID``.

``measure`` reads top to bottom: build the pipeline, apply the accelerator, warm up, time the calls, count
FLOPs, log. The sweep's process (runner/job.py) started the MLflow run and ends it after this exits; a
fresh process per job keeps peak memory, compile caches and a broken CUDA context out of the next job.
"""

import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.config import Config, ConfigError, run_name, to_config
from runner.environment import environment_tags
from runner.errors import RunnerError, one_line
from runner.inputs import load_image, load_prompts
from runner.measure import PhaseClock, Stopwatch, denoiser_flop_per_step, peak_memory, steady_host, summarize
from runner.pipelines import build_pipeline, parameter_count
from runner.quality import TINY, broken_images, clip_score, image_key, judge, load_clip
from runner.tracking import Tracker

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Library log lines that say nothing here and alarm users: diffusers' warning about an empty list of fp32
# modules, and transformers falling back from torchvision (deliberately not a dependency).
HARMLESS = ("should be kept in float32: []", "requires torchvision (not installed)")
# With weights=random the tokenizer is byte-level, so long prompts are cut at 77 tokens: harmless for
# timing, since the real tokenizers pad every prompt to 77 tokens too.
TRUNCATION = ("part of your input was truncated", "Token indices sequence length is longer")


def measure(cfg: Config, tracker: Tracker, run_id: str) -> None:
    drop_log_lines(HARMLESS + (TRUNCATION if cfg.model.weights == "random" else ()))
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
    tracker.log_params(run_id, {"device": str(device), "dtype": dtype_name})
    tracker.set_tags(run_id, environment_tags(device))
    accelerator = build_accelerator(cfg.accelerator)
    accelerator.check(device)
    prompts = load_prompts(cfg.prompts, cfg.prompt)
    image = input_image(cfg, tracker, run_id)
    key = image_key(cfg, device, dtype_name, prompts, image)
    tracker.log_params(run_id, {"prompt_count": len(prompts)})
    tracker.set_tags(run_id, {"image_key": key})

    progress(cfg, f"loading ({cfg.model.weights} weights, {dtype_name}, {device})")
    with Stopwatch(device) as load:
        pipe = build_pipeline(cfg.model, cfg.names.task, device, dtype)
    eager_denoiser = getattr(pipe, cfg.model.denoiser)
    tracker.log_params(run_id, {"denoiser_params": parameter_count(eager_denoiser)})
    shape_key = f"{cfg.names.model}-{cfg.model.weights}-{cfg.names.task}-{cfg.height}x{cfg.width}-{dtype_name}"
    accelerator.apply(pipe, Target(cfg.model.denoiser, device, dtype, Path(cfg.cache_dir).expanduser(), shape_key))
    clock = PhaseClock(getattr(pipe, cfg.model.denoiser), device)

    progress(cfg, f"loaded in {load.seconds:.1f} s; warming up ({cfg.warmup} call(s))")
    timings, images = [], {}
    with steady_host(device, cfg.pin_cpu) as core:
        with Stopwatch(device) as warmup:
            for index in range(cfg.warmup):
                pipe(**call_args(cfg, prompts, image, device, index))
        accelerator.warmed_up(pipe)
        metrics = {"load_s": load.seconds, "warmup_s": warmup.seconds}
        progress(cfg, f"warmup {warmup.seconds:.2f} s; timing {cfg.runs} call(s)")
        with peak_memory(device, into=metrics):
            for index in range(cfg.runs):
                kwargs = call_args(cfg, prompts, image, device, index)
                output, timing = clock.time_call(lambda kwargs=kwargs: pipe(**kwargs))
                timings.append(timing)
                images[f"{index:03d}_p{index % len(prompts):02d}_seed{cfg.seed + index}.png"] = output.images[0]
                progress(cfg, f"timed {index + 1}/{cfg.runs}: {timing.latency_s:.3f} s")
    metrics.update(summarize(timings))
    tracker.set_tags(run_id, {"pinned_cpu": core})

    assert clock.step_inputs is not None
    flop_per_step = denoiser_flop_per_step(eager_denoiser, clock.step_inputs)
    metrics["denoiser_tflop_per_step"] = flop_per_step / 1e12
    metrics["achieved_tflops"] = flop_per_step * metrics["its"] / 1e12
    tracker.log_metrics(run_id, metrics)
    tracker.log_metric_series(run_id, "call_latency_s", [t.latency_s for t in timings])
    tracker.log_metrics(run_id, accelerator.metrics())
    tracker.set_tags(run_id, accelerator.tags())
    if cfg.log_images:
        tracker.log_images(run_id, images)
    progress(cfg, f"latency {metrics['latency_s']:.3f} s, {metrics['its']:.2f} it/s; scoring quality")
    score_quality(cfg, tracker, run_id, key, images, [prompts[i % len(prompts)] for i in range(cfg.runs)], device)


def score_quality(
    cfg: Config,
    tracker: Tracker,
    run_id: str,
    key: str,
    images: dict[str, Image.Image],
    prompts: list[str],
    device: torch.device,
) -> None:
    """CLIP score; similarity to the baseline run of the same job; broken images; the verdict, as tags."""
    q = cfg.quality
    random_weights = cfg.model.weights == "random"
    clip_name = q.clip_model if q.clip_model != "auto" else (TINY if random_weights else q.reference_clip)
    meaningless = "random weights" if random_weights else "tiny CLIP" if clip_name == TINY else ""
    clip = clip_score(load_clip(clip_name, q.clip_revision), list(images.values()), prompts, device)
    metrics, tags = (
        {"clip_score": clip},
        {"clip_model": clip_name, "clip_score_meaningful": f"false: {meaningless}" if meaningless else "true"},
    )
    broken = broken_images(images)
    if broken:
        tags["broken_output"] = "; ".join(broken)
        progress(cfg, f"WARNING: {len(broken)} broken image(s): {broken[0]}")

    if cfg.names.accelerator == q.baseline:
        tags.update(
            baseline_run="self",
            quality_unaffected=str(not broken).lower(),
            quality_verdict=f"{len(broken)} broken image(s)" if broken else "this is the baseline",
        )
    elif (baseline := tracker.find_baseline(key, q.baseline)) is None:
        tags.update(
            baseline_run=f"none found: run accelerator={q.baseline} for this job first, then compare",
            quality_unaffected="unknown",
            quality_verdict="no baseline to compare with",
        )
    else:
        baseline_clip = None if meaningless else baseline.data.metrics.get("clip_score")
        similar, verdict = judge(
            images,
            baseline.info.run_id,
            tracker.download_images(baseline.info.run_id),
            None if meaningless else clip,
            baseline_clip,
            broken,
            q.min_ssim,
            q.max_clip_drop_pct,
            device,
        )
        metrics.update(similar)
        tags.update(verdict)
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, tags)
    summary = f"CLIP score {clip:.2f}" + (f" ({meaningless}: meaningless)" if meaningless else "")
    if "ssim_vs_baseline" in metrics:
        summary += f", SSIM {metrics['ssim_vs_baseline']:.4f} / PSNR {metrics['psnr_vs_baseline']:.1f} dB vs baseline"
    progress(cfg, f"{summary}; quality unaffected: {tags['quality_unaffected']} ({tags['quality_verdict']})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is visible here; use device=cpu or device=auto")
    return device


def input_image(cfg: Config, tracker: Tracker, run_id: str) -> Image.Image | None:
    """The task's input image (None for tasks without one), logged as the run's input.png."""
    if "image" not in cfg.task.inputs:
        return None
    image, origin = load_image(cfg.task.image, cfg.names.model, cfg.width, cfg.height, tracker.find_t2i_image)
    tracker.set_tags(run_id, {"input_image": origin})
    tracker.client.log_image(run_id, image, artifact_file="input.png")
    return image


def call_args(
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
    }
    if image is not None:
        kwargs["image"] = image
    return kwargs


def progress(cfg: Config, message: str) -> None:
    name = run_name(cfg.names.model, cfg.names.task, cfg.height, cfg.width, cfg.names.accelerator)
    print(f"[{name}] {message}", flush=True)


def drop_log_lines(fragments: tuple[str, ...]) -> None:
    """Filter log lines containing any of ``fragments`` out of diffusers' and transformers' handlers."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(fragment in record.getMessage() for fragment in fragments)

    for library in ("diffusers", "transformers"):
        for handler in logging.getLogger(library).handlers:
            handler.addFilter(Drop())


def main(argv: list[str]) -> int:
    job_file, run_id = argv
    cfg = to_config(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(job_file)))
    tracker = Tracker(cfg.mlflow)
    try:
        measure(cfg, tracker, run_id)
    except Exception as error:
        tracker.set_tags(run_id, {"error": one_line(error)})
        tracker.log_text(run_id, traceback.format_exc(), "error.txt")
        if not isinstance(error, RunnerError):  # a user's mistake needs no trace; anything else does
            traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
