"""OneDiff (siliconflow/onediff) through onediffx's ``compile_pipe``, as its documentation and benchmarks use it.

``compile_pipe`` compiles the text encoders, the UNet and the VAE's encoder and decoder with the chosen
backend (``oneflow`` or ``nexfort``); with ``options`` for that backend's compiler (nexfort's benchmark uses
``{"mode": "max-optimize:max-autotune:low-precision", "memory_format": "channels_last"}``), ``ignores`` for
parts to leave alone, and ``fuse_qkv`` for fused attention projections. Two side effects to know:

- It upcasts an fp16 SDXL VAE to fp32 (``force_upcast`` VAEs; onediff issue #452), which moves memory.
- With the oneflow backend, the compiled graphs' memory belongs to OneFlow's allocator, invisible to
  torch's counters: the run's ``oneflow_mem_gib`` is OneFlow's own reading (``GetCUDAMemoryUsed``, as
  OneDiff's benchmark reports it), next to ``peak_mem_gib`` for what torch still allocates.

OneFlow graphs can be saved after compilation and loaded by the next process (``save_pipe``/``load_pipe``),
so the long first compilation is paid once per model and shape: ``cache_dir/onediff/<shape key>``; the run's
tag ``compile_cache`` says whether it was loaded. OneDiff builds only for torch 2.3-2.5, CUDA 11.8/12.x and
Python <= 3.11; elsewhere ``check`` fails the job with what is missing and how to install that stack.
"""

import hashlib
import importlib
import json
import platform
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target, Wraps
from runner.catalogue import Metric
from runner.config import ConfigError

BACKENDS = ("oneflow", "nexfort")
INSTALL = (
    "OneDiff builds only for torch 2.3-2.5, CUDA 11.8/12.x and Python <= 3.11; on such a stack: "
    "pip install onediffx, then for backend=oneflow pip install --pre oneflow -f "
    "https://github.com/siliconflow/oneflow_releases/releases/expanded_assets/community_cu122 (cu118 for CUDA 11.8), "
    "or for backend=nexfort pip install nexfort (README, OneDiff)"
)


@dataclass
class OneDiffAccelerator(Accelerator):
    backend: str = "oneflow"
    options: dict[str, Any] = field(default_factory=dict)  # the backend compiler's options
    ignores: list[str] = field(default_factory=list)  # parts compile_pipe should skip, e.g. [text_encoder]
    fuse_qkv: bool = False
    cache: bool = True  # oneflow: save compiled graphs, load them in the next process

    wraps: ClassVar[Wraps] = Wraps.PIPELINE  # it compiles the whole pipeline with its own runtime
    catalogue: ClassVar[tuple[Metric, ...]] = (Metric("oneflow_mem_gib", "OneFlow's memory", "GiB", "{:.2f}"),)

    def check(self, device: torch.device) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"accelerator.backend={self.backend}: choose one of {', '.join(BACKENDS)}")
        here = f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}"
        for package in ("onediffx", self.backend):
            problem = _unusable(package)
            if problem:
                raise ConfigError(f"accelerator=onediff: {package} {problem} (here: {here}). {INSTALL}")
        if device.type != "cuda":
            raise ConfigError(f"accelerator=onediff needs a CUDA device, not device={device.type}")

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        from onediffx import compile_pipe, load_pipe

        digest = hashlib.sha256(json.dumps([self.options, sorted(self.ignores), self.fuse_qkv]).encode()).hexdigest()
        self.folder = target.cache_dir / "onediff" / f"{target.shape_key}-{self.backend}-{digest[:10]}"
        compile_pipe(
            pipe,
            backend=self.backend,
            options=self.options or None,
            ignores=tuple(self.ignores),
            fuse_qkv_projections=self.fuse_qkv,
        )
        self.loaded = self._caches_graphs() and self.folder.is_dir()
        if self.loaded:
            load_pipe(pipe, dir=str(self.folder), ignores=tuple(self.ignores))

    def warmed_up(self, pipe: DiffusionPipeline) -> None:
        if self._caches_graphs() and not self.loaded:  # the warmup compiled the graphs: keep them
            from onediffx import save_pipe

            save_pipe(pipe, dir=str(self.folder), ignores=tuple(self.ignores))

    def _caches_graphs(self) -> bool:
        return self.cache and self.backend == "oneflow"  # nexfort caches through torch inductor's own cache

    def tags(self) -> dict[str, str]:
        if not self._caches_graphs():
            return {"compile_cache": "off" if self.backend == "oneflow" else "inductor's own"}
        return {
            "compile_cache": "hit" if getattr(self, "loaded", False) else "miss",
            "compile_cache_dir": str(getattr(self, "folder", "")),
        }

    def metrics(self) -> dict[str, float]:
        if self.backend != "oneflow":
            return {}
        import oneflow

        return {"oneflow_mem_gib": oneflow._oneflow_internal.GetCUDAMemoryUsed() / 1024}  # reported in MiB


def _unusable(package: str) -> str:
    """Why ``package`` cannot be used here, or an empty string."""
    try:
        module = importlib.import_module(package)
    except Exception as error:  # an import error, or a binary built for another stack failing to load
        return f"is not installed or does not load ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    if package == "oneflow" and not hasattr(module, "_oneflow_internal"):
        return "is the placeholder published on PyPI, not OneDiff's build"
    return ""
