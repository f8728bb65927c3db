"""Precompiled modules: what Dynamo traced, with the code inductor made from it, saved to disk by the first
process and loaded by later ones, which then trace nothing.

torch_compile's caches keep inductor's generated code, but every new process still has Dynamo trace the
UNet's Python again and build its guards: 15-21 s of a 20-28 s warm start on an H100 (BENCHMARKS.md,
"Faster still, continued"). torch's ``aot_compile`` (experimental; ``torch._dynamo.config.enable_aot_compile``)
traces a whole graph once for given inputs and serialises the result; ``torch.compiler.load_compiled_function``
brings it back. ``torch_compile``'s option ``precompile`` wraps the denoiser and the VAE decoder in
``PrecompiledModule``: on the first call with a given input signature it loads
``cache_dir/precompiled/<name>-<key>.bin`` or, if there is none, compiles and writes it. The saved function
holds code, not weights: it is called with the module and reads the module's own parameters, so one file
serves every checkpoint of an architecture. Its key digests what the traced code depends on: the module's
structure (its ``repr``, attention processors, and the forwards accelerators put in with the plain values their
modules hold), its weights' shapes,
dtypes and strides, the input signature, grad mode, the compile backend, the torch and diffusers versions and
the device, so a change to any of them compiles anew.

No guards are saved: torch 2.11 cannot read back some it writes (a guard on a function's default argument
fails to unpickle: ``DefaultsSource.__init__() takes from 3 to 4 positional arguments``, on our H100), and
others cannot be written at all (object identities, such as diffusers' attention processor's ``__call__``).
The wrapper checks instead, on every call, what the saved code was made for: the key above, and the input
signature (shapes, dtypes, strides, devices, other arguments' values), grad mode, training mode and the
weights' dtypes, each combination with its own function. Its tensor inputs are made contiguous first, so one
function serves callers that hand the same values in other layouts (image-to-image's channels_last latents).
"""

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch.utils._pytree import tree_flatten, tree_map

from runner.accelerators import DenoiserWrapper, input_signature, number_as_tensor
from runner.errors import RunnerError


def call_module(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What is compiled: the module called with the inputs (a plain function, which pickles by name where a
    diffusers ``forward`` wrapped by a decorator does not)."""
    return module(*args, **kwargs)


def put_in(module: torch.nn.Module) -> list[str]:
    """What accelerators put into ``module``, for the key: their modules' forwards, and the classes they changed
    with ``named_like``, which keep their names and so their repr."""
    found = set()
    for part in module.modules():
        forward, why = type(part).forward, getattr(part, "named_like", "")
        if forward.__module__.startswith("runner.") or why:
            found.add(f"{type(part).__name__}:{forward.__module__}.{forward.__qualname__}:{why}:{settings(part)}")
    return sorted(found)


def settings(part: torch.nn.Module) -> str:
    """The plain values an accelerator's module holds (flags, sizes, names), which its forward may branch on
    where its repr does not show them: float8's ``fast_accumulation`` once shared a key with its absence, and a
    saved function made without it ran in its place (BENCHMARKS.md, "Float8's fast accumulation")."""
    plain = (bool, int, float, str)
    return repr(sorted((name, value) for name, value in vars(part).items() if type(value) in plain and name[0] != "_"))


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def no_guards(entries: list) -> list[bool]:
    """torch.compile's ``guard_filter_fn``: keep none (the module docstring says why, and what checks instead)."""
    return [False] * len(entries)


class PrecompiledModule(DenoiserWrapper):
    """Wraps a module so that its calls run a precompiled function, loaded or compiled on first use of each
    input signature."""

    def __init__(
        self, module: torch.nn.Module, folder: Path, name: str, backend: str = "inductor", settings: dict | None = None
    ) -> None:
        super().__init__(module)
        self.folder, self.name, self.backend = folder, name, backend
        self.settings = dict(settings or {})  # inductor's settings for the compile (torch_compile's inductor)
        self.loaded: dict[tuple, Any] = {}
        self.cache_events: list[str] = []  # "hit" or "miss", one per signature
        self.seconds = {"compile": 0.0, "load": 0.0}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Tensors in one layout, whatever the caller's: a saved function is made for its inputs' strides, and
        # image-to-image's latents come from a channels_last VAE in channels_last strides where text-to-image's
        # are contiguous, so a sweep of both tasks compiled the same UNet twice per size. A no-op for a
        # contiguous tensor (cuda_graph's static inputs are made contiguous, so a graph holds no extra copy).
        args = tuple(_contiguous(number_as_tensor(value, self.module)) for value in args)
        kwargs = tree_map(_contiguous, kwargs)
        flat, spec = tree_flatten((args, kwargs))
        # The weights' dtypes too: diffusers casts SDXL's VAE to float32 for each decode and back.
        dtypes = tuple(sorted({str(weight.dtype) for weight in self.module.parameters()}))
        modes = (torch.is_grad_enabled(), self.module.training)
        signature = (*input_signature(flat, spec), dtypes, modes)
        function = self.loaded.get(signature)
        if function is None:
            function = self.loaded[signature] = self._prepare(args, kwargs, signature)
        return function(self.module, *args, **kwargs)

    def path(self, signature: tuple) -> Path:
        device = next(self.module.parameters()).device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        weights = [
            (name, tuple(tensor.shape), str(tensor.dtype), tensor.stride())
            for name, tensor in [*self.module.named_parameters(), *self.module.named_buffers()]
        ]
        processors = sorted(
            f"{name}:{type(module.processor).__name__}"
            for name, module in self.module.named_modules()
            if hasattr(module, "processor")
        )
        ours = put_in(self.module)
        versions = (torch.__version__, diffusers.__version__)
        compiler = (self.backend, sorted(self.settings.items())) if self.settings else self.backend  # old keys hold
        structure = (repr(self.module), ours) if ours else repr(self.module)
        key = repr((structure, processors, weights, signature, compiler, versions, where))
        return self.folder / f"{self.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"

    def _prepare(self, args: tuple, kwargs: dict, signature: tuple) -> Any:
        path = self.path(signature)
        began = time.perf_counter()
        with torch._dynamo.config.patch(enable_aot_compile=True):
            if path.exists():
                self.cache_events.append("hit")
                try:
                    with path.open("rb") as file:
                        function = torch.compiler.load_compiled_function(file)
                except Exception as error:  # what torch raises on a file it cannot read back varies
                    raise RunnerError(
                        f"torch_compile's precompile: {path} could not be loaded ({type(error).__name__}: {error}); "
                        "delete it to compile anew"
                    ) from error
                self.seconds["load"] += time.perf_counter() - began
                return function
            self.cache_events.append("miss")
            compiled = torch.compile(
                call_module,
                fullgraph=True,  # one graph or none: a saved function cannot fall back to Python midway
                dynamic=False,
                backend=self.backend,
                options={"guard_filter_fn": no_guards, **self.settings},
            )
            function = compiled.aot_compile(((self.module, *args), kwargs))
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
            function.save_compiled_function(str(partial))
            partial.replace(path)  # whole or absent: a process stopped mid-write leaves no file behind
        self.seconds["compile"] += time.perf_counter() - began
        return function
