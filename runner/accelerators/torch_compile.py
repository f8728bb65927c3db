"""torch.compile of the denoiser and the VAE: its decoder, and its encoder where a job encodes an input image.

Options: the compile mode; fullgraph; the backend (inductor; aot_eager or eager to check tracing without code
generation, as the CPU tests do); the VAE's decoder (``compile_vae``) and encoder (``compile_vae_encoder``, by
default as ``compile_vae``: compiled on first use, so a text-to-image job compiles no encoder); QKV projections
fused into one matmul (diffusers' ``fuse_qkv_projections``; a denoiser a part before fused, float8's ``fuse_qkv``,
is left as it is and only the VAE's are fused); channels_last memory format; two ways to compile a
denoiser's repeated blocks once (the classes ``blocks`` names, by default diffusers' ``_repeated_blocks``: SDXL's
transformer blocks): ``regional`` compiles those blocks alone and leaves the glue between them eager (each class
compiled once per input shape and reused by all of its modules: Dynamo guards on a module's structure and shapes,
not on which module it is), ``nested`` compiles the whole module with each block class traced once as a nested
compile region (torch's hierarchical compilation, ``nested_compile_region``) and stamped out for the other modules.
On SDXL at 1024 px on an H100 (BENCHMARKS.md, "Faster still, eighth part") nested transformer blocks cut
``compile_graph``'s cold compile by a quarter for calls 0.6% slower; regional transformer and resnet blocks halve
it for calls 3-7% slower. Compiled artefacts persist in ``cache_dir/torch_compile`` (inductor's FX-graph and
AOTAutograd caches, and Triton's kernels), so a second process with the same job compiles from cache: the run's tag
``compile_cache`` says whether it was hit, the metric ``compile_cache_files_at_start`` how many files the folder
held before this job's compile (a warmup is cold only where it held none), and the metrics ``compile_s`` and
``compile_backend_s`` where the warmup's compile time went (the part outside the backend is Dynamo tracing the
Python and building guards, paid by every process, cache or not). ``precompile`` saves that part too: the denoiser
and the VAE's decoder and encoder traced and compiled whole, written to ``cache_dir/precompiled`` and loaded by
later processes without tracing (``runner/accelerators/precompile.py``); such a run reports ``precompile_cache``,
``precompile_s`` and ``precompile_load_s`` instead, since inductor's cache counters and Dynamo's outer timers do not
see ``aot_compile``. Either way the ``compile_<phase>_s`` metrics split the compile by stage (COMPILE_PHASES):
Dynamo's tracing, AOTAutograd, inductor's lowering and code generation, the kernels' building and loading, and the
kernels built one by one in the job's process because inductor's pool of compile workers was not ready.

``inductor`` passes settings of torch's own (``torch._inductor.config`` keys, dotted as torch names them, e.g.
``{triton.enable_pdl: true}``) to this accelerator's compiles, for trying one without code here; a key torch
lacks is refused with the closest one, the run's tag ``inductor_settings`` records them, and a precompiled
function is saved per settings.

A denoiser that another accelerator wrapped may name ``step_modules``, the attributes to compile in its stead
(DeepCache's full and shallow UNets), so that routing between them stays in Python.
"""

import difflib
import json
import os
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Stage, Target, Wraps
from runner.accelerators.precompile import PrecompiledModule
from runner.catalogue import Metric
from runner.config import ConfigError

MODES = ("default", "reduce-overhead")
CUDA_GRAPH_MODES = ("reduce-overhead",)
# Not offered, for want of a measurement (BENCHMARKS.md, "Compile options measured once"): on an H100, SDXL's
# compile with inductor's coordinate-descent tuning did not end in two GPU calls of 8.5 minutes each (the
# second resuming from the first's cache), and these modes tune more than that, so nobody could time them.
UNMEASURED = ("max-autotune", "max-autotune-no-cudagraphs")
# Dynamo's own timers (torch._dynamo.utils.compilation_time_metrics): a whole compile, and its backend's part.
COMPILE_TIMERS = {"compile_s": "_compile.compile_inner", "compile_backend_s": "OutputGraph.call_user_compiler"}
# Where a compile's time goes, from the timers torch keeps at each stage: each phase is a timer less the part of
# it another phase reports, so that none counts twice. Only timers that do not nest in themselves are read (a
# nested region is lowered inside its parent's lowering: GraphLowering's own timers count it twice).
# aot_compile (precompile) runs the same stages under its own outer timer, so these are given for both.
COMPILE_PHASES = {
    "compile_trace_s": ("bytecode_tracing", None),  # Dynamo reading the Python into a graph
    "compile_aot_s": ("create_aot_dispatcher_function", "compile_fx_inner"),  # AOTAutograd: functional graph
    "compile_inductor_s": ("compile_fx_inner", "PyCodeCache.load_by_key_path"),  # lowering, fusion, code
    # Loading the code: kernels built and waited for (and the loading of saved code, where a precompiled job
    # found some: that is subtracted from inductor's part too, by at most its precompile_load_s)
    "compile_kernels_s": ("PyCodeCache.load_by_key_path", None),
    # ...of which Triton kernels built in this process one at a time, while inductor's pool of compile workers
    # was not yet ready (with it ready, they build side by side and this reads 0)
    "compile_kernels_here_s": ("async_compile.precompile", None),
}
STAGE_NAMES = {  # as the job's log names them (warmup_note)
    "compile_trace_s": "Dynamo",
    "compile_aot_s": "AOTAutograd",
    "compile_inductor_s": "inductor",
    "compile_kernels_s": "kernels",
    "compile_kernels_here_s": "of them built one by one",
}


