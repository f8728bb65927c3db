"""How long diffusers' device lookups take at each pipeline call for SDXL's and instruct-pix2pix's architectures
(built on the meta device: the modules, no weights), with and without device_once
(runner/accelerators/device_once.py). CPU work only: the GPU waits for it at the start of a call.

    python benchmarks/execution_device.py [ROUNDS]
"""

import json
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import get_module_execution_device

from runner.accelerators import Target
from runner.accelerators.device_once import DeviceOnceAccelerator
from runner.pipelines import build_random

META = torch.device("meta")


def ms(read, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        read()
        times.append(round((time.perf_counter() - began) * 1000, 3))
    return times


def lookups(cls: type, architecture: str, rounds: int) -> dict:
    pipe = build_random(cls, architecture, {}, 0, META, torch.float16)
    components = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    row = {
        "architecture": architecture,
        "modules": {name: sum(1 for _ in c.modules()) for name, c in components.items()},
    }
    row["execution_device_ms"] = ms(lambda: pipe._execution_device, rounds)
    # What device_once leaves: the pipelines ask this of each text encoder and of the VAE before they run.
    encoders = [components[name] for name in ("text_encoder", "text_encoder_2", "vae") if name in components]
    row["module_execution_device_ms"] = ms(lambda: [get_module_execution_device(m) for m in encoders], rounds)
    DeviceOnceAccelerator().apply(pipe, Target("unet", META, torch.float16, Path("/tmp"), ""))
    row["device_once_ms"] = ms(lambda: pipe._execution_device, rounds)
    return row


def main(rounds: int) -> None:
    for cls, architecture in [
        (StableDiffusionXLPipeline, "sdxl"),
        (StableDiffusionInstructPix2PixPipeline, "instruct_pix2pix"),
    ]:
        print(json.dumps(lookups(cls, architecture, rounds)), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
