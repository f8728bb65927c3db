"""Accelerators: each is one module here plus one YAML in conf/accelerator/.

An accelerator is a dataclass subclassing ``Accelerator``: its fields are its options, its methods say what
it does to a pipeline, and its class says what it wraps and where in a chain it must stand (``wraps``,
``stage``), so a chain is checked before any model is loaded. The YAML names it with ``_target_`` and sets
the options; ``build_accelerator`` checks them against the dataclass (an unknown key or a wrong type is
refused with the key's name), so adding one touches nothing else.
"""

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from runner.catalogue import Metric
from runner.config import ConfigError


@dataclass(frozen=True)
class Target:
    """What an accelerator works on, beyond the pipeline itself."""

    denoiser: str  # the pipeline attribute that runs once per denoising step (model.denoiser)
    device: torch.device
    dtype: torch.dtype
    cache_dir: Path  # where compiled artefacts may persist between processes (cache_dir=)
    shape_key: str  # names the job's model, task, size and dtype, for caches that hold one shape each
    # Calls the pipeline once per prompt given (once with the job's own prompt if none), with the job's other
    # arguments and seeds no timed call uses, for accelerators that calibrate on real activations (float8's
    # calibrated scales); None where there is no job (tests).
    calibration: Callable[[list[str]], None] | None = None


class Wraps(Enum):
    """What an accelerator puts its hands on."""

    IN_PLACE = "in place"  # changes modules where they are (hooks, fused weights); composes with anything
    DENOISER = "the denoiser"  # replaces the denoiser (or its step modules) with a wrapper of its own
    PIPELINE = "the whole pipeline"  # compiles the pipeline with its own runtime: runs alone, never chained


class Stage(IntEnum):
    """Where in a chain an accelerator that wraps the denoiser must stand: stages strictly in this order."""

    QUANTIZE = 1  # replaces the denoiser's layers by lower-precision ones (float8): before anything holds them
    RESTRUCTURE = 2  # changes how the denoiser runs (DeepCache splits the UNet into two paths)
    COMPILE = 3  # compiles the denoiser's code (torch.compile): needs Python modules to trace
    CAPTURE = 4  # records the denoiser's kernels for replay (CUDA graphs): nothing can change them after
    FEED = 5  # works out, once per call and outside the captured steps, what they read (text_kv's keys)


class Accelerator:
    """What every accelerator can do; the defaults do nothing. Runtime state is set in ``apply``, never
    declared as a field (fields are options)."""

    wraps: ClassVar[Wraps] = Wraps.IN_PLACE
    stage: ClassVar[Stage | None] = None  # None: anywhere in a chain
    first: ClassVar[bool] = False  # must be a chain's first part (it changes what every later part finds)
    catalogue: ClassVar[tuple[Metric, ...]] = ()  # metrics of its own (runner/catalogue.py)

    def check(self, device: torch.device) -> None:
        """Raise ConfigError (one line, with the fix) if this accelerator cannot run here."""

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ConfigError (one line, with the fix) if this accelerator cannot run a job in ``dtype``; checked
        with ``check``, before the model is loaded."""

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        """Change ``pipe`` in place; the runner's warmup calls pay for any compilation."""

    def warmed_up(self, pipe: DiffusionPipeline) -> None:
        """Called after the warmup calls, before timing (e.g. to save what compilation produced)."""

    def warmup_note(self) -> str:
        """Where the warmup's time went, in a few words for the job's log (e.g. a compile's stages); "" if
        nothing worth saying."""
        return ""

    def tags(self) -> dict[str, str]:
        """Facts about this run worth filtering on, e.g. whether a compile cache was hit."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Numbers only the accelerator can read, e.g. memory held outside PyTorch's allocator."""
        return {}


