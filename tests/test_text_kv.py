"""text_kv: the cross-attention's keys and values of the text computed once per call give the same images, for
each prompt in turn (never the last prompt's), fused, compiled and precompiled; it stands last in a chain."""

import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECOMPILED_ON_CPU, cold_then_saved, load_model

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain, check_order
from runner.accelerators.text_kv import Batch, TextKeysOnceAccelerator, TextOnce, TextProjection, batched
from runner.config import ConfigError
from runner.errors import RunnerError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
TEXT_KV = {"_target_": "runner.accelerators.text_kv.TextKeysOnceAccelerator"}
PROMPTS = ("a red bicycle leaning on a wall", "a lighthouse at night, long exposure")
STEPS = 3


def images(pipe, prompt: str, device: torch.device = CPU) -> np.ndarray:
    generator = torch.Generator(device).manual_seed(7)
    call = {"num_inference_steps": STEPS, "height": 64, "width": 64, "output_type": "np", "generator": generator}
    return pipe(prompt, **call).images


def target(tmp_path: Path, device: torch.device = CPU) -> Target:
    return Target("unet", device, torch.float32, tmp_path, "tiny_sdxl-random-t2i-64x64-fp32")


def baseline(device: torch.device = CPU) -> list[np.ndarray]:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", device, torch.float32)
    return [images(pipe, prompt, device) for prompt in PROMPTS]


def test_keys_once_give_each_prompt_its_own_images_and_fill_once_a_call(tmp_path: Path) -> None:
    expected = baseline()
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = build_accelerator(TEXT_KV)
    accelerator.apply(pipe, target(tmp_path))
    steps = []
    pipe.unet.register_forward_pre_hook(lambda module, args: steps.append(1))
    for prompt, wanted in zip(PROMPTS, expected, strict=True):
        np.testing.assert_array_equal(images(pipe, prompt), wanted)  # the second prompt: not the first's keys
    assert pipe.unet.fills == 2 and len(steps) == 2 * STEPS  # once a call, though called at every step
    cross_attentions = sum(getattr(module, "is_cross_attention", False) for module in pipe.unet.modules())
    # to_k and to_v each, all of one width in the tiny UNet: one batched product fills them
    assert accelerator.tags() == {"text_kv_projections": str(2 * cross_attentions), "text_kv_products": "1"}


def test_keys_once_beside_fused_projections_compiled_and_precompiled(tmp_path: Path) -> None:
    """torch_compile's fused projections (one ``to_kv``) and its saved compiled modules, warm in a second pass."""
    expected = baseline()
    for pipe in cold_then_saved([PRECOMPILED_ON_CPU, TEXT_KV], target(tmp_path)):
        for prompt, wanted in zip(PROMPTS, expected, strict=True):
            np.testing.assert_allclose(images(pipe, prompt), wanted, atol=1e-5)
        filled = [name for name, module in pipe.unet.named_modules() if type(module) is TextProjection]
        assert filled and all(name.endswith("to_kv") for name in filled)


class Doubled(torch.nn.Module):
    """A projection that is no plain linear layer (as a quantised one is not)."""

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return 2 * text


def test_alike_layers_are_filled_by_one_product_in_place_each_holding_its_own() -> None:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 3, bias=False) for _ in range(3)] + [torch.nn.Linear(4, 6) for _ in range(2)]
    layers += [torch.nn.Linear(4, 5), Doubled()]  # the only one of its shape, and no linear layer
    expected_layers = [copy.deepcopy(layer) for layer in layers]
    projections = [TextProjection(layer) for layer in layers]
    fillers = batched(projections)
    assert [type(filler) for filler in fillers] == [Batch, Batch, TextProjection, TextProjection]
    for layer in layers[:5]:  # each layer's weight is its slice of the stack, not a copy
        assert layer.weight.untyped_storage().data_ptr() in {
            filler.weight.untyped_storage().data_ptr() for filler in fillers[:2]
        }
    addresses = None
    for scale in (1.0, -3.0):  # a second text of the same shape: written where the first was
        text = scale * torch.randn(2, 5, 4)
        for filler in fillers:
            filler.fill(text)
        for projection, layer in zip(projections, expected_layers, strict=True):
            torch.testing.assert_close(projection(text), layer(text))
        now = [projection(text).data_ptr() for projection in projections]
        assert addresses in (None, now)
        addresses = now
    text = torch.randn(1, 7, 4)  # the layers, now slices of the stacks, still compute what they did
    for layer, expected in zip(layers[:5], expected_layers, strict=False):
        torch.testing.assert_close(layer(text), expected(text))


def test_the_same_text_changed_in_place_is_filled_again() -> None:
    projection = TextProjection(torch.nn.Linear(4, 3, bias=False))
    denoiser = TextOnce(types.SimpleNamespace(), [projection])
    denoiser.module = lambda *args, encoder_hidden_states: projection(encoder_hidden_states)  # type: ignore[assignment]
    text = torch.randn(2, 5, 4)
    first = denoiser(encoder_hidden_states=text).clone()
    torch.testing.assert_close(denoiser(encoder_hidden_states=text), first)
    assert denoiser.fills == 1
    text.mul_(2)  # the same tensor, new values (a pipeline reusing its buffer)
    torch.testing.assert_close(denoiser(encoder_hidden_states=text), 2 * first)
    assert denoiser.fills == 2
    with pytest.raises(
        RunnerError, match=r"without encoder_hidden_states as a keyword.*e\.g\. accelerator=compile_graph$"
    ):
        denoiser(text)


def test_keys_once_stand_last_in_a_chain_and_need_a_cross_attention(tmp_path: Path) -> None:
    graphs = {"_target_": "runner.accelerators.cuda_graph.CudaGraphAccelerator"}
    with pytest.raises(ConfigError, match=r"CudaGraphAccelerator \(capture\) cannot follow TextKeysOnceAccelerator"):
        check_order([build_accelerator(part) for part in (TEXT_KV, graphs)])
    check_order([build_accelerator(part) for part in (graphs, TEXT_KV)])  # accepted
    pipe = types.SimpleNamespace(unet=torch.nn.Linear(4, 4))
    with pytest.raises(
        ConfigError, match=r"^accelerator text_kv: Linear has no cross-attention.*accelerator=compile_graph$"
    ):
        TextKeysOnceAccelerator().apply(pipe, target(tmp_path))


@pytest.mark.gpu
def test_keys_once_outside_the_steps_graph_give_each_prompt_its_images(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    expected = baseline(cuda)
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", cuda, torch.float32)
    chain = Chain(parts=[{"_target_": "runner.accelerators.cuda_graph.CudaGraphAccelerator"}, TEXT_KV])
    chain.check(cuda)
    chain.apply(pipe, target(tmp_path, cuda))
    for prompt, wanted in zip(PROMPTS, expected, strict=True):
        np.testing.assert_allclose(images(pipe, prompt, cuda), wanted, atol=2e-3)
    assert pipe.unet.fills == 2 and chain.tags()["cuda_graphs_captured"] == "1"
