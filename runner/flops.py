"""FLOPs of one denoiser step, for ``achieved_tflops``: counted once per architecture, dtype and input shape.

The count runs torch's FlopCounterMode over a weightless meta copy of the denoiser, so it costs no device time
or memory, only Python: each operation's meta kernel, most of them for element-wise operations that hold no
FLOPs. Where the denoiser names its repeated blocks (diffusers' ``_repeated_blocks``: SDXL's 70 transformer
blocks come in two shapes), a block is run once per structure and input shape and its count reused for the
others, as the compile's regions are (runner/accelerators/torch_compile.py). Counts are kept in a JSON file
beside the compile caches.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode


def denoiser_flop_per_step(
    denoiser: torch.nn.Module, step_inputs: tuple[tuple, dict], cache: Path | None = None
) -> float:
    """FLOPs of one denoiser call with the recorded input shapes, counted on a weightless meta copy.

    The copy is built from the module's config (diffusers models); torch's FlopCounterMode counts matrix
    products, convolutions and attention (2 per MAC). The count depends only on the architecture, the dtype
    and the input shapes, so it is kept in the JSON file ``cache`` under a hash of those: a machine counts each
    shape once (SDXL's UNet: 0.2 s here, where running every block took 0.9-1.1 s on the CPU machine and
    1.2-2.6 s on our GPU hosts).
    """
    key = _flop_key(denoiser, step_inputs)
    known = _read_json(cache) if cache else {}
    if key not in known:
        known[key] = _count_flops(denoiser, step_inputs)
        if cache:
            _write_json(cache, {**_read_json(cache), key: known[key]})
    return float(known[key])


def _flop_key(denoiser: torch.nn.Module, step_inputs: tuple[tuple, dict]) -> str:
    def shape(value: Any) -> Any:
        return (tuple(value.shape), str(value.dtype)) if isinstance(value, torch.Tensor) else repr(value)

    # Without diffusers' bookkeeping (``_use_default_values`` lists keys from a set, in an order that differs
    # from process to process, so no later job's worker found a count in the file; ``_name_or_path``).
    settings = {key: value for key, value in dict(getattr(denoiser, "config", {})).items() if not key.startswith("_")}
    config = json.dumps(settings, sort_keys=True, default=repr)
    dtype = str(next(denoiser.parameters()).dtype)
    described = repr((type(denoiser).__qualname__, config, dtype, tree_map(shape, step_inputs)))
    return hashlib.sha256(described.encode()).hexdigest()[:32]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write whole or not at all (a rename), so a job reading at the same moment never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data, indent=0, sort_keys=True))
    partial.replace(path)


def _count_flops(denoiser: torch.nn.Module, step_inputs: tuple[tuple, dict]) -> float:
    with torch.device("meta"):
        copy = type(denoiser).from_config(denoiser.config)
    copy = copy.to(next(denoiser.parameters()).dtype)
    args, kwargs = step_inputs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reused = reuse_repeated_blocks(copy, counter)
        copy(*args, **kwargs)
    return float(counter.get_total_flops()) + reused.flops


@dataclass
class Reused:
    """FLOPs of the blocks that were not run again, and how many were not."""

    flops: int = 0
    blocks: int = 0


def reuse_repeated_blocks(copy: torch.nn.Module, counter: FlopCounterMode) -> Reused:
    """Make each of ``copy``'s repeated blocks (its class's ``_repeated_blocks``) run once per structure (its
    printed module tree: layers, sizes, norms) and input shapes: a later one with the same adds the first one's
    FLOPs (counted by ``counter``) to what this returns and gives back meta tensors shaped as its outputs were.
    ``copy`` is the count's own, whose forwards this replaces."""
    classes = set(getattr(copy, "_repeated_blocks", None) or ())
    reused = Reused()
    counted: dict[str, tuple[int, Any]] = {}

    def total() -> int:  # with what blocks nested in this one reused
        return counter.get_total_flops() + reused.flops

    def once(module: torch.nn.Module) -> None:
        forward, structure = module.forward, f"{type(module).__qualname__}\n{module}"

        def counted_once(*args: Any, **kwargs: Any) -> Any:
            key = repr((structure, tree_map(_shape_of, (args, kwargs))))
            if key in counted:
                flops, outputs = counted[key]
                reused.flops += flops
                reused.blocks += 1
                return tree_map(lambda value: value.empty() if isinstance(value, _Shape) else value, outputs)
            before = total()
            output = forward(*args, **kwargs)
            counted[key] = (total() - before, tree_map(_shape_of, output))
            return output

        module.forward = counted_once

    for module in copy.modules():
        if type(module).__name__ in classes:
            once(module)
    return reused


class _Shape:
    """A tensor's shape, strides and dtype: what a reused block's output is rebuilt from, and part of its key."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.size, self.stride, self.dtype = tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype

    def __repr__(self) -> str:
        return f"Shape{(self.size, self.stride, self.dtype)}"

    def empty(self) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device="meta")


def _shape_of(value: Any) -> Any:
    return _Shape(value) if isinstance(value, torch.Tensor) else value
