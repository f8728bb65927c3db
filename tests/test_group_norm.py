"""group_norm: every group norm of the denoiser and the VAE computed in its input's own layout: torch's group norm up to
rounding in either layout, the layout kept; the same images swapped, compiled and loaded from saved functions; refused
in one line where there is nothing to swap."""

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PRECOMPILED_ON_CPU, cold_then_saved, load_model
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.accelerators.group_norm import group_norm_in_layout
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
GROUP_NORM = {"_target_": "runner.accelerators.group_norm.GroupNormInLayoutAccelerator"}
LAYOUTS = {"channels_last": torch.channels_last, "channel-first": torch.contiguous_format}


def target(tmp_path: Path) -> Target:
    return Target("unet", CPU, torch.float32, tmp_path, "tiny_sdxl-random-t2i-64x64-fp32")


def images(pipe, prompt: str = "a lighthouse at night") -> np.ndarray:
    call = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    return pipe(prompt, generator=torch.Generator().manual_seed(7), **call).images


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("offset", [0.0, 50.0])  # a mean far from zero: the variance must not cancel away
def test_the_norm_is_torchs_up_to_rounding_in_either_layout_and_keeps_it(layout: str, affine: bool, offset: float):
    torch.manual_seed(0)
    x = (torch.randn(2, 96, 12, 10) * 0.5 + offset).to(memory_format=LAYOUTS[layout])
    weight, bias = (torch.randn(96), torch.randn(96)) if affine else (None, None)
    exact = F.group_norm(x.double(), 32, *(None if t is None else t.double() for t in (weight, bias)), 1e-5)
    torchs = (F.group_norm(x, 32, weight, bias, 1e-5).double() - exact).abs().max().item()
    ours = group_norm_in_layout(x, 32, weight, bias, 1e-5)
    assert ours.dtype == x.dtype and ours.is_contiguous(memory_format=LAYOUTS[layout])
    assert (ours.double() - exact).abs().max().item() <= max(8 * torchs, 1e-5)


def test_a_half_precision_input_rounds_as_torchs_norm_and_one_without_pixels_runs_torchs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8).half().to(memory_format=torch.channels_last)
    exact = F.group_norm(x.float(), 32)
    ours, torchs = group_norm_in_layout(x, 32, None, None, 1e-5), F.group_norm(x, 32)
    assert ours.dtype == torch.float16
    assert (ours.float() - exact).abs().max() <= (torchs.float() - exact).abs().max() + 1e-3
    norm = torch.nn.GroupNorm(4, 16)
    build_accelerator(GROUP_NORM | {"vae": False}).apply(types.SimpleNamespace(unet=norm), target(Path(".")))
    flat = torch.randn(3, 16)  # no pixels: torch's own norm
    torch.testing.assert_close(norm(flat), F.group_norm(flat, 4, norm.weight, norm.bias, norm.eps), rtol=0, atol=0)


def test_the_swapped_pipeline_makes_the_same_images_compiled_and_from_saved_functions(tmp_path: Path) -> None:
    """Every group norm of the UNet and the VAE swapped (a class named like its own, told apart by precompile's
    key): the images stay the pipeline's, eager, then compiled as a whole graph and loaded from the saved functions."""
    expected = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    want = images(expected)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for model in (expected.unet, expected.vae) for m in model.modules())
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = build_accelerator(GROUP_NORM)
    accelerator.apply(pipe, target(tmp_path))
    assert accelerator.tags() == {"group_norms_in_layout": str(norms)}
    swapped = [m for m in pipe.vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert swapped and all(type(m).__name__ == "GroupNorm" and m.named_like == "group_norm_in_layout" for m in swapped)
    np.testing.assert_allclose(images(pipe), want, atol=1e-5)
    for pipe in cold_then_saved([GROUP_NORM, PRECOMPILED_ON_CPU], target(tmp_path)):
        np.testing.assert_allclose(images(pipe), want, atol=1e-5)
    unet_only = build_accelerator(GROUP_NORM | {"vae": False})
    unet_only.apply(build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32), target(tmp_path))
    assert 0 < int(unet_only.tags()["group_norms_in_layout"]) < norms


