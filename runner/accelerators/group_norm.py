"""Group norms computed in their input's own memory layout, so a compiler keeps channels_last tensors channels_last.

torch's decomposition of a group norm on a GPU (``torch._refs.native_group_norm``, which inductor lowers) reshapes its
input to (images, groups, channels per group, pixels) and normalises that view: a channels_last input cannot be
viewed so, and inductor copies it to the channel-first layout somewhere between the tensor that makes it and the
convolution after the norm, which wants channels_last again. In a 1024 px ``compile_graph_fast`` call on an H100
the VAE's norm statistics read at 112-400 GB/s, and the passes of the UNet's norms after its up blocks'
concatenations at 475-713 GB/s (BENCHMARKS.md, "Group norms across layouts").

Measured on an H100 ("Float8 on the attention's products and group norms in their layout, on a GPU"): 11.5-12.1 ms
less a 1024 px ``compile_graph_fast`` call in both orders, all of it in the VAE's decode (40.5-42.3 to 28.0-29.6 ms),
the same images; the UNet's norms after a concatenation ran as slowly as before (inductor fuses the concatenation into
them and, by inference, reads a skip connection made channel-first: diffusers' transformer models copy their output
so, which ``transformer_layout`` leaves out, to little effect on a GPU; BENCHMARKS.md, "The transformers' outputs in
their input's layout").

Here each ``nn.GroupNorm`` of the denoiser (and, with ``vae``, of the VAE) computes every channel's mean and variance
over its pixels, a reduction that reads the input in whatever layout it has; combines them into each group's (the law
of total variance: a group's channels have as many pixels each); and scales and shifts the input by image and channel,
element by element, in its own layout. Nothing reshapes the input. The arithmetic is float32 throughout, as torch's
kernels; the rounding differs (the variance is combined from the channels'), so images agree up to rounding. A norm
of an input without pixels (two dimensions) runs torch's own. Meant to be compiled: run eagerly, each norm holds a
float32 copy of its input for a moment, where torch's kernel holds none.

With ``pin_layout``, a norm whose input is channels_last (as eager lays it out) pins that layout for inductor while it
is traced (``pinned_forward``): on an H100 inductor wrote the concatenation before an up block's norm channel-first
even with the skip connections channels_last (``transformer_layout``); with the norms pinned as well, the tiny SDXL
UNet compiled on an H100 allocates no image buffer channel-first (its GPU test passed there). Measured with
``transformer_layout`` on one H100 start, in both orders (BENCHMARKS.md, "Group norms pinned to their layout"):
``compile_graph_fast`` 0.337 s against 0.347-0.350 s at 512 px, 15-19 ms less denoising at 1024 px than with the norms
unpinned; ``fp8_compile`` 0.303 against 0.306 s at 512 px. Both accelerators now hold it: on another H100 start
``compile_graph_fast`` took 30 ms less at 1024 px than before (0.960-0.963 s against 0.990-0.994 s), and 26-30 ms less
for image-to-image, 4.5 ms of it in the VAE's encoder ("compile_graph_fast and fp8_compile as promoted").
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError


def group_norm_in_layout(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``F.group_norm(x, groups, weight, bias, eps)`` with no reshape of ``x``: per-channel statistics combined into
    each group's, then one scale and one shift per image and channel applied to ``x`` where it lies."""
    images, channels = x.shape[:2]
    pixels = tuple(range(2, x.ndim))
    wide = x.float()
    variance, mean = torch.var_mean(wide, dim=pixels, unbiased=False)  # (images, channels)
    mean, variance = mean.view(images, groups, -1), variance.view(images, groups, -1)
    group_mean = mean.mean(-1, keepdim=True)
    group_variance = (variance + (mean - group_mean).square()).mean(-1, keepdim=True)
    scale = torch.rsqrt(group_variance + eps).expand_as(mean)  # (images, groups, channels per group)
    if weight is not None:
        scale = scale * weight.float().view(1, groups, -1)
    shift = -group_mean * scale
    if bias is not None:
        shift = shift + bias.float().view(1, groups, -1)
    shape = (images, channels) + (1,) * len(pixels)
    return (wide * scale.reshape(shape) + shift.reshape(shape)).to(x.dtype)


def in_layout_forward(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    if x.ndim < 3:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return group_norm_in_layout(x, self.num_groups, self.weight, self.bias, self.eps)


def pinned_forward(self: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``in_layout_forward`` with a channels_last input pinned so while a compiler traces it: inductor then writes the
    tensor (a concatenation, say) in that layout, where it may otherwise choose channel-first and have the norm read it
    across (inductor's ``prims.inductor_force_stride_order``, which costs nothing where the layout is already so)."""
    if torch.compiler.is_compiling() and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
    return in_layout_forward(self, x)


def swap_group_norms(model: torch.nn.Module, pin_layout: bool = False) -> int:
    """Every ``nn.GroupNorm`` of ``model`` computed in its input's layout (a class named like its own), its input's
    layout pinned where ``pin_layout``; how many."""
    why, forward = ("group_norm_pinned", pinned_forward) if pin_layout else ("group_norm_in_layout", in_layout_forward)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.GroupNorm)]
    for norm in norms:
        norm.__class__ = named_like(type(norm), why, {"forward": forward})
    return len(norms)


@dataclass
class GroupNormInLayoutAccelerator(Accelerator):
    vae: bool = True  # the VAE's group norms too (its decoder's, and its encoder's for image-to-image)
    # a channels_last input pinned so for the compiler (pinned_forward); compile_graph_fast and fp8_compile set it
    pin_layout: bool = False

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        self.swapped = swap_group_norms(denoiser, self.pin_layout)  # state, not an option
        if not self.swapped:
            raise ConfigError(
                f"group_norm: {type(denoiser).__name__} has no group norm (torch.nn.GroupNorm) to compute in its "
                "input's layout; use an accelerator without GroupNormInLayoutAccelerator among its parts"
            )
        if self.vae:
            self.swapped += swap_group_norms(pipe.vae, self.pin_layout)

    def tags(self) -> dict[str, str]:
        swapped = getattr(self, "swapped", None)
        return {} if swapped is None else {"group_norms_in_layout": str(swapped)}
