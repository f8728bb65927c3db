"""prompt_graph: SDXL's prompt encoding by one module (one CUDA graph on a GPU) gives diffusers' own embeddings
bit for bit, the same images, passes any other way of calling on to diffusers, says a truncation once, and
refuses in one line what it cannot capture."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.accelerators.cuda_graph import GraphedModule
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
PROMPT_GRAPH = {"_target_": "runner.accelerators.prompt_graph.PromptGraphAccelerator"}


def target(tmp_path: Path, device: torch.device = CPU) -> Target:
    return Target("unet", device, torch.float32, tmp_path, "tiny-random-64x64-fp32")


def sdxl(task: str = "t2i", device: torch.device = CPU) -> DiffusionPipeline:
    return build_pipeline(load_model("tiny_sdxl"), task, device, torch.float32)


def assert_same(got: tuple, expected: tuple) -> None:
    assert len(got) == len(expected) == 4
    for mine, theirs in zip(got, expected, strict=True):
        if theirs is None:
            assert mine is None
        else:
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


@pytest.mark.parametrize("images_per_prompt", [1, 2])
@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("prompt", ["a red bicycle", ["a red bicycle", "a lighthouse at dusk"]])
def test_the_embeddings_are_diffusers_own(tmp_path: Path, prompt, guidance: bool, images_per_prompt: int) -> None:
    pipe = sdxl()
    call = {"prompt": prompt, "num_images_per_prompt": images_per_prompt, "do_classifier_free_guidance": guidance}
    expected = pipe.encode_prompt(device=CPU, **call)
    build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
    assert_same(pipe.encode_prompt(device=CPU, **call), expected)
    assert_same(pipe.encode_prompt(**call), expected)  # the device looked up, as the pipeline's calls do
    assert pipe._runner_prompt_graph.passed_on == 0


@pytest.mark.parametrize(
    ("task", "call"),
    [
        ("t2i", {"height": 64, "width": 64}),
        ("i2i", {"image": Image.new("RGB", (64, 64), (90, 140, 200)), "strength": 0.6}),
    ],
)
def test_the_same_images(tmp_path: Path, task: str, call: dict) -> None:
    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(3)
        return pipe("a red bicycle", num_inference_steps=4, output_type="np", generator=generator, **call).images

    expected = images(sdxl(task))
    pipe = sdxl(task)
    cls = type(pipe)
    accelerator = build_accelerator(PROMPT_GRAPH)
    accelerator.apply(pipe, target(tmp_path))
    np.testing.assert_array_equal(images(pipe), expected)
    np.testing.assert_array_equal(images(pipe), expected)
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__
    eager = {"prompt_graph": "whole", "prompt_graphs_captured": "0", "prompt_graph_passed_on": "0"}  # on the CPU
    assert accelerator.tags() == eager


@pytest.mark.parametrize(
    "other_way",
    [
        {"negative_prompt": "blurry"},
        {"prompt_2": "a blue bicycle"},
        {"clip_skip": 1},
        {"device": torch.device("cpu", 0)},  # not the device the encoders name
    ],
)
def test_any_other_way_is_diffusers_own(tmp_path: Path, other_way: dict) -> None:
    pipe = sdxl()
    call = {"prompt": "a red bicycle", "device": CPU} | other_way
    build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
    seen = []
    original = pipe._runner_prompt_graph.original
    pipe._runner_prompt_graph.original = lambda *args, **kwargs: seen.append(kwargs) or original(*args, **kwargs)
    expected = StableDiffusionXLPipeline.encode_prompt(pipe, **call)
    assert_same(pipe.encode_prompt(**call), expected)
    assert seen == [call] and pipe._runner_prompt_graph.passed_on == 1


def test_the_encoders_compiled_give_diffusers_embeddings_up_to_rounding(tmp_path: Path) -> None:
    pipe = sdxl()
    call = {"prompt": "a red bicycle", "device": CPU, "num_images_per_prompt": 2}
    expected = pipe.encode_prompt(**call)
    build_accelerator(PROMPT_GRAPH | {"compile_encoders": True}).apply(pipe, target(tmp_path))
    got = pipe.encode_prompt(**call)
    assert isinstance(pipe._runner_prompt_graph.encoders[2, True], torch._dynamo.eval_frame.OptimizedModule)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs)


def test_a_textual_inversion_of_several_vectors_is_expanded_as_diffusers_does(tmp_path: Path) -> None:
    """The prompt is re-tokenized for textual inversion only where a token of several vectors was loaded."""
    pipe = sdxl()
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        tokenizer.add_tokens(["<cat>", "<cat>_1", "<dog>"])
        encoder.resize_token_embeddings(len(tokenizer))
    call = {"prompt": "a <cat> beside a <dog>", "device": CPU}
    assert pipe.maybe_convert_prompt(call["prompt"], pipe.tokenizer) == "a <cat> <cat>_1 beside a <dog>"
    expected = pipe.encode_prompt(**call)
    build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
    converted: list[str] = []
    original = pipe.maybe_convert_prompt
    pipe.maybe_convert_prompt = lambda prompts, tokenizer: converted.extend(prompts) or original(prompts, tokenizer)
    assert_same(pipe.encode_prompt(**call), expected)
    assert converted == [call["prompt"]] * 2  # both tokenizers
    plain = sdxl()
    build_accelerator(PROMPT_GRAPH).apply(plain, target(tmp_path))
    plain.maybe_convert_prompt = lambda prompts, tokenizer: pytest.fail("re-tokenized without multi-vector tokens")
    plain.encode_prompt(**call)


def test_a_truncated_prompt_is_said_once(tmp_path: Path) -> None:
    pipe = sdxl()
    prompt = " ".join(["lighthouse"] * 100)  # over CLIP's 77 tokens
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        expected = pipe.encode_prompt(prompt, device=CPU)
        assert sum("was truncated" in line for line in said) == 2  # diffusers: each tokenizer, every call
        said.clear()
        build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
        for _ in range(3):
            assert_same(pipe.encode_prompt(prompt, device=CPU), expected)
    finally:
        logger.removeHandler(handler)
    assert sum("was truncated" in line for line in said) == 2  # each tokenizer, once


def test_beside_device_once_and_device_images(tmp_path: Path) -> None:
    """compile_graph_fast's in-place parts, each changing the pipeline's class: the same PIL images."""

    def images(pipe: DiffusionPipeline) -> list[np.ndarray]:
        generator = torch.Generator(CPU).manual_seed(5)
        output = pipe("a red bicycle", num_inference_steps=2, height=64, width=64, generator=generator)
        return [np.asarray(image) for image in output.images]

    expected = images(sdxl())
    pipe = sdxl()
    device_once = {"_target_": "runner.accelerators.device_once.DeviceOnceAccelerator"}
    device_images = {"_target_": "runner.accelerators.device_images.DeviceImagesAccelerator"}
    chain = Chain(parts=[PROMPT_GRAPH, device_once, device_images])
    chain.check(CPU)
    chain.apply(pipe, target(tmp_path))
    np.testing.assert_array_equal(images(pipe), expected)
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe).__name__ == "StableDiffusionXLPipeline"


def test_a_pipeline_with_its_own_prompt_encoding_keeps_it(tmp_path: Path) -> None:
    """instruct-pix2pix encodes its prompt its own way: its text encoder is graphed on its own (on CUDA; on the CPU
    nothing is), its class and images unchanged."""
    image = Image.new("RGB", (64, 64), (90, 140, 200))

    def images(pipe: DiffusionPipeline) -> np.ndarray:
        generator = torch.Generator(CPU).manual_seed(3)
        return pipe("a red bicycle", image=image, num_inference_steps=2, output_type="np", generator=generator).images

    expected = images(build_pipeline(load_model("tiny_pix2pix"), "i2i", CPU, torch.float32))
    pipe = build_pipeline(load_model("tiny_pix2pix"), "i2i", CPU, torch.float32)
    cls = type(pipe)
    accelerator = build_accelerator(PROMPT_GRAPH)
    accelerator.apply(pipe, target(tmp_path))
    np.testing.assert_array_equal(images(pipe), expected)
    assert type(pipe) is cls
    assert accelerator.tags() == {"prompt_graph": "each text encoder", "prompt_graphs_captured": "0"}


def test_refused_in_one_line_where_it_cannot_capture(tmp_path: Path) -> None:
    pipe = sdxl()
    pipe.text_encoder_2 = GraphedModule(pipe.text_encoder_2, warmup_calls=2)
    graphed = r"^prompt_graph: the text encoders are already graphed .*text_encoders to false$"
    with pytest.raises(ConfigError, match=graphed):
        build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
    pix2pix = build_pipeline(load_model("tiny_pix2pix"), "i2i", CPU, torch.float32)
    own_way = r"^prompt_graph.compile_encoders=true: StableDiffusionInstructPix2PixPipeline encodes .*set it to false$"
    with pytest.raises(ConfigError, match=own_way):
        build_accelerator(PROMPT_GRAPH | {"compile_encoders": True}).apply(pix2pix, target(tmp_path))
    pipe = sdxl()
    pipe.text_encoder, pipe.text_encoder_2 = None, None
    none = r"^prompt_graph: StableDiffusionXLPipeline has no text encoder .*e\.g\. accelerator=compile_graph$"
    with pytest.raises(ConfigError, match=none):
        build_accelerator(PROMPT_GRAPH).apply(pipe, target(tmp_path))
    assert type(pipe) is StableDiffusionXLPipeline


@pytest.mark.gpu
def test_one_graph_gives_the_eager_embeddings(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    pipe = sdxl(device=cuda)
    calls = [
        {"prompt": "a red bicycle", "do_classifier_free_guidance": True},
        {"prompt": ["a red bicycle", "a lighthouse at dusk"], "num_images_per_prompt": 2},
        {"prompt": "a red bicycle", "do_classifier_free_guidance": False},
    ]
    expected = [pipe.encode_prompt(device=cuda, **call) for call in calls]
    accelerator = build_accelerator(PROMPT_GRAPH)
    accelerator.apply(pipe, target(tmp_path, cuda))
    for _ in range(2):  # captured, then replayed
        for call, embeddings in zip(calls, expected, strict=True):
            assert_same(pipe.encode_prompt(**call), embeddings)
    assert accelerator.tags() == {"prompt_graph": "whole", "prompt_graphs_captured": "3", "prompt_graph_passed_on": "0"}


@pytest.mark.gpu
def test_each_text_encoder_graphed_where_the_pipeline_has_its_own_way(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    pipe = build_pipeline(load_model("tiny_pix2pix"), "i2i", cuda, torch.float32)
    accelerator = build_accelerator(PROMPT_GRAPH)
    accelerator.apply(pipe, target(tmp_path, cuda))
    assert isinstance(pipe.text_encoder, GraphedModule)
    pipe("a red bicycle", image=Image.new("RGB", (64, 64)), num_inference_steps=2, output_type="np")
    assert accelerator.tags() == {"prompt_graph": "each text encoder", "prompt_graphs_captured": "1"}
