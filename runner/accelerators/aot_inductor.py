"""Ahead-of-time compilation: the denoiser and the VAE decoder exported (``torch.export``) and compiled by
AOTInductor once into packages on disk, which later processes load without tracing anything.

torch_compile's caches keep inductor's generated code, but every new process still has Dynamo trace the
UNet's Python again and build its guards: 15-21 s of a 20-28 s warm start on an H100 (BENCHMARKS.md,
"Faster still, continued"). Here the first call of a module with a given input signature exports it,
compiles the exported program into ``cache_dir/aot_inductor/<name>-<key>.pt2`` and loads it; a later
process finds the package and only loads it. A package holds code, not weights: the module's own parameters
are handed to the loaded model (user-managed constants), so nothing is copied, and one package serves every
checkpoint of an architecture. Its key digests the module's structure (its ``repr``), the input signature,
and the torch version and device, so a change to any of them compiles anew.

Lossless up to rounding (inductor's kernels, as torch_compile's). ``benchmarks/conf/accelerator/aot_graph.yaml``
replays it from CUDA graphs. Not measured yet: on the H100 its first job's worker died (SIGSEGV) in the
warmup, cause not yet read (BENCHMARKS.md, "Faster still, continued"), so it is a benchmark variant only.
"""

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch.utils._pytree import tree_flatten

from runner.accelerators import Accelerator, DenoiserWrapper, Stage, Target, Wraps, number_as_tensor
from runner.catalogue import Metric
from runner.config import ConfigError
from runner.errors import RunnerError


class AotModule(DenoiserWrapper):
    """Wraps a module so that its calls run its AOTInductor package, compiled or loaded on first use of each
    input signature."""

    def __init__(self, module: torch.nn.Module, folder: Path, name: str) -> None:
        super().__init__(module)
        self.folder, self.name = folder, name
        self.loaded: dict[tuple, Any] = {}
        self.cache_events: list[str] = []  # "hit" or "miss", one per signature
        self.seconds = {"export": 0.0, "compile": 0.0, "load": 0.0}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(number_as_tensor(value, self.module) for value in args)
        flat, spec = tree_flatten((args, kwargs))
        dtypes = tuple(sorted({str(weight.dtype) for weight in self.weights().values()}))
        signature = (str(spec), *(_describe(value) for value in flat), dtypes)
        model = self.loaded.get(signature)
        if model is None:
            model = self.loaded[signature] = self._prepare(args, kwargs, signature)
        return model(*args, **kwargs)

    def weights(self) -> dict[str, torch.Tensor]:
        """The module's parameters and buffers by name, as the package names its constants."""
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    def package_path(self, signature: tuple) -> Path:
        device = next(self.module.parameters()).device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        key = repr((repr(self.module), signature, torch.__version__, where))
        return self.folder / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt2"

    def _prepare(self, args: tuple, kwargs: dict, signature: tuple) -> Any:
        import torch._inductor

        path = self.package_path(signature)
        if path.exists():
            self.cache_events.append("hit")
        else:
            self.cache_events.append("miss")
            with _timed(self.seconds, "export"):
                exported = torch.export.export(self.module, args, kwargs, strict=False)
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
            with _timed(self.seconds, "compile"):
                torch._inductor.aoti_compile_and_package(
                    exported,
                    package_path=str(partial),
                    inductor_configs={"aot_inductor.package_constants_in_so": False},
                )
            partial.replace(path)  # whole or absent: a process stopped mid-compile leaves no package behind
        with _timed(self.seconds, "load"):
            model = torch._inductor.aoti_load_package(str(path))
        weights, names = self.weights(), model.get_constant_fqns()
        missing = [name for name in names if name not in weights]
        if missing:
            raise RunnerError(
                f"the ahead-of-time compile (AotInductorAccelerator): the package {path.name} needs "
                f"{missing[0]}, which {type(self.module).__name__} does not have; delete {path} to compile it anew"
            )
        # Handed as they are, not copied: the model reads the module's own tensors, also after the module
        # moves them (diffusers upcasts SDXL's VAE for each decode), since those tensors keep their identity.
        model.load_constants({name: weights[name] for name in names}, check_full_update=True, user_managed=True)
        return model


@dataclass
class AotInductorAccelerator(Accelerator):
    compile_vae: bool = True  # the VAE's decoder too

    wraps: ClassVar[Wraps] = Wraps.DENOISER
    stage: ClassVar[Stage] = Stage.COMPILE
    catalogue: ClassVar[tuple[Metric, ...]] = (
        Metric("aot_export_s", "torch.export time", "s", "{:.1f}"),
        Metric("aot_compile_s", "AOTInductor compile time", "s", "{:.1f}"),
        Metric("aot_load_s", "AOTInductor package load time", "s", "{:.1f}"),
    )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        if getattr(denoiser, "step_modules", ()):
            raise ConfigError(
                "the ahead-of-time compile (AotInductorAccelerator) compiles the denoiser whole, not DeepCache's "
                "two paths; use accelerator=deepcache_compile for DeepCache"
            )
        folder = target.cache_dir / "aot_inductor"
        self.modules = [AotModule(denoiser, folder, "denoiser")]  # state, not an option: no dataclass field
        setattr(pipe, target.denoiser, self.modules[0])
        if self.compile_vae:
            self.modules.append(AotModule(pipe.vae.decoder, folder, "vae_decoder"))
            pipe.vae.decoder = self.modules[-1]

    def tags(self) -> dict[str, str]:
        events = {event for module in getattr(self, "modules", ()) for event in module.cache_events}
        return {"aot_cache": "partial" if len(events) > 1 else events.pop() if events else "none"}

    def metrics(self) -> dict[str, float]:
        modules = getattr(self, "modules", ())
        parts = ("export", "compile", "load")
        return {f"aot_{part}_s": sum(module.seconds[part] for module in modules) for part in parts}


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), str(value.device))
    return repr(value)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to ``seconds[key]``."""
    began = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] += time.perf_counter() - began
