"""transformer_layout: the denoiser's transformer models hand back their output in their input's layout, so a
channels_last UNet's skip connections and their concatenations stay channels_last (eager and as inductor compiles them);
the same images; refused in one line where there is no transformer model over an image."""

import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECOMPILED_ON_CPU, cold_then_saved, load_model
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from PIL import Image
from torch._inductor.utils import run_and_get_code

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
LAYOUT = {"_target_": "runner.accelerators.transformer_layout.TransformerOutputInLayoutAccelerator"}


def target(tmp_path: Path, model: str = "tiny_sdxl") -> Target:
    return Target("unet", CPU, torch.float32, tmp_path, f"{model}-random-t2i-64x64-fp32")


def unet_call(unet: torch.nn.Module) -> tuple[tuple, dict]:
    """One CFG batch of inputs for ``unet`` at 16 x 16 latents, channels_last."""
    torch.manual_seed(0)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 16, 16).to(memory_format=torch.channels_last)
    kwargs = {"encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim)}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    return (latents, torch.tensor(10.0)), kwargs


def image_buffers(code: str, device: str) -> list[tuple[int, ...]]:
    """The size and strides of every four-dimensional buffer with pixels (height and width above 1) that inductor's
    generated ``code`` allocates on ``device``: (images, channels, height, width, then the four strides)."""
    sizes = r"\((\d+), (\d+), (\d+), (\d+)\)"
    allocated = re.findall(rf"empty_strided_{device}\({sizes}, {sizes}", code)
    return [tuple(map(int, shape)) for shape in allocated if int(shape[2]) > 1 and int(shape[3]) > 1]


def concatenations(unet: torch.nn.Module) -> list[torch.Tensor]:
    """What ``torch.cat`` makes during one eager call of ``unet`` (the up blocks join their skip connections so)."""
    made, cat = [], torch.cat

    def recording(tensors, dim=0):
        made.append(cat(tensors, dim))
        return made[-1]

    args, kwargs = unet_call(unet)
    torch.cat = recording
    try:
        with torch.no_grad():
            unet(*args, **kwargs)
    finally:
        torch.cat = cat
    return [t for t in made if t.ndim == 4]


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_pix2pix"])  # linear projections, then 1x1 convolutions
def test_a_channels_last_unets_skip_connections_are_joined_channels_last(model: str, tmp_path: Path) -> None:
    """SDXL's (linear projections): joined channel-first before, because of diffusers' copy; SD 1.5's (a 1x1
    convolution after the copy, whose output follows its channels_last weights): channels_last before and after."""
    pipe = build_pipeline(load_model(model), "t2i" if model == "tiny_sdxl" else "i2i", CPU, torch.float32)
    unet = pipe.unet.eval().to(memory_format=torch.channels_last)
    before = concatenations(unet)
    joined_channels_last = [t.is_contiguous(memory_format=torch.channels_last) for t in before]
    assert before and all(joined_channels_last) == (model == "tiny_pix2pix")
    accelerator = build_accelerator(LAYOUT)
    accelerator.apply(pipe, target(tmp_path, model))
    transformers = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    assert accelerator.tags() == {"transformer_outputs_in_layout": str(len(transformers))}
    assert all(m.named_like == "transformer_output_in_layout" for m in transformers)
    after = concatenations(unet)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in after)
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_inductor_allocates_every_image_tensor_of_the_swapped_unet_channels_last(tmp_path: Path) -> None:
    """The tiny SDXL UNet compiled by inductor (on the CPU: its concatenation is a kernel of its own there, whose
    output layout follows its inputs'): no buffer of the generated code holds an image channel-first, and the output
    is the eager one."""
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    unet = pipe.unet.eval().to(memory_format=torch.channels_last)
    build_accelerator(LAYOUT).apply(pipe, target(tmp_path))
    args, kwargs = unet_call(unet)
    torch._dynamo.reset()
    with torch.no_grad():
        want = unet(*args, **kwargs).sample
        got, code = run_and_get_code(lambda: torch.compile(unet)(*args, **kwargs).sample)
    images = image_buffers(code[-1], "cpu")
    assert images and all(shape[5] == 1 for shape in images), images  # the channel stride 1: channels_last
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_swapped_pipeline_makes_the_same_images_compiled_and_from_saved_functions(tmp_path: Path) -> None:
    call = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}

    def images(pipe) -> np.ndarray:
        return pipe("a lighthouse at night", generator=torch.Generator().manual_seed(7), **call).images

    want = images(build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32))
    # the swapped class is told apart by precompile's key
    for pipe in cold_then_saved([LAYOUT, PRECOMPILED_ON_CPU], target(tmp_path)):
        np.testing.assert_allclose(images(pipe), want, atol=1e-5)


