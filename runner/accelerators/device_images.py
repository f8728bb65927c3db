"""The output images made 8-bit on the pipeline's device, not in NumPy on the host; image-to-image's input image
made floating-point there.

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

The input image of image-to-image goes the other way in diffusers: widened to float32 in NumPy on the host
(divided by 255, then ``2x - 1``), then sent to the GPU with a copy that waits for everything queued before it
(the prompt's encoding): 15.4 ms of host time for a 1024 px image on this project's CPU machine (3.3 ms at
512 px; BENCHMARKS.md, "image-to-image's input image on the device"), while the GPU has nothing queued after the
text encoders. Here the 8-bit pixels go to the device
from pinned memory without waiting, a quarter of the bytes, and each becomes the float32 value that diffusers'
own arithmetic gives its 8-bit value (a table of 256 made by diffusers' own functions, looked up on the
device): the same tensor, value for value and stride for stride. Only PIL images that diffusers would not
crop, resize or convert (their size a multiple of the VAE's scale factor, RGB); anything else takes diffusers'
own path. On an H200 it took 21-29 ms off a 1024 px image-to-image call in both orders on one start
(BENCHMARKS.md, "image-to-image's input image on a GPU").
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from runner.accelerators import Accelerator, Target, named_like
from runner.accelerators.host_ahead import sent_ahead
from runner.config import ConfigError


def _postprocess(
    self: VaeImageProcessor, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
) -> Any:
    if output_type != "pil" or image.ndim != 4 or image.shape[1] != 3:
        return super(type(self), self).postprocess(image, output_type, do_denormalize)
    image = self._denormalize_conditionally(image, do_denormalize)
    pixels = (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(one) for one in pixels]


def _preprocess(
    self: VaeImageProcessor,
    image: Any,
    height: int | None = None,
    width: int | None = None,
    resize_mode: str = "default",
    crops_coords: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    images = image if isinstance(image, list) else [image]
    if not (crops_coords is None and resize_mode == "default" and _as_they_are(self, images, height, width)):
        return super(type(self), self).preprocess(image, height, width, resize_mode, crops_coords)
    pixels = sent_ahead(torch.from_numpy(np.stack([np.asarray(one) for one in images])), self._runner_device)
    return _values(self, pixels.device)[pixels.long()].permute(0, 3, 1, 2)  # N, H, W, C: diffusers' strides


def _as_they_are(processor: VaeImageProcessor, images: list, height: int | None, width: int | None) -> bool:
    """Whether diffusers' preprocess would hand these images to NumPy unchanged: PIL RGB images it does not resize
    (or resizes to their own size: a copy), binarize or convert, all of one size."""
    config = processor.config
    if not images or config.do_binarize or config.do_convert_grayscale:
        return False
    if not all(isinstance(one, Image.Image) and one.mode == "RGB" and one.size == images[0].size for one in images):
        return False
    if config.do_resize:
        return processor.get_default_height_width(images[0], height, width) == images[0].size[::-1]
    return True


def _values(processor: VaeImageProcessor, device: torch.device) -> torch.Tensor:
    """Each 8-bit value as the float32 that diffusers' preprocess makes of it, on ``device`` (once per device)."""
    if device not in processor._runner_values:
        every = Image.fromarray(np.arange(256, dtype=np.uint8)[None, :])  # one row of every value, mode L
        values = processor.numpy_to_pt(processor.pil_to_numpy(every))
        if processor.config.do_normalize:
            values = processor.normalize(values)
        processor._runner_values[device] = values.flatten().to(device)
    return processor._runner_values[device]


@dataclass
class DeviceImagesAccelerator(Accelerator):
    # Image-to-image's input image made float32 on the device too; false: diffusers' own, to time against
    # (benchmarks/conf/accelerator/cg_fast_input_host.yaml).
    input_image: bool = True

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        processor = getattr(pipe, "image_processor", None)
        if not isinstance(processor, VaeImageProcessor):
            raise ConfigError(
                f"device_images: {type(pipe).__name__} has no VaeImageProcessor as its image_processor, so its "
                "images are made elsewhere; use an accelerator without DeviceImagesAccelerator among its parts, "
                "e.g. accelerator=compile_graph"
            )
        members = {"postprocess": _postprocess} | ({"preprocess": _preprocess} if self.input_image else {})
        processor.__class__ = named_like(type(processor), f"device_images {self.input_image}", members)
        processor._runner_device, processor._runner_values = target.device, {}