@dataclass
class TorchCompileAccelerator(Accelerator):
    mode: str = "default"
    fullgraph: bool = False
    backend: str = "inductor"
    compile_vae: bool = True  # the VAE's decoder
    compile_vae_encoder: bool | None = None  # the VAE's encoder (image-to-image's input image); null: as compile_vae
    fuse_qkv: bool = False
    channels_last: bool = False
    regional: bool = False
    nested: bool = False
    blocks: list[str] = field(default_factory=list)  # regional's or nested's block classes (default _repeated_blocks)
    cache: bool = True
    precompile: bool = False
    inductor: dict[str, Any] | None = None  # inductor's own settings (inductor_settings_problem); null: none

    wraps: ClassVar[Wraps] = Wraps.DENOISER
    stage: ClassVar[Stage] = Stage.COMPILE
    catalogue: ClassVar[tuple[Metric, ...]] = (
        Metric("compile_s", "torch.compile time", "s", "{:.1f}"),
        Metric("compile_backend_s", "of which the backend (inductor, its caches)", "s", "{:.1f}"),
        Metric("precompile_s", "precompile: tracing, compiling and saving", "s", "{:.1f}"),
        Metric("precompile_load_s", "precompile: loading saved functions", "s", "{:.1f}"),
        Metric("compiled_blocks", "regional or nested: the block modules compiled alone or as regions", "", "{:.0f}"),
        Metric("compile_cache_files_at_start", "cache files before", "", "{:.0f}"),
        Metric("compile_trace_s", "compile: Dynamo tracing the Python", "s", "{:.1f}"),
        Metric("compile_aot_s", "compile: AOTAutograd", "s", "{:.1f}"),
        Metric("compile_inductor_s", "compile: inductor lowering, fusing, writing code", "s", "{:.1f}"),
        Metric("compile_kernels_s", "compile: building and loading kernels", "s", "{:.1f}"),
        Metric("compile_kernels_here_s", "of which built one by one, the compile pool not ready", "s", "{:.1f}"),
    )

    def check(self, device: torch.device) -> None:
        if self.mode in UNMEASURED:
            raise ConfigError(
                f"accelerator.mode={self.mode}: not offered, since its compile of SDXL outlasts a GPU call on our "
                "H100 (BENCHMARKS.md, 'Compile options measured once'); choose one of " + ", ".join(MODES)
            )
        if self.mode not in MODES:
            raise ConfigError(f"accelerator.mode={self.mode}: choose one of {', '.join(MODES)}")
        if self.precompile and (self.mode != "default" or self.regional):
            chosen = f"accelerator.mode={self.mode}" if self.mode != "default" else "accelerator.regional=true"
            raise ConfigError(
                f"accelerator.precompile=true saves one whole graph per module, compiled in the default mode; "
                f"{chosen} does not fit it: drop one of the two"
            )
        if self.blocks and not (self.regional or self.nested):
            raise ConfigError(
                f"accelerator.blocks={self.blocks} names the blocks that regional or nested compilation takes; set "
                "accelerator.regional=true or accelerator.nested=true (in a chain's part, its key) or leave blocks "
                "empty"
            )
        if self.nested and not hasattr(torch.compiler, "nested_compile_region"):
            raise ConfigError(
                f"accelerator.nested=true needs torch's nested_compile_region (torch 2.8 or newer, not "
                f"{torch.__version__}): set nested: false in the accelerator's YAML (compile_graph's first part) "
                "or upgrade torch"
            )
        if self.nested and self.regional:
            raise ConfigError(
                "accelerator.nested=true marks blocks inside a whole-module compile, and accelerator.regional=true "
                "compiles the blocks alone: drop one of the two"
            )
        if problem := inductor_settings_problem(self._inductor_settings(), self.backend, self.mode):
            raise ConfigError(problem)
        if self.mode in CUDA_GRAPH_MODES and device.type != "cuda":
            raise ConfigError(
                f"accelerator.mode={self.mode} replays CUDA graphs: it needs device=cuda, not "
                f"{device.type}; use accelerator.mode=default"
            )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        leave_out_the_version_checks_warning()
        denoiser = getattr(pipe, target.denoiser)
        parts = getattr(denoiser, "step_modules", ())
        self.counters_before = _cache_counters()
        self.timers_before = _compile_timers()
        self.phases_before = _compile_phases()
        if self.cache and self.backend == "inductor":
            folder = target.cache_dir / "torch_compile"
            # What the kernel caches held before this compile: a warmup is cold only where they were empty (on
            # 2026-12-04 a new H200 machine start kept an earlier start's /tmp, caches included)
            self.cache_files_at_start = sum(1 for entry in folder.rglob("*") if entry.is_file())
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read when inductor first needs its cache
            os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
            # Imported under other names: "import torch._inductor.config" here would make torch a name of this
            # function's own, unbound where the cache is off (channels_last below then failed)
            from torch._functorch import config as functorch_config
            from torch._inductor import config as inductor_config

            inductor_config.fx_graph_cache = True
            functorch_config.enable_autograd_cache = True
        if self.fuse_qkv:
            fuse_pipeline_projections(pipe, denoiser)
        if self.channels_last:
            denoiser.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if self.nested:
            self.compiled_blocks = nest_blocks(denoiser, block_classes(denoiser, self.blocks, "nested"))
        if self.precompile:
            self._precompile(pipe, target, denoiser, parts)
            return
        if self.regional:
            classes = block_classes(denoiser, self.blocks, "regional")
            self.compiled_blocks = compile_blocks(denoiser, classes, self._options())
        elif parts:
            for name in parts:
                setattr(denoiser, name, self._compile(getattr(denoiser, name)))
        else:
            setattr(pipe, target.denoiser, self._compile(denoiser))
        if self.compile_vae:
            pipe.vae.decode = self._compile(pipe.vae.decode)
        if self._compile_encoder():
            pipe.vae.encoder.compile(**self._options())  # in place: the VAE's weights keep their names

    def _precompile(self, pipe: DiffusionPipeline, target: Target, denoiser: torch.nn.Module, parts) -> None:
        if parts:
            raise ConfigError(
                "accelerator.precompile=true compiles the denoiser whole, not DeepCache's two paths; use "
                "accelerator=deepcache_compile for DeepCache"
            )
        folder, settings = target.cache_dir / "precompiled", self._inductor_settings()
        self.precompiled = [PrecompiledModule(denoiser, folder, "denoiser", self.backend, settings)]
        setattr(pipe, target.denoiser, self.precompiled[0])
        if self.compile_vae:
            decoder = PrecompiledModule(pipe.vae.decoder, folder, "vae_decoder", self.backend, settings)
            self.precompiled.append(decoder)
            pipe.vae.decoder = self.precompiled[-1]
        if self._compile_encoder():  # loaded or compiled at its first call: a text-to-image job makes none
            self.precompiled.append(PrecompiledModule(pipe.vae.encoder, folder, "vae_encoder", self.backend, settings))
            pipe.vae.encoder = self.precompiled[-1]

    def _compile_encoder(self) -> bool:
        return self.compile_vae if self.compile_vae_encoder is None else self.compile_vae_encoder

    def _inductor_settings(self) -> dict[str, Any]:
        return dict(self.inductor or {})  # null in the YAML: none

    def _options(self) -> dict:
        mode = None if self.mode == "default" else self.mode
        options = {"mode": mode, "fullgraph": self.fullgraph, "backend": self.backend, "dynamic": False}
        settings = self._inductor_settings()
        return options | ({"options": settings} if settings else {})

    def _compile(self, fn):
        return torch.compile(fn, **self._options())

    def tags(self) -> dict[str, str]:
        settings = self._inductor_settings()
        return ({"inductor_settings": json.dumps(settings, sort_keys=True)} if settings else {}) | self._cache_tags()

    def _cache_tags(self) -> dict[str, str]:
        if self.precompile:  # its own files, not inductor's cache (which aot_compile neither reads nor fills)
            events = {event for module in getattr(self, "precompiled", ()) for event in module.cache_events}
            return {"precompile_cache": "partial" if len(events) > 1 else events.pop()} if events else {}
        if not (self.cache and self.backend == "inductor"):
            return {"compile_cache": "off"}
        before = getattr(self, "counters_before", (0, 0))
        hits, misses = (now - then for now, then in zip(_cache_counters(), before, strict=True))
        state = "hit" if hits and not misses else "miss" if misses and not hits else "partial" if hits else "none"
        return {"compile_cache": state, "compile_cache_hits": str(hits), "compile_cache_misses": str(misses)}

    def warmup_note(self) -> str:
        measured = self.metrics()
        total = measured.get("precompile_s", measured.get("compile_s", 0.0))
        stages = [f"{STAGE_NAMES[key]} {measured[key]:.1f}" for key in COMPILE_PHASES if key in measured]
        notes = [f"compile {total:.1f} s ({', '.join(stages)})"] if stages and total >= 0.05 else []
        if any("hit" in module.cache_events for module in getattr(self, "precompiled", ())):
            notes.append(f"saved compiled modules loaded in {measured['precompile_load_s']:.1f} s")
        return "; ".join(notes)

    def metrics(self) -> dict[str, float]:
        measured = {"compiled_blocks": float(self.compiled_blocks)} if hasattr(self, "compiled_blocks") else {}
        if hasattr(self, "cache_files_at_start"):
            measured["compile_cache_files_at_start"] = float(self.cache_files_at_start)
        before = getattr(self, "phases_before", {})
        # Stages this accelerator's compiles ran: a timer an earlier compile in the process left behind is not one
        spent = {key: seconds - before.get(key, 0.0) for key, seconds in _compile_phases().items()}
        measured |= {key: seconds for key, seconds in spent.items() if seconds > 0}
        if self.precompile:  # Dynamo's outer timers do not see aot_compile: they would read 0 for a 100 s compile
            modules = getattr(self, "precompiled", ())
            measured["precompile_s"] = sum(module.seconds["compile"] for module in modules)
            measured["precompile_load_s"] = sum(module.seconds["load"] for module in modules)
            return measured
        before = getattr(self, "timers_before", {})
        return measured | {key: seconds - before.get(key, 0.0) for key, seconds in _compile_timers().items()}


