"""device_images: the output images are made 8-bit on the pipeline's device; the pixels stay diffusers' own, bit
for bit, NumPy's conversion no longer runs for PIL output, other outputs take diffusers' path, and a pipeline
without diffusers' image processor is refused in one line."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
DEVICE_IMAGES = {"_target_": "runner.accelerators.device_images.DeviceImagesAccelerator"}


@pytest.fixture
def numpy_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts diffusers' own conversions of NumPy images to PIL."""
    conversions: list[int] = []
    original = VaeImageProcessor.numpy_to_pil

    def counted(images: np.ndarray) -> list[Image.Image]:
        conversions.append(len(images))
        return original(images)

    monkeypatch.setattr(VaeImageProcessor, "numpy_to_pil", staticmethod(counted))
    return conversions


@pytest.fixture
def float_conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts diffusers' own conversions of PIL images to float32 in NumPy."""
    conversions: list[int] = []
    original = VaeImageProcessor.pil_to_numpy

    def counted(images: list[Image.Image] | Image.Image) -> np.ndarray:
        conversions.append(len(images) if isinstance(images, list) else 1)
        return original(images)

    monkeypatch.setattr(VaeImageProcessor, "pil_to_numpy", staticmethod(counted))
    return conversions


def accelerated(
    pipe: DiffusionPipeline, tmp_path: Path, device: torch.device = CPU, options: dict | None = None
) -> DiffusionPipeline:
    build_accelerator(DEVICE_IMAGES | (options or {})).apply(pipe, Target("unet", device, torch.float32, tmp_path, "t"))
    return pipe


def processors(
    tmp_path: Path, device: torch.device = CPU, options: dict | None = None, **config: bool
) -> tuple[VaeImageProcessor, VaeImageProcessor]:
    """Diffusers' image processor, and one as device_images (with ``options``) leaves it."""
    pipe = DiffusionPipeline()
    pipe.register_modules(image_processor=VaeImageProcessor(vae_scale_factor=8, **config))
    ours = accelerated(pipe, tmp_path, device, options).image_processor
    return VaeImageProcessor(vae_scale_factor=8, **config), ours


