"""The VAE's encoder and decoder in bfloat16, where diffusers would run SDXL's VAE in float32.

SDXL's VAE overflows float16 inside its decoder, so diffusers upcasts the whole VAE to float32 for every
decode (``force_upcast``): 81 ms of a 1024 px call on an H100, the largest piece after denoising
(BENCHMARKS.md, "Where a compile_graph call's time goes"). bfloat16 has float32's range, so it cannot
overflow there, at half float16's precision: the images change by rounding, which the quality metrics
measure against ``none``. Only the encoder and decoder (nearly all of the VAE's work) change dtype; their
inputs are cast on the way in and their outputs back to the pipeline's dtype on the way out, so the
pipeline sees the VAE it expects. In place: it composes with any chain (torch.compile traces the casts).
Offered as a part of ``compile_graph_fast``, where it was measured, not on its own.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target
from runner.config import ConfigError


@dataclass
class VaeBf16Accelerator(Accelerator):
    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        vae = getattr(pipe, "vae", None)
        if vae is None or not all(hasattr(vae, part) for part in ("encoder", "decoder")):
            raise ConfigError(
                f"the bfloat16 VAE (VaeBf16Accelerator): {type(pipe).__name__} has no VAE with an encoder and "
                "a decoder; use an accelerator without it, e.g. accelerator=compile_graph"
            )
        for part in (vae.encoder, vae.decoder):
            part.to(torch.bfloat16)
            part.register_forward_pre_hook(lambda module, args: _cast(args, torch.bfloat16))
            part.register_forward_hook(lambda module, args, output, back=target.dtype: _cast(output, back))
        # The VAE now reads as bfloat16 (its first parameter's dtype), and must not be upcast to float32.
        vae.register_to_config(force_upcast=False)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with its floating-point tensors in ``dtype`` (a tuple of arguments, or one tensor)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(item, dtype) for item in value)
    return value
