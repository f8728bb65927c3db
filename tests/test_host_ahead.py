"""host_ahead: the scheduler's schedule made on the host and SDXL's time ids sent to the GPU without the host
waiting, with the same values and images as diffusers' own, any scheduler keeping its split between host and
device."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.config import ConfigError
from runner.errors import RunnerError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
HOST_AHEAD = {"_target_": "runner.accelerators.host_ahead.HostAheadAccelerator"}
PROMPT_GRAPH = {"_target_": "runner.accelerators.prompt_graph.PromptGraphAccelerator"}
SCHEDULERS = [
    EulerDiscreteScheduler,  # SDXL base's
    DPMSolverMultistepScheduler,  # RealVisXL V4.0's
    DPMSolverSinglestepScheduler,  # its Lightning's
    EulerAncestralDiscreteScheduler,  # instruct-pix2pix's
]


def target(tmp_path: Path, device: torch.device = CPU) -> Target:
    return Target("unet", device, torch.float32, tmp_path, "tiny-random-64x64-fp32")


def sdxl(task: str = "t2i", device: torch.device = CPU) -> DiffusionPipeline:
    return build_pipeline(load_model("tiny_sdxl"), task, device, torch.float32)


def tensors(scheduler) -> dict[str, torch.Tensor]:
    return {name: value for name, value in vars(scheduler).items() if isinstance(value, torch.Tensor)}


def test_what_diffusers_leaves_on_the_device_is_learnt_from_its_first_call(tmp_path: Path) -> None:
    """DDIM puts only its timesteps on the device asked for; the meta device stands in for a GPU, which the
    CPU machine has not: later calls make the schedule on the host and send just that."""
    meta = torch.device("meta")
    pipe = sdxl()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    accelerator = build_accelerator(HOST_AHEAD)
    accelerator.apply(pipe, target(tmp_path, meta))
    on_host: list[str] = []
    original = DDIMScheduler.set_timesteps
    DDIMScheduler.set_timesteps = lambda self, *args, **kwargs: (
        on_host.append(kwargs["device"]) or original(self, *args, **kwargs)
    )
    try:
        for steps in (4, 6):
            pipe.scheduler.set_timesteps(steps, device=meta)
            devices = {name: value.device.type for name, value in tensors(pipe.scheduler).items()}
            assert devices["timesteps"] == "meta" and {d for n, d in devices.items() if n != "timesteps"} == {"cpu"}
            assert pipe.scheduler.timesteps.shape == (steps,)
    finally:
        DDIMScheduler.set_timesteps = original
    assert on_host == [meta, "cpu", "cpu"]  # the first call diffusers' own, then on the host; later on the host only
    assert accelerator.tags() == {"host_ahead": "DDIMScheduler.timesteps, time ids", "host_ahead_calls": "2"}
    pipe.scheduler.set_timesteps(3)  # no device: diffusers' own, untouched
    assert pipe.scheduler.timesteps.device == CPU


@pytest.mark.parametrize(
    ("task", "call"),
    [
        ("t2i", {"height": 64, "width": 64}),
        ("i2i", {"image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 0.6}),
    ],
)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_same_images(tmp_path: Path, task: str, call: dict, scheduler: type) -> None:
    def with_scheduler() -> DiffusionPipeline:
        pipe = sdxl(task)
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        return pipe

    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(3)
        return pipe("a red bicycle", num_inference_steps=4, output_type="np", generator=generator, **call).images

    expected = images(with_scheduler())
    pipe = with_scheduler()
    accelerator = build_accelerator(HOST_AHEAD)
    accelerator.apply(pipe, target(tmp_path))
    for _ in range(2):  # diffusers' own first, then on the host
        np.testing.assert_array_equal(images(pipe), expected)
    assert type(pipe).__name__ == type(sdxl(task)).__name__ and type(pipe.scheduler).__name__ == scheduler.__name__
    assert accelerator.tags()["host_ahead"].endswith("time ids") and accelerator.tags()["host_ahead_calls"] == "2"


def test_beside_prompt_graph_each_keeps_its_own(tmp_path: Path) -> None:
    """Both change the pipeline's class: chained, each calls the class it was given, not the other's."""

    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(5)
        call = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np", "generator": generator}
        return pipe("a red bicycle", **call).images

    expected = images(sdxl())
    pipe = sdxl()
    chain = Chain(parts=[HOST_AHEAD, PROMPT_GRAPH])
    chain.check(CPU)
    chain.apply(pipe, target(tmp_path))
    for _ in range(2):
        np.testing.assert_array_equal(images(pipe), expected)
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_after_deepcache_the_schedule_is_still_made_on_the_host(tmp_path: Path) -> None:
    """DeepCache wraps the scheduler's set_timesteps on the instance (to restart its cache each call); it calls
    the class's, as host_ahead changed it after, so both keep their work (on an H200 the schedule went
    diffusers' way in ``dc_host_ahead`` while DeepCache bound the method it found when applied)."""

    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(5)
        call = {"num_inference_steps": 4, "height": 64, "width": 64, "output_type": "np", "generator": generator}
        return pipe("a red bicycle", **call).images

    deepcache = {"_target_": "runner.accelerators.deepcache.DeepCacheAccelerator", "interval": 2}
    alone = sdxl()
    build_accelerator(deepcache).apply(alone, target(tmp_path))
    expected = images(alone)
    pipe = sdxl()
    chain = Chain(parts=[deepcache, HOST_AHEAD])
    chain.check(CPU)
    chain.apply(pipe, target(tmp_path))
    full_calls: list[int] = []
    pipe.unet.module.register_forward_pre_hook(lambda module, args: full_calls.append(1))
    for _ in range(2):
        full_calls.clear()
        np.testing.assert_array_equal(images(pipe), expected)
        assert len(full_calls) == 2  # steps 0 and 2 of 4: DeepCache restarted
    chain.warmed_up(pipe)  # raises if host_ahead was bypassed
    assert chain.tags()["host_ahead_calls"] == "2"


