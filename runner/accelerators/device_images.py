"""The output images made 8-bit on the pipeline's device, not in NumPy on the host.

A diffusers pipeline that returns PIL images copies the decoded image to the host in its floating-point dtype,
widens it to float32 there, multiplies by 255, rounds and converts to 8 bits in NumPy, then hands PIL a
channels-last view whose copy is strided: for one 1024 px image on this project's CPU machine 6.0 ms of host
time after the VAE's last kernel (512 px: 1.6 ms), inside the timed call, the GPU idle throughout. Here the
same arithmetic (float32, times 255, rounding half to even, as NumPy does) runs on the device, the image is
laid out channels-last there, and the host receives a quarter of the bytes and copies them into PIL: 0.45 ms
(0.10 ms) on that machine. The pixels are the same, bit for bit. Every other output type, and a grey image,
take diffusers' own path. On an H200 host (``benchmarks/call_edges.py``, a float16 image from an idle GPU to
its PIL image): 16.0 ms against 1.3 ms at 1024 px, 6.0 ms against 0.55 ms at 512 px; in ``compile_graph_fast``
calls the decode phase took 43.1 ms against 52.6 ms at 1024 px (BENCHMARKS.md, "the host's work around the
steps"). Part of ``compile_graph_fast``, ``fp8_compile`` and ``deepcache_compile``.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError


def _postprocess(
    self: VaeImageProcessor, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
) -> Any:
    if output_type != "pil" or image.ndim != 4 or image.shape[1] != 3:
        return super(type(self), self).postprocess(image, output_type, do_denormalize)
    image = self._denormalize_conditionally(image, do_denormalize)
    pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(one) for one in pixels]


@dataclass
class DeviceImagesAccelerator(Accelerator):
    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        processor = getattr(pipe, "image_processor", None)
        if not isinstance(processor, VaeImageProcessor):
            raise ConfigError(
                f"device_images: {type(pipe).__name__} has no VaeImageProcessor as its image_processor, so its "
                "images are made elsewhere; use an accelerator without DeviceImagesAccelerator among its parts, "
                "e.g. accelerator=compile_graph"
            )
        processor.__class__ = named_like(type(processor), "device_images", {"postprocess": _postprocess})