def test_image_to_image_encodes_its_input_through_the_swapped_encoder_to_the_same_images(tmp_path: Path) -> None:
    """The VAE's encoder's norms are swapped too: an image-to-image call (its input encoded, then denoised and decoded)
    makes the pipeline's images."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = {"image": source, "strength": 0.6, "num_inference_steps": 4, "output_type": "np"}
    results = []
    for swap in (False, True):
        pipe = build_pipeline(load_model("tiny_sdxl"), "i2i", CPU, torch.float32)
        if swap:
            build_accelerator(GROUP_NORM).apply(pipe, target(tmp_path))
            assert all(
                m.named_like == "group_norm_in_layout"
                for m in pipe.vae.encoder.modules()
                if isinstance(m, torch.nn.GroupNorm)
            )
        results.append(pipe("a red door", generator=torch.Generator().manual_seed(7), **call).images)
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)


def test_refused_in_one_line_where_the_denoiser_has_no_group_norm() -> None:
    with pytest.raises(ConfigError) as refused:
        build_accelerator(GROUP_NORM).apply(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)), target(Path(".")))
    assert str(refused.value) == (
        "group_norm: Linear has no group norm (torch.nn.GroupNorm) to compute in its input's layout; use an "
        "accelerator without GroupNormInLayoutAccelerator among its parts"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_up_blocks_entry_compiled_on_a_gpu_is_torchs_up_to_rounding(dtype: torch.dtype) -> None:
    """SDXL's up-block resnet entry (a concatenation with the skip connection, the norm, SiLU, a convolution) in
    channels_last, compiled by inductor on the GPU with the norm swapped: torch's output up to a rounding."""
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    norm = torch.nn.GroupNorm(32, 960).to(cuda, dtype)
    conv = torch.nn.Conv2d(960, 320, 3, padding=1).to(cuda, dtype).to(memory_format=torch.channels_last)
    x, skip = (
        torch.randn(2, c, 64, 64, device=cuda, dtype=dtype).to(memory_format=torch.channels_last) for c in (640, 320)
    )

    def entry(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return conv(F.silu(norm(torch.cat([x, skip], dim=1))))

    with torch.no_grad():
        want = torch.compile(entry)(x, skip)
        build_accelerator(GROUP_NORM | {"vae": False}).apply(types.SimpleNamespace(unet=norm), target(Path(".")))
        torch._dynamo.reset()
        got = torch.compile(entry)(x, skip)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_pinned_norms_pin_a_channels_last_input_while_traced_and_keep_the_images(tmp_path: Path) -> None:
    """``pin_layout``: while dynamo traces a norm whose input is channels_last, the graph pins that layout (inductor's
    ``prims.inductor_force_stride_order``), a channel-first input is left alone, eager calls run unpinned; the images
    stay the pipeline's, compiled and from the saved functions."""
    norm = torch.nn.GroupNorm(4, 16)
    build_accelerator(GROUP_NORM | {"vae": False, "pin_layout": True}).apply(
        types.SimpleNamespace(unet=norm), target(Path("."))
    )
    assert norm.named_like == "group_norm_pinned"
    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    for layout, pinned in ((torch.channels_last, 1), (torch.contiguous_format, 0)):
        graphs.clear()
        torch._dynamo.reset()
        x = torch.randn(2, 16, 6, 5).to(memory_format=layout)
        torch.testing.assert_close(torch.compile(norm, backend=backend)(x), F.group_norm(x, 4, norm.weight, norm.bias))
        pins = [n for gm in graphs for n in gm.graph.nodes if "inductor_force_stride_order" in str(n.target)]
        assert len(pins) == pinned
    want = images(build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32))
    parts = [GROUP_NORM | {"pin_layout": True}, PRECOMPILED_ON_CPU | {"channels_last": True}]
    for pipe in cold_then_saved(parts, target(tmp_path)):
        np.testing.assert_allclose(images(pipe), want, atol=1e-5)