def test_a_scheduler_method_bound_on_the_instance_is_said_not_timed(tmp_path: Path) -> None:
    """What DeepCache did before it called the class's method: host_ahead never ran, and its runs would have
    timed diffusers' own schedule under its name. The warmup's end says so, naming the fix."""
    pipe = sdxl()
    accelerator = build_accelerator(HOST_AHEAD)
    accelerator.apply(pipe, target(tmp_path))
    pipe.scheduler.set_timesteps = functools.partial(type(pipe.scheduler).__mro__[1].set_timesteps, pipe.scheduler)
    accelerator.warmed_up(pipe)  # warmup=0: no schedule set yet, nothing to tell
    pipe("a red bicycle", num_inference_steps=2, height=64, width=64, output_type="np")
    with pytest.raises(
        RunnerError, match=r"^host_ahead: the warmup called EulerDiscreteScheduler.set_timesteps without"
    ):
        accelerator.warmed_up(pipe)


def test_a_pipeline_without_time_ids_has_its_schedule_ahead_only(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_pix2pix"), "i2i", CPU, torch.float32)
    accelerator = build_accelerator(HOST_AHEAD)
    accelerator.apply(pipe, target(tmp_path))
    pipe("a red bicycle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, output_type="np")
    assert "time ids" not in accelerator.tags()["host_ahead"]


def test_refused_in_one_line_without_a_scheduler(tmp_path: Path) -> None:
    pipe = sdxl()
    pipe.scheduler = None
    refused = r"^host_ahead: StableDiffusionXLPipeline has no diffusers scheduler .*e\.g\. accelerator=compile_graph$"
    with pytest.raises(ConfigError, match=refused):
        build_accelerator(HOST_AHEAD).apply(pipe, target(tmp_path))


@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_on_a_gpu_the_host_does_not_wait_and_the_values_are_diffusers(tmp_path: Path, scheduler: type) -> None:
    cuda = torch.device("cuda")
    pipe = sdxl(device=cuda)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    own = scheduler.from_config(pipe.scheduler.config)
    own.set_timesteps(30, device=cuda)
    build_accelerator(HOST_AHEAD).apply(pipe, target(tmp_path, cuda))
    projection = pipe.text_encoder_2.config.projection_dim
    pipe.scheduler.set_timesteps(30, device=cuda)  # diffusers' own: learns what goes to the GPU
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a copy that waits for the GPU raises
    try:
        pipe.scheduler.set_timesteps(30, device=cuda)
        time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float16, projection)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    mine, theirs = tensors(pipe.scheduler), tensors(own)
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert mine[name].device == value.device and torch.equal(mine[name], value), name
    assert time_ids.device.type == "cuda" and time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    generator = torch.Generator(cuda).manual_seed(1)
    pipe("a red bicycle", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)
