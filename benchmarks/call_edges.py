"""What an SDXL call does around its denoising steps while the GPU waits, each way the runner can do it:

- text_kv's fill of the cross-attentions' keys and values from the text (runner/accelerators/text_kv.py), one
  product per projection as it was, and batched (one product per width of the transformer blocks), with the
  projections fused (compile_graph_fast's 70) and not (140);
- the output image's conversion to PIL: diffusers' own (to the host, then NumPy) and device_images'
  (runner/accelerators/device_images.py), at 512 and 1024 px;
- image-to-image's input image made the float16 tensor the pipeline's VAE encodes: diffusers' own (float32 in
  NumPy, then a copy to the device) and device_images' (the 8-bit pixels to the device, made float32 there), at
  512 and 1024 px.

Each is timed from an idle, synchronised GPU to the end of its work (as in a call, where the GPU waits for
it), ROUNDS times; the median and the extremes are printed as JSON lines, milliseconds. It runs on the CPU
where there is no GPU (PARTS: which of fill, images, input_images; all by default).

    python benchmarks/call_edges.py [ROUNDS] [PARTS]      e.g. ... 50 input_images
"""

import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from runner.accelerators import Target
from runner.accelerators.device_images import DeviceImagesAccelerator
from runner.accelerators.text_kv import TextKeysOnceAccelerator
from runner.measure import synchronize
from runner.pipelines import build_random


def timed(work, rounds: int, device: torch.device) -> dict:
    times = []
    for _ in range(rounds + 3):  # the first three warm up (allocations, cuBLAS's handles)
        synchronize(device)
        began = time.perf_counter()
        work()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000)
    times = times[3:]
    return {
        name: round(value, 3)
        for name, value in (("median_ms", statistics.median(times)), ("min_ms", min(times)), ("max_ms", max(times)))
    }


def fill(fused: bool, device: torch.device, rounds: int) -> dict:
    pipe = build_random(StableDiffusionXLPipeline, "sdxl", {}, 0, device, torch.float16)
    if fused:
        pipe.fuse_qkv_projections()
    holder = types.SimpleNamespace(unet=pipe.unet)
    TextKeysOnceAccelerator().apply(holder, Target("unet", device, torch.float16, Path("/tmp"), ""))
    wrapped = holder.unet
    text = torch.randn(2, 77, 2048, device=device, dtype=torch.float16)  # the prompt and the negative one
    one_by_one = timed(lambda: [projection.fill(text) for projection in wrapped.projections], rounds, device)
    batched = timed(lambda: [filler.fill(text) for filler in wrapped.fillers], rounds, device)
    for projection in wrapped.projections:  # both ways hold the same keys (up to the products' rounding)
        torch.testing.assert_close(projection(text), projection.projection(text), rtol=2e-3, atol=2e-3)
    row = {"fill": "fused" if fused else "unfused", "projections": len(wrapped.projections)}
    return row | {"products": len(wrapped.fillers), "one_by_one": one_by_one, "batched": batched}


def images(size: int, device: torch.device, rounds: int) -> dict:
    stock = VaeImageProcessor(vae_scale_factor=8)
    holder = types.SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=8))
    DeviceImagesAccelerator().apply(holder, Target("unet", device, torch.float16, Path("/tmp"), ""))
    decoded = torch.rand(1, 3, size, size, device=device, dtype=torch.float16) * 2 - 1
    row = {"images": size}
    for name, processor in (("diffusers", stock), ("device_images", holder.image_processor)):
        row[name] = timed(lambda processor=processor: processor.postprocess(decoded, "pil"), rounds, device)
    return row


def input_images(size: int, device: torch.device, rounds: int) -> dict:
    stock = VaeImageProcessor(vae_scale_factor=8)
    holder = types.SimpleNamespace(image_processor=VaeImageProcessor(vae_scale_factor=8))
    DeviceImagesAccelerator().apply(holder, Target("unet", device, torch.float16, Path("/tmp"), ""))
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8))
    row = {"input_images": size}
    for name, processor in (("diffusers", stock), ("device_images", holder.image_processor)):
        row[name] = timed(
            lambda processor=processor: processor.preprocess(image).to(device, torch.float16), rounds, device
        )
    assert torch.equal(stock.preprocess(image).to(device), holder.image_processor.preprocess(image))
    return row


def main(rounds: int, parts: list[str]) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: to try the script
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}))
    if "fill" in parts:
        for fused in (True, False):
            print(json.dumps(fill(fused, device, rounds)), flush=True)
    for part, measure in (("images", images), ("input_images", input_images)):
        if part in parts:
            for size in (512, 1024):
                print(json.dumps(measure(size, device, rounds)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 50, sys.argv[2:] or ["fill", "images", "input_images"])
