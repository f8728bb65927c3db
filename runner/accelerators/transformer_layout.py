"""The denoiser's transformer models hand back their output in their input's memory layout, so a channels_last UNet
stays channels_last through its skip connections.

diffusers' ``Transformer2DModel`` ends by viewing its tokens as an image, ``permute(0, 3, 1, 2).contiguous()``: a copy
to the channel-first layout, whatever the layout of the UNet around it; the residual added to it keeps that layout.
Those outputs are the skip connections of SDXL's cross-attention blocks, concatenated in the up blocks with the
channels_last tensors coming up, and ``torch.cat`` of tensors in two layouts is channel-first in eager (and, by
inference from its kernels' names, in what inductor compiles for the GPU, whose up-block norms then transpose it back
to channels_last for their convolution). In a 1024 px ``compile_graph_fast`` call on an H100 those norm passes ran at
475-713 GB/s where the ones after a convolution ran at 1.7-2.5 TB/s (BENCHMARKS.md, "Group norms across layouts"),
and in a later profile with ``group_norm`` kernels named after the copy read them
(``..._add_cat_clone_convolution_div_permute_silu_var_mean_...``, "Float8 on the attention's products and group norms
in their layout, on a GPU").

Here each ``Transformer2DModel`` with continuous (image) inputs views its tokens as an image without the copy: the
permuted view of (images, height, width, channels) is channels_last already, and the residual added to it is
channels_last in a channels_last UNet. With linear projections (SDXL) the arithmetic is the same, in the same order,
so the numbers are the same; only where they lie changes. Where a 1x1 convolution projects the image (SD 1.5's
instruct-pix2pix) it reads the view instead of the copy, and may round differently. Meant for a UNet made
channels_last (``torch_compile``'s ``channels_last``), and compiled.

What it does and does not do (BENCHMARKS.md, "The transformers' outputs in their input's layout", one H100 start):
eagerly, and in the code inductor generates for the CPU, every concatenation of the tiny SDXL UNet is channels_last
with it (one is channel-first without). On the GPU inductor computes a concatenation inside the element-wise kernels
that read it and still wrote one channel-first in the tiny UNet, with torch's norms or ``group_norm``'s; with
``group_norm``'s ``pin_layout`` too, none (a GPU test, passed on an H100). A whole 1024 px call: nothing off
``fp8_compile`` (+0.5 and -2.0 ms in the two orders), 3.4-3.8 ms off ``cg_fast_group_norm`` in both orders, the same
images; with the norms pinned, 15-19 ms less denoising than without the pin, and 0.337 s against 0.347-0.350 s at 512
px for ``compile_graph_fast`` ("Group norms pinned to their layout"). ``compile_graph_fast`` and ``fp8_compile`` hold
both.
"""

from dataclasses import dataclass

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError


def output_in_layout(
    self: Transformer2DModel,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    batch_size: int,
    height: int,
    width: int,
    inner_dim: int,
) -> torch.Tensor:
    """diffusers' ``Transformer2DModel._get_output_for_continuous_inputs`` without its ``.contiguous()``."""
    if not self.use_linear_projection:  # a 1x1 convolution projects the image
        return self.proj_out(hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)) + residual
    hidden_states = self.proj_out(hidden_states)
    return hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2) + residual


def swap_transformer_outputs(model: torch.nn.Module) -> int:
    """Every ``Transformer2DModel`` of ``model`` with image inputs hands its output back in its input's layout (a class
    named like its own); how many."""
    if not hasattr(Transformer2DModel, "_get_output_for_continuous_inputs"):  # the method this replaces
        raise ConfigError(
            f"transformer_layout: diffusers {diffusers.__version__}'s Transformer2DModel has no "
            "_get_output_for_continuous_inputs to replace (written for diffusers 0.42); use an accelerator without "
            "TransformerOutputInLayoutAccelerator among its parts"
        )
    transformers = [m for m in model.modules() if isinstance(m, Transformer2DModel) and m.is_input_continuous]
    for transformer in transformers:
        members = {"_get_output_for_continuous_inputs": output_in_layout}
        transformer.__class__ = named_like(type(transformer), "transformer_output_in_layout", members)
    return len(transformers)


@dataclass
class TransformerOutputInLayoutAccelerator(Accelerator):
    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        self.swapped = swap_transformer_outputs(denoiser)  # state, not an option
        if not self.swapped:
            raise ConfigError(
                f"transformer_layout: {type(denoiser).__name__} has no transformer model over an image "
                "(diffusers' Transformer2DModel) whose output's layout to keep; use an accelerator without "
                "TransformerOutputInLayoutAccelerator among its parts"
            )

    def tags(self) -> dict[str, str]:
        swapped = getattr(self, "swapped", None)
        return {} if swapped is None else {"transformer_outputs_in_layout": str(swapped)}