def test_image_to_image_makes_the_same_images_with_compile_graph_fasts_layout_parts(tmp_path: Path) -> None:
    """instruct-pix2pix (1x1 convolutions project its transformers' images) with the layout parts
    ``compile_graph_fast`` and ``fp8_compile`` hold, pinned norms and outputs in their layout, channels_last, compiled
    and from the saved functions: the images are the pipeline's up to rounding."""
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def images(pipe) -> np.ndarray:
        generator = torch.Generator().manual_seed(7)
        return pipe("a red door", image=source, num_inference_steps=3, output_type="np", generator=generator).images

    want = images(build_pipeline(load_model("tiny_pix2pix"), "i2i", CPU, torch.float32))
    norms = {"_target_": "runner.accelerators.group_norm.GroupNormInLayoutAccelerator", "pin_layout": True}
    parts = [norms, LAYOUT, PRECOMPILED_ON_CPU | {"channels_last": True}]
    for pipe in cold_then_saved(parts, target(tmp_path, "tiny_pix2pix"), "tiny_pix2pix", "i2i"):
        np.testing.assert_allclose(images(pipe), want, atol=1e-4)


def test_refused_in_one_line_where_the_denoiser_has_no_transformer_over_an_image() -> None:
    with pytest.raises(ConfigError) as refused:
        build_accelerator(LAYOUT).apply(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)), target(Path(".")))
    assert str(refused.value) == (
        "transformer_layout: Linear has no transformer model over an image (diffusers' Transformer2DModel) whose "
        "output's layout to keep; use an accelerator without TransformerOutputInLayoutAccelerator among its parts"
    )


def test_refused_in_one_line_where_diffusers_lacks_the_method_it_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Transformer2DModel, "_get_output_for_continuous_inputs")
    with pytest.raises(ConfigError, match=r"^transformer_layout: diffusers [0-9.]+'s Transformer2DModel has no "):
        build_accelerator(LAYOUT).apply(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)), target(Path(".")))


@pytest.mark.gpu
def test_with_pinned_norms_compiled_on_a_gpu_no_image_buffer_is_channel_first() -> None:
    """The tiny SDXL UNet in float16, channels_last, with ``transformer_layout`` and ``group_norm``'s pinned norms,
    compiled by inductor on the GPU: no buffer of the generated code holds an image channel-first (with the norms
    unpinned, an H100 allocated the up blocks' first concatenation so), and the output is eager's up to rounding."""
    cuda = torch.device("cuda")
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", cuda, torch.float16)
    unet = pipe.unet.eval().to(memory_format=torch.channels_last)
    norms = {"_target_": "runner.accelerators.group_norm.GroupNormInLayoutAccelerator", "pin_layout": True}
    Chain(parts=[norms, LAYOUT]).apply(pipe, Target("unet", cuda, torch.float16, Path("."), "tiny"))
    args, kwargs = torch.utils._pytree.tree_map(lambda t: t.to(cuda, torch.float16), unet_call(unet))
    args = (args[0].contiguous(memory_format=torch.channels_last), args[1])
    torch._dynamo.reset()
    with torch.no_grad():
        want = unet(*args, **kwargs).sample
        got, code = run_and_get_code(lambda: torch.compile(unet)(*args, **kwargs).sample)
    images = image_buffers(code[-1], "cuda")
    assert images and all(shape[5] == 1 for shape in images), images
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_a_bfloat16_pipeline_rounds_no_worse_with_compile_graph_bf16s_layout_parts(tmp_path: Path) -> None:
    """``compile_graph_bf16``'s order (the float16 job's pipeline made bfloat16 first, then the pinned norms and the
    outputs in their layout, channels_last, compiled and from the saved functions): its images stay as close to the
    float32 pipeline's as the bfloat16 pipeline's without those parts do (bfloat16's rounding, no more)."""
    bf16 = {"_target_": "runner.accelerators.bf16.Bf16Accelerator"}
    norms = {"_target_": "runner.accelerators.group_norm.GroupNormInLayoutAccelerator", "vae": True, "pin_layout": True}
    call = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np"}
    half = Target("unet", CPU, torch.float16, tmp_path, "tiny_sdxl-random-t2i-64x64-fp16")

    def images(chain: Chain | None, dtype: torch.dtype = torch.float16) -> np.ndarray:
        torch._dynamo.reset()
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, dtype)
        if chain is not None:
            chain.apply(pipe, half)
            assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
        return pipe("a lighthouse at night", generator=torch.Generator().manual_seed(7), **call).images

    exact = images(None, torch.float32)
    plain = np.abs(images(Chain(parts=[bf16])) - exact)  # 0.031 at most, 0.0033 on average, when written
    for cache in ("miss", "hit"):  # compiled cold, then from the saved functions
        chain = Chain(parts=[bf16, norms, LAYOUT, PRECOMPILED_ON_CPU | {"channels_last": True}])
        error = np.abs(images(chain) - exact)
        assert chain.tags()["precompile_cache"] == cache
        assert error.max() <= 1.5 * plain.max() and error.mean() <= 1.5 * plain.mean()