def every_value(height: int, width: int, seed: int = 0) -> Image.Image:
    """An RGB image holding every 8-bit value, the rest random."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels.reshape(-1)[:256] = np.arange(256)
    return Image.fromarray(pixels)


def assert_same_tensor(mine: torch.Tensor, theirs: torch.Tensor) -> None:
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and mine.stride() == theirs.stride()
    assert torch.equal(mine.cpu(), theirs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_same_pixels_as_diffusers(tmp_path: Path, dtype: torch.dtype, numpy_conversions: list[int]) -> None:
    # Beyond [-1, 1] (clamped), and every pixel value's rounding boundary k + 0.5 of 255, near which float32's
    # product by 255 decides the rounding.
    generator = torch.Generator().manual_seed(0)
    decoded = (torch.rand(2, 3, 96, 96, generator=generator) * 2.4 - 1.2).to(dtype)
    boundaries = ((torch.arange(256 * 9, dtype=torch.float64) / 9 + 0.5) / 255 * 2 - 1).reshape(1, 3, 24, 32)
    stock, ours = processors(tmp_path)
    for image in (decoded, boundaries.to(dtype)):
        expected = stock.postprocess(image.clone(), output_type="pil")
        numpy_conversions.clear()
        got = ours.postprocess(image.clone(), output_type="pil")
        assert numpy_conversions == [] and len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert mine.mode == theirs.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))
    np.testing.assert_array_equal(ours.postprocess(decoded, output_type="np"), stock.postprocess(decoded, "np"))
    assert numpy_conversions == []  # "np" took diffusers' path, which makes no PIL image
    assert ours.postprocess(decoded[:, :1], output_type="pil")[0].mode == "L" and numpy_conversions == [2]


@pytest.mark.parametrize(
    ("model", "task", "call"),
    [
        ("tiny_sdxl", "t2i", {"height": 64, "width": 64}),
        ("tiny_pix2pix", "i2i", {"image": Image.new("RGB", (64, 64), (90, 140, 200))}),
        ("tiny_sdxl", "i2i", {"image": every_value(64, 64), "strength": 0.6}),
    ],
)
def test_a_pipeline_returns_the_same_images(
    tmp_path: Path, numpy_conversions: list[int], model: str, task: str, call: dict
) -> None:
    def images(pipe: DiffusionPipeline) -> list[np.ndarray]:
        generator = torch.Generator(CPU).manual_seed(3)
        output = pipe("a red bicycle", num_inference_steps=2, generator=generator, **call)
        return [np.asarray(one) for one in output.images]

    expected = images(build_pipeline(load_model(model), task, CPU, torch.float32))
    assert numpy_conversions, "diffusers converts in NumPy"
    pipe = accelerated(build_pipeline(load_model(model), task, CPU, torch.float32), tmp_path)
    numpy_conversions.clear()
    np.testing.assert_array_equal(images(pipe), expected)
    assert numpy_conversions == []
    assert type(pipe.image_processor).__name__ == "VaeImageProcessor"


@pytest.mark.parametrize("config", [{}, {"do_normalize": False}, {"do_convert_rgb": True}])
def test_the_input_image_is_diffusers_own_tensor_without_numpy_floats(
    tmp_path: Path, float_conversions: list[int], config: dict
) -> None:
    """Value for value and stride for stride, for one image and a list; made from the 8-bit pixels, NumPy's
    float32 conversion not run (once, for the table of 256 values)."""
    stock, ours = processors(tmp_path, **config)
    for image in (every_value(64, 48), [every_value(32, 32, 1), every_value(32, 32, 2)]):
        expected = stock.preprocess(image)
        float_conversions.clear()
        assert_same_tensor(ours.preprocess(image), expected)
        assert float_conversions in ([], [1])  # the table, on the first call
    expected = stock.preprocess(every_value(64, 48))
    float_conversions.clear()
    assert_same_tensor(ours.preprocess(every_value(64, 48), height=64, width=48), expected)  # its own size asked for
    assert float_conversions == []
    processors(tmp_path, options={"input_image": False}, **config)[1].preprocess(every_value(64, 48))
    assert float_conversions == [1]  # diffusers' own, to time against


@pytest.mark.parametrize(
    ("image", "options"),
    [
        (every_value(60, 60), {}),  # not a multiple of the VAE's 8: resized
        (every_value(64, 64), {"height": 32, "width": 32}),  # resized to the size asked for
        (every_value(64, 64), {"crops_coords": (0, 0, 32, 32)}),
        (every_value(64, 64), {"resize_mode": "fill", "height": 64, "width": 32}),
        (every_value(64, 64).convert("L"), {}),
        (every_value(64, 64).convert("RGBA"), {}),
        ([every_value(32, 32), every_value(64, 64)], {"height": 32, "width": 32}),  # sizes differ
        (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), {}),
    ],
)
def test_any_other_input_takes_diffusers_path(
    tmp_path: Path, float_conversions: list[int], image: Image.Image | list | torch.Tensor, options: dict
) -> None:
    stock, ours = processors(tmp_path)
    expected = stock.preprocess(image, **options)
    float_conversions.clear()
    assert_same_tensor(ours.preprocess(image, **options), expected)
    assert float_conversions == (
        [] if isinstance(image, torch.Tensor) else [len(image) if isinstance(image, list) else 1]
    )


def test_a_pipeline_without_diffusers_image_processor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^device_images: DiffusionPipeline has no VaeImageProcessor .*e\.g\. "):
        accelerated(DiffusionPipeline(), tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_same_pixels_from_a_gpu(tmp_path: Path, dtype: torch.dtype) -> None:
    """The arithmetic on the GPU, against diffusers' in NumPy."""
    decoded = (torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2).to("cuda", dtype)
    stock, ours = processors(tmp_path, torch.device("cuda"))
    got, expected = ours.postprocess(decoded, output_type="pil"), stock.postprocess(decoded, output_type="pil")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))


@pytest.mark.gpu
def test_the_input_image_on_a_gpu_is_diffusers_own_and_the_host_does_not_wait(tmp_path: Path) -> None:
    stock, ours = processors(tmp_path, torch.device("cuda"))
    image = every_value(256, 192)
    ours.preprocess(image)  # the first call makes the table on the GPU: the warmup's, in a run
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a copy that waits for the GPU raises
    try:
        mine = ours.preprocess(image)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mine.device.type == "cuda"
    assert_same_tensor(mine, stock.preprocess(image))