class DenoiserWrapper(torch.nn.Module):
    """Base of accelerators' wrappers around the denoiser: attributes the wrapper lacks come from the wrapped
    module, since pipelines read config, dtype and submodules from their denoiser."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


_NAMED_LIKE: dict[tuple[type, str], type] = {}


def named_like(cls: type, why: str, members: dict[str, Any]) -> type:
    """A subclass of ``cls`` holding ``members``, named like ``cls`` (its module and qualified name), so logs and
    saved configs name the class they always did; one per class and ``why``, for accelerators that change
    what an instance does by changing its class (``instance.__class__ = named_like(...)``)."""
    if (cls, why) not in _NAMED_LIKE:
        # named_like: why, for what must tell the class from ``cls`` though its name is the same (precompile's key).
        named = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "named_like": why}
        _NAMED_LIKE[cls, why] = type(cls.__name__, (cls,), members | named)
    return _NAMED_LIKE[cls, why]


def number_as_tensor(value: Any, module: torch.nn.Module) -> Any:
    """A Python number as a tensor on ``module``'s device, anything else as it is: a timestep given as a number
    would otherwise make every step a new input signature for a wrapper that keeps one per signature."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(value, device=next(module.parameters()).device)
    return value


def input_signature(flat: list[Any], spec: Any) -> tuple:
    """What tells one call's inputs from another's for a wrapper that keeps a captured or compiled version per
    input (``flat, spec = tree_flatten((args, kwargs))``): their structure, each tensor's shape, dtype, device
    and strides, any other value as written."""
    return (
        str(spec),
        *(
            (tuple(value.shape), str(value.dtype), str(value.device), value.stride())
            if isinstance(value, torch.Tensor)
            else repr(value)
            for value in flat
        ),
    )


def device_named(device: torch.device) -> str:
    """A device as a reason names it: a GPU by its name and compute capability, e.g. "NVIDIA L4 (compute
    capability 8.9)", anything else as "the cpu"."""
    if device.type != "cuda":
        return f"the {device.type}"
    capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return f"{torch.cuda.get_device_name(device)} (compute capability {capability})"


def require_triton(what: str, otherwise: str) -> None:
    """Raise ConfigError, naming ``what`` needs it and ``otherwise`` the fix that does without, where Triton does not
    import (it comes with torch's CUDA builds; this project's CPU machines have none)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"{what}: Triton is not installed ({error}); it comes with torch's CUDA builds (pip install triton), "
            f"or {otherwise}"
        ) from error


def build_accelerator(options: dict[str, Any], where: str = "accelerator") -> Accelerator:
    """Instantiate the accelerator named by ``options['_target_']`` with the other options, type-checked; errors
    name the options as ``where`` (a chain's part: ``accelerator.parts.6``)."""
    target = options["_target_"]
    cls = get_class(target)
    if not (isinstance(cls, type) and issubclass(cls, Accelerator)):
        raise ConfigError(f"{where}._target_={target}: not an accelerator (subclass runner.accelerators.Accelerator)")
    values = {key: value for key, value in options.items() if key != "_target_"}
    fields = {option.name: option for option in dataclasses.fields(cls)}
    for option in fields.values():
        value = values.get(option.name)
        if typing.get_origin(option.type) is list and value is not None and not isinstance(value, list | tuple):
            raise ConfigError(f"{where}.{option.name}={value}: takes a list, e.g. {where}.{option.name}=[{value}]")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(cls), values)
    except OmegaConfBaseException as error:
        first = str(error).splitlines()[0]
        key = getattr(error, "full_key", None) or "?"
        option = fields.get(key)
        if option is not None and option.default is not dataclasses.MISSING:  # the fix: what it takes
            kind = getattr(option.type, "__name__", str(option.type))
            default = OmegaConf.to_yaml({key: option.default}).split(": ", 1)[1].strip()  # as YAML writes it
            first += f"; it takes a value of type {kind}, by default {default}"
        raise ConfigError(f"{where}.{key}: {first}") from error
    return OmegaConf.to_object(typed)
