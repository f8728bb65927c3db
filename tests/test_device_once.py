"""device_once: the pipeline's execution device is looked up once, when applied, not at every call; the images
stay the same, the pipeline keeps its class's name, and an offloaded pipeline is refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
DEVICE_ONCE = {"_target_": "runner.accelerators.device_once.DeviceOnceAccelerator"}


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the walks of diffusers' own ``_execution_device``."""
    walks: list[int] = []
    original = DiffusionPipeline._execution_device

    def counted(self: DiffusionPipeline) -> torch.device:
        walks.append(1)
        return original.fget(self)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counted))
    return walks


def target(tmp_path: Path) -> Target:
    return Target("unet", CPU, torch.float32, tmp_path, "tiny-random-64x64-fp32")


@pytest.mark.parametrize(
    ("model", "task", "call"),
    [
        ("tiny_sdxl", "t2i", {"height": 64, "width": 64}),
        ("tiny_pix2pix", "i2i", {"image": Image.new("RGB", (64, 64), (90, 140, 200))}),
    ],
)
def test_same_images_without_a_lookup_per_call(tmp_path: Path, lookups: list[int], model: str, task: str, call: dict):
    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(3)
        return pipe("a red bicycle", num_inference_steps=2, output_type="np", generator=generator, **call).images

    expected = images(build_pipeline(load_model(model), task, CPU, torch.float32))
    assert lookups, "diffusers looks the device up in every call"
    pipe = build_pipeline(load_model(model), task, CPU, torch.float32)
    cls = type(pipe)
    build_accelerator(DEVICE_ONCE).apply(pipe, target(tmp_path))
    lookups.clear()
    np.testing.assert_array_equal(images(pipe), expected)
    np.testing.assert_array_equal(images(pipe), expected)
    assert lookups == []
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__ and pipe._execution_device == CPU


def test_one_subclass_per_pipeline_class(tmp_path: Path) -> None:
    pipes = [build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32) for _ in range(2)]
    for pipe in pipes:
        build_accelerator(DEVICE_ONCE).apply(pipe, target(tmp_path))
    assert type(pipes[0]) is type(pipes[1]) and type(pipes[0]).__bases__ == (StableDiffusionXLPipeline,)


def test_an_offloaded_pipeline_is_refused(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    pipe.text_encoder_2.text_model.encoder._hf_hook = object()  # as accelerate's offloading leaves it
    refusal = r"^device_once: the pipeline's text_encoder_2 is offloaded .*e\.g\. accelerator=compile_graph$"
    with pytest.raises(ConfigError, match=refusal):
        build_accelerator(DEVICE_ONCE).apply(pipe, target(tmp_path))
    assert type(pipe) is StableDiffusionXLPipeline


def test_last_in_a_chain_with_device_images_as_the_fast_accelerators_hold_them(
    tmp_path: Path, lookups: list[int]
) -> None:
    """compile_graph_fast, fp8_compile and deepcache_compile end with device_once and device_images, after a part
    that wraps the denoiser (text_kv here: the graphs need CUDA): the same PIL images, no lookup per call."""

    def images(pipe: DiffusionPipeline) -> list[np.ndarray]:
        generator = torch.Generator(CPU).manual_seed(5)
        output = pipe("a red bicycle", num_inference_steps=2, height=64, width=64, generator=generator)
        return [np.asarray(image) for image in output.images]

    expected = images(build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32))
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    text_kv = {"_target_": "runner.accelerators.text_kv.TextKeysOnceAccelerator"}
    device_images = {"_target_": "runner.accelerators.device_images.DeviceImagesAccelerator"}
    chain = Chain(parts=[text_kv, DEVICE_ONCE, device_images])
    chain.check(CPU)
    chain.apply(pipe, target(tmp_path))
    lookups.clear()
    np.testing.assert_array_equal(images(pipe), expected)
    assert lookups == [] and pipe.unet.fills == 1