def inductor_settings_problem(settings: dict[str, Any], backend: str, mode: str) -> str | None:
    """The one line refusing ``inductor`` settings (``torch._inductor.config`` keys, dotted as torch names them:
    ``triton.enable_pdl``) that torch does not have or cannot take here; None where they can be used."""
    if not settings:
        return None
    if backend != "inductor":
        return f"accelerator.inductor sets inductor's own settings, and accelerator.backend={backend} runs no inductor"
    if mode != "default":
        return (
            f"accelerator.inductor and accelerator.mode={mode} both set inductor's settings, which torch.compile "
            "refuses: give the mode's settings in accelerator.inductor instead"
        )
    import torch._inductor.config

    known = torch._inductor.config.get_config_copy()
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "torch._inductor.config lists them"
            return f"accelerator.inductor: torch {torch.__version__}'s inductor has no setting {key}; {hint}"
    return None


def block_classes(denoiser: torch.nn.Module, blocks: list[str], option: str) -> dict[str, type]:
    """The block classes ``blocks`` names (empty: the denoiser's ``_repeated_blocks``), each present in
    ``denoiser``; ``option`` (regional or nested) is what the refusals name."""
    named = type(denoiser).__name__
    blocks = list(blocks) or list(getattr(denoiser, "_repeated_blocks", None) or ())
    if not blocks:
        raise ConfigError(
            f"accelerator.{option}=true: {named} names no repeated blocks; name its block classes with "
            f"accelerator.blocks=[...] or use accelerator.{option}=false ({option}: false in a chain's part)"
        )
    present = {type(module).__name__: type(module) for module in denoiser.modules()}
    if missing := [name for name in blocks if name not in present]:
        close = difflib.get_close_matches(missing[0], present, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(
            f"accelerator.blocks: {named} has no module of class {', '.join(missing)}; {hint}its classes: "
            + ", ".join(sorted(present))
        )
    return {name: present[name] for name in blocks}


def compile_blocks(denoiser: torch.nn.Module, classes: dict[str, type], options: dict) -> int:
    """Compile each outermost module of ``denoiser`` of one of ``classes`` and return how many. Dynamo keeps
    one compiled version per class and input shape for all such modules, and gives up on a function after
    ``recompile_limit`` versions (8), silently running the rest eager: SDXL's resnet blocks alone come in 13
    shapes at one size, so the limit is raised (a job that times two sizes in one process doubles that)."""
    import torch._dynamo.config

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled: set[int] = set()

    def visit(module: torch.nn.Module) -> None:
        if id(module) in compiled:
            return
        if type(module).__name__ in classes:
            module.compile(**options)
            compiled.add(id(module))
            return
        for child in module.children():
            visit(child)

    visit(denoiser)
    return len(compiled)


def nest_blocks(denoiser: torch.nn.Module, classes: dict[str, type]) -> int:
    """Make the forward of every module of ``denoiser`` of one of ``classes`` its class's nested compile region
    (torch's hierarchical compilation): a whole-module compile traces and compiles it once per input shape and
    stamps it out for the others; return how many modules. Torch decides reuse from the region's inputs (the
    module's parameters among them), not from the module's other attributes, so only classes whose modules
    differ by their parameters' shapes alone are safe: on torch 2.13, SDXL's resnet blocks so marked gave
    wrong outputs (aot_eager, on this project's CPU machine), its transformer blocks exact ones."""
    regions = {name: torch.compiler.nested_compile_region(cls.forward) for name, cls in classes.items()}
    marked = 0
    for module in denoiser.modules():
        if (region := regions.get(type(module).__name__)) is not None:
            module.forward = types.MethodType(region, module)
            marked += 1
    return marked


def _compile_timers() -> dict[str, float]:
    """Seconds Dynamo has spent compiling in this process so far, and its backend's part of them."""
    from torch._dynamo.utils import compilation_time_metrics

    return {key: float(sum(compilation_time_metrics.get(timer, ()))) for key, timer in COMPILE_TIMERS.items()}


def _compile_phases() -> dict[str, float]:
    """Seconds spent so far in this process in each of COMPILE_PHASES whose stage ran (a backend without
    inductor runs no inductor stage; a timer a later torch renames drops its phase rather than reading 0)."""
    from torch._dynamo.utils import compilation_time_metrics as timers

    def spent(name: str) -> float:
        return float(sum(timers[name]))

    return {
        key: spent(timer) - (spent(inner) if inner in timers else 0.0)
        for key, (timer, inner) in COMPILE_PHASES.items()
        if timer in timers
    }


def _cache_counters() -> tuple[int, int]:
    """Inductor's FX-graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def projections_fused(model: torch.nn.Module) -> bool:
    """Whether diffusers' fused projections already run ``model``'s attention (a part before this one fused them:
    float8's fuse_qkv, which then quantised the fused layers)."""
    return any(getattr(module, "fused_projections", False) for module in model.modules())


def fuse_pipeline_projections(pipe: DiffusionPipeline, denoiser: torch.nn.Module) -> None:
    """diffusers' fused Q, K, V projections in the denoiser and the VAE; a denoiser already fused is left as it is,
    since fusing again would build its fused layers anew from the unfused ones, in fp16, over float8's."""
    fuse_denoiser = not projections_fused(denoiser)
    if fuse_denoiser:
        refuse_unfusable(denoiser)
    pipe.fuse_qkv_projections(unet=fuse_denoiser, vae=True)


def refuse_unfusable(denoiser: torch.nn.Module) -> None:
    """Raise ConfigError if a part before this one replaced an attention projection by a layer diffusers cannot
    fuse (it concatenates the projections' weights): float8 layers have none."""
    for name, module in denoiser.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and not isinstance(module, torch.nn.Linear):
            raise ConfigError(
                f"accelerator.fuse_qkv=true: {name} is a {type(module).__name__}, which diffusers cannot fuse; "
                "keep float8 out of the unfused attention projections (fp8's include=[ff.]), let float8 fuse them "
                "first (fp8's fuse_qkv: true), or set fuse_qkv: false"
            )


def leave_out_the_version_checks_warning() -> None:
    """Dynamo warns, with the source line and "silent incorrectness is a potential risk", wherever traced code calls
    a function behind ``functools.lru_cache``: it traces the function instead. diffusers' upsampling layers call its
    cached ``is_torch_version("<", "2.1")`` so wherever they run in bfloat16, in every compile of a bfloat16 VAE or
    UNet (``compile_graph_fast``'s and ``fp8_compile``'s VAE, all of ``compile_graph_bf16``: ten lines of a cold
    compile's log). That function reads only the installed torch's version, so tracing it gives what the cache would:
    the warning is left out for it alone, and still shown for any other cached function a model calls."""
    warning = r"(?s)Dynamo detected a call to a `functools\.lru_cache`-wrapped function.*is_torch_version\("
    warnings.filterwarnings("ignore", warning, UserWarning)  # the same filter again replaces the first: none piles up
