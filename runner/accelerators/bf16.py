"""The whole pipeline in bfloat16 where the job asked for float16: the denoiser, the text encoders and the VAE.

bfloat16 has float32's range and 8 bits of mantissa against float16's 11: its products round more coarsely,
and the images change by rounding, which the quality metrics measure against ``none`` (the job's float16
pipeline). Why it is there at all: on an H200 at 1024 px, ``compile_graph_bf16`` took 0.9497 and 0.9512 s a
call against ``compile_graph_fast``'s 0.9757 and 0.9768 s in both orders on one machine start, the compiled
UNet at its 700 W power limit in both, its images SSIM 0.9995 (48.7 dB) from ``none``'s (BENCHMARKS.md, "The
whole pipeline in bfloat16"); 0.9396-0.9400 s against 0.9667-0.9683 s on another start. At 512 px, where the GPU
stays under its power limit, it took 1.1-1.2% longer than ``compile_graph_fast`` while drawing 5-7% less power, so
what it gains at 1024 px is, by inference (no kernel profile), the power it saves under the cap
("``compile_graph_bf16`` at both sizes"). With ``compile_graph_fast``'s layout parts after it (today's
``compile_graph_bf16``), 0.9245-0.9278 s against ``compile_graph_fast``'s 0.9529-0.9566 s on a third H200 start
("``compile_graph_bf16`` with the layout parts"), and 0.9390-0.9434 s against 0.9614-0.9665 s on an H100 start
("``compile_graph_bf16`` on an H100").

In place and first in its chain, so every part after it finds bfloat16 modules. The VAE is no longer upcast to
float32 (bfloat16 cannot overflow where float16 does), and its decoder hands the pipeline float16, as
``vae_bf16`` does, so the images are made 8-bit from the precision they would have in a float16 pipeline.
What this says about a real checkpoint: only that bfloat16 rounding moves these random-weight images by SSIM
0.0005; a trained model's images may move more or less, so judge it on the checkpoint, with its CLIP score.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from runner.accelerators import Accelerator, Target
from runner.config import ConfigError


@dataclass
class Bf16Accelerator(Accelerator):
    first: ClassVar[bool] = True  # before anything compiles, captures or quantises the float16 modules

    def check_dtype(self, dtype: torch.dtype) -> None:
        if dtype != torch.float16:
            raise ConfigError(
                f"the bfloat16 pipeline (Bf16Accelerator) converts a float16 job, and this one runs in "
                f"{str(dtype).removeprefix('torch.')}: run it with dtype=fp16 (on a GPU, the default), or use "
                "dtype=bf16 with another accelerator"
            )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        self.check_dtype(target.dtype)  # checked before loading too: this holds where apply is called directly
        # diffusers warns on every model cast with .to(dtype) that it keeps no float32 modules: it lists none here
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            pipe.to(dtype=torch.bfloat16)
        finally:
            diffusers_logging.set_verbosity(level)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            vae.register_to_config(force_upcast=False)  # else image-to-image moves it to float32 at each call
            decoder = getattr(vae, "decoder", None)
            if decoder is not None:
                decoder.register_forward_hook(lambda module, args, output: output.to(torch.float16))
