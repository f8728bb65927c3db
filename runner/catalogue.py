"""One catalogue of the metrics a job logs: key, title, unit and format.

The sweep's table, the report and the plots show metrics through it, so a metric is named and formatted
the same everywhere. An accelerator adds its own by declaring them (``Accelerator.catalogue``); ``describe``
finds those too.
"""

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str = ""
    fmt: str = "{:.3f}"

    @property
    def heading(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title

    def show(self, value: float | None) -> str:
        return "-" if value is None else self.fmt.format(value)


METRICS = (
    Metric("load_s", "load", "s", "{:.1f}"),
    Metric("accelerate_s", "applying the accelerator (float8's calibration call)", "s", "{:.1f}"),
    Metric("warmup_s", "warmup", "s", "{:.1f}"),
    Metric("warmup_clock_step_s", "system clock set during the warmup (compile timers read it)", "s", "{:+.3f}"),
    Metric("latency_s", "latency", "s", "{:.3f}"),
    Metric("latency_std_s", "latency std", "s", "{:.3f}"),
    Metric("latency_p50_s", "latency p50", "s", "{:.3f}"),
    Metric("latency_p90_s", "latency p90", "s", "{:.3f}"),
    Metric("latency_min_s", "latency min", "s", "{:.3f}"),
    Metric("latency_cv", "latency CV", "", "{:.1%}"),
    Metric("its", "it/s", "", "{:.2f}"),
    Metric("text_encode_s", "to first step", "s", "{:.3f}"),
    Metric("denoise_s", "denoising", "s", "{:.3f}"),
    Metric("decode_s", "decode", "s", "{:.3f}"),
    Metric("denoise_steps", "steps", "", "{:.0f}"),
    Metric("denoiser_tflop_per_step", "TFLOP per step", "", "{:.2f}"),
    Metric("achieved_tflops", "achieved", "TFLOP/s", "{:.1f}"),
    Metric("images_per_s", "images/s", "", "{:.2f}"),
    Metric("latency_per_image_s", "latency per image", "s", "{:.3f}"),
    Metric("energy_j_per_image", "energy per image", "J", "{:.1f}"),
    Metric("avg_power_w", "power", "W", "{:.0f}"),
    Metric("images_per_kwh", "images per kWh", "", "{:.0f}"),
    Metric("warmup_energy_j", "warmup energy", "J", "{:.0f}"),
    Metric("power_capped_share", "clocks held down by the power limit", "", "{:.1%}"),
    Metric("thermal_capped_share", "clocks held down by heat", "", "{:.1%}"),
    Metric("gpu_temp_start_c", "GPU temperature before", "°C", "{:.0f}"),
    Metric("gpu_temp_end_c", "GPU temperature after", "°C", "{:.0f}"),
    Metric("gpu_busy_share", "GPU busy", "", "{:.0%}"),
    Metric("gpu_busy_samples", "GPU utilisation samples", "", "{:.0f}"),
    Metric("gpu_busy_covered_share", "timed calls the utilisation samples cover", "", "{:.0%}"),
    Metric("usd_per_1k_images", "cost per 1k images", "USD", "{:.3f}"),
    Metric("peak_mem_gib", "peak memory", "GiB", "{:.2f}"),
    Metric("peak_reserved_gib", "peak reserved", "GiB", "{:.2f}"),
    Metric("peak_rss_gib", "peak RSS", "GiB", "{:.2f}"),
    Metric("other_cpu_cores", "others' CPU use", "cores", "{:.2f}"),
    Metric("launch_thread_cpu_share", "launching thread on a CPU", "", "{:.0%}"),
    Metric("launch_thread_wait_share", "launching thread waiting for its core", "", "{:.1%}"),
    Metric("pinned_core_steal_share", "pinned core taken by the hypervisor", "", "{:.1%}"),
    Metric("launch_core_loop_ms", "fixed loop on the launching core", "ms", "{:.2f}"),
    Metric("launch_core_loop_cv", "the fixed loop's spread between calls", "", "{:.1%}"),
    Metric("timed_compiles", "graphs compiled while timed", "", "{:.0f}"),
    Metric("timed_compile_s", "compiling while timed (torch's timer)", "s", "{:.3f}"),
    Metric("clip_score", "CLIP score", "", "{:.2f}"),
    Metric("ssim_vs_baseline", "SSIM vs baseline", "", "{:.4f}"),
    Metric("ssim_vs_baseline_min", "lowest SSIM vs baseline", "", "{:.4f}"),
    Metric("psnr_vs_baseline", "PSNR vs baseline", "dB", "{:.1f}"),
    Metric("images_compared", "images compared", "", "{:.0f}"),
    Metric("identical_to_baseline", "identical to baseline", "", "{:.0%}"),
    # Switching sizes in one process (switch_res; runner/worker.py, time_switch)
    Metric("switch_first_call_s", "first call at switch_res", "s", "{:.3f}"),
    Metric("switch_latency_s", "latency at switch_res", "s", "{:.3f}"),
    Metric("switch_cost_s", "first call at switch_res less its latency", "s", "{:.3f}"),
    Metric("switch_back_call_s", "first call back at res", "s", "{:.3f}"),
    Metric("switch_back_cost_s", "switching back (first call back less one before)", "s", "{:.3f}"),
    Metric("switch_back_compiles", "graphs compiled for the call back", "", "{:.0f}"),
    Metric("switch_s", "switching sizes (wall)", "s", "{:.1f}"),
    Metric("job_wall_s", "job wall time", "s", "{:.1f}"),
    Metric("overhead_s", "runner's own time", "s", "{:.1f}"),
    # Where the runner's own time goes (runner/job.py, runner/worker.py: their Timeline)
    Metric("time_queued_s", "waiting for a GPU", "s", "{:.1f}"),
    Metric("time_job_setup_s", "job setup", "s", "{:.1f}"),
    Metric("time_start_s", "worker start and imports", "s", "{:.1f}"),
    Metric("time_setup_s", "worker setup", "s", "{:.1f}"),
    Metric("time_collect_s", "garbage collection before timing", "s", "{:.1f}"),
    Metric("time_timed_s", "timed calls (wall)", "s", "{:.1f}"),
    Metric("time_flops_s", "FLOP count", "s", "{:.1f}"),
    Metric("time_images_s", "saving images", "s", "{:.1f}"),
    Metric("time_quality_s", "quality scoring", "s", "{:.1f}"),
    Metric("time_worker_exit_s", "worker exit", "s", "{:.1f}"),
    Metric("time_record_s", "recording in MLflow", "s", "{:.1f}"),
    Metric("speedup_vs_baseline", "speedup", "", "{:.2f}×"),
    Metric("mem_ratio_vs_baseline", "memory vs baseline", "", "{:.2f}×"),
)
CATALOGUE = {metric.key: metric for metric in METRICS}

# What the sweep's table shows, where the runs have it.
SWEEP_TABLE = (
    "latency_s",
    "latency_cv",
    "gpu_busy_share",  # beside the latency: the share of it the GPU spent running kernels
    "its",
    "images_per_s",
    "warmup_s",
    "compile_cache_files_at_start",  # beside the warmup: whether it compiled from an empty cache
    "peak_mem_gib",
    "peak_rss_gib",
    "energy_j_per_image",
    "usd_per_1k_images",
    "speedup_vs_baseline",
)


def describe(key: str) -> Metric:
    """The catalogue's entry for ``key``, an accelerator's own, or a plain one named by the key."""
    return CATALOGUE.get(key) or accelerator_metrics().get(key) or Metric(key, key.replace("_", " "), "", "{:.4g}")


@cache
def accelerator_metrics() -> dict[str, Metric]:
    """The metrics declared by the accelerators shipped in runner/accelerators (imported to find them). A module
    needing a package this machine lacks (``geglu_kernels``: Triton, absent on CPU machines) declares none here:
    its accelerator imports it only when it runs."""
    import runner.accelerators as package

    for module in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"{package.__name__}.{module.name}")
        except ImportError:
            continue
    declared: dict[str, Metric] = {}
    pending = [package.Accelerator]
    while pending:
        cls = pending.pop()
        declared.update({metric.key: metric for metric in cls.catalogue})
        pending.extend(cls.__subclasses__())
    return declared
