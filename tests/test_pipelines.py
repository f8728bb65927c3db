"""Building pipelines: the shipped architectures match the published models; random and saved-then-loaded
pipelines are the same pipeline; loading failures name the model and the way around them."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model

from runner.flops import denoiser_flop_per_step
from runner.pipelines import ARCHITECTURES, ModelLoadError, build_pipeline, clip_tokenizer, load_pretrained

# Parameter counts of the published checkpoints' components.
PUBLISHED = {
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    # SD 1.5's UNet (859,520,964) with 4 more input channels for the image latents.
    "instruct_pix2pix": {"unet": 859_532_484, "vae": 83_653_863, "text_encoder": 123_060_480},
}


def meta_component(architecture: str, name: str) -> torch.nn.Module:
    import diffusers
    import transformers

    folder = ARCHITECTURES / architecture
    library, class_name = json.loads((folder / "model_index.json").read_text())[name]
    with torch.device("meta"):
        if library == "diffusers":
            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(folder / name))
        return getattr(transformers, class_name)(transformers.AutoConfig.from_pretrained(folder / name))


@pytest.mark.parametrize(("architecture", "name"), [(a, n) for a, parts in PUBLISHED.items() for n in parts])
def test_architectures_match_published_parameter_counts(architecture: str, name: str) -> None:
    module = meta_component(architecture, name)
    assert sum(p.numel() for p in module.parameters()) == PUBLISHED[architecture][name]


@pytest.mark.parametrize(("res", "tflop"), [(512, 3.18), (1024, 13.52)])
def test_sdxl_unet_flops_per_guided_step(res: int, tflop: float) -> None:
    """One classifier-free-guidance step (batch 2) of the SDXL UNet: 3.2 TFLOP at 512 px, 13.5 at 1024."""
    unet = meta_component("sdxl", "unet").to(torch.float16)
    assert denoiser_flop_per_step(unet, sdxl_step_inputs(res)) / 1e12 == pytest.approx(tflop, abs=0.01)


def sdxl_step_inputs(res: int) -> tuple[tuple, dict]:
    """The SDXL UNet's inputs for one guided step (batch 2) at ``res`` px, on the meta device."""
    latent = res // 8
    return (
        (torch.empty(2, 4, latent, latent, dtype=torch.float16, device="meta"), torch.empty((), device="meta")),
        {
            "encoder_hidden_states": torch.empty(2, 77, 2048, dtype=torch.float16, device="meta"),
            "added_cond_kwargs": {
                "text_embeds": torch.empty(2, 1280, dtype=torch.float16, device="meta"),
                "time_ids": torch.empty(2, 6, dtype=torch.float16, device="meta"),
            },
        },
    )


def test_clip_tokenizer_pads_to_77_within_vocabulary() -> None:
    tokenizer = clip_tokenizer()
    ids = tokenizer("a photo of a lighthouse, ünïcode ✓", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and max(ids) < len(tokenizer) <= 1000  # tiny text encoders have 1000 embeddings
    assert tokenizer.model_max_length == 77


def image_of(pipe, seed: int = 0) -> np.ndarray:
    out = pipe(
        "a lighthouse",
        num_inference_steps=2,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    )
    return np.asarray(out.images[0])


def test_random_weights_are_seeded() -> None:
    model = load_model("tiny_sdxl")
    first = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    second = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    assert np.array_equal(image_of(first), image_of(second))
    assert not np.array_equal(image_of(first, seed=0), image_of(first, seed=1))


def test_only_models_are_built_on_the_device() -> None:
    """Schedulers keep their tables on the CPU (diffusers hands them to numpy) whatever the device."""
    from diffusers import StableDiffusionXLPipeline

    from runner.pipelines import build_random

    pipe = build_random(StableDiffusionXLPipeline, "tiny_sdxl", {}, 0, torch.device("meta"), torch.float16)
    assert pipe.unet.device.type == "meta" and pipe.text_encoder_2.device.type == "meta"
    assert pipe.unet.dtype == torch.float16
    assert pipe.scheduler.alphas_cumprod.device.type == "cpu"
    pipe.scheduler.set_timesteps(4)


def test_saved_tiny_pipeline_reloads_through_from_pretrained(tiny_sdxl_folder: Path) -> None:
    model = load_model("tiny_sdxl")
    built = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    model.weights, model.id = "pretrained", str(tiny_sdxl_folder)
    loaded = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    assert np.array_equal(image_of(built), image_of(loaded))
    assert list(tiny_sdxl_folder.glob("unet/*.safetensors")), "saved as safetensors"


def test_image_to_image_pipeline_loads_from_the_same_folder(tiny_sdxl_folder: Path) -> None:
    model = load_model("tiny_sdxl")
    model.weights, model.id = "pretrained", str(tiny_sdxl_folder)
    pipe = build_pipeline(model, "i2i", torch.device("cpu"), torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_model_scheduler_is_swapped_in() -> None:
    model = load_model("tiny_sdxl")
    model.scheduler = load_model("realvisxl_v4_lightning").scheduler
    pipe = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    assert type(pipe.scheduler).__name__ == "DPMSolverSinglestepScheduler"
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.lower_order_final


def test_lightning_s_five_steps_run_without_a_scheduler_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = load_model("tiny_sdxl")
    model.scheduler = load_model("realvisxl_v4_lightning").scheduler
    pipe = build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.WARNING):
        pipe.scheduler.set_timesteps(load_model("realvisxl_v4_lightning").steps)
    assert len(pipe.scheduler.timesteps) == 5
    assert not [record for record in caplog.records if "lower_order_final" in record.getMessage()]


def test_missing_local_folder_is_named() -> None:
    model = load_model("sdxl_base")
    model.id = "/no/such/checkpoint"
    with pytest.raises(ModelLoadError, match=r"model.id=/no/such/checkpoint: no such folder"):
        load_pretrained(get_pipeline_class(model), model, torch.float32)


def test_unreachable_hub_names_the_model_and_the_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("realvisxl_v4")
    with pytest.raises(ModelLoadError) as raised:
        load_pretrained(get_pipeline_class(model), model, torch.float32)
    message = str(raised.value)
    assert message.startswith("model.id=SG161222/RealVisXL_V4.0 could not be loaded")
    assert "model.weights=random" in message and "model.id=/path/to/a/downloaded/copy" in message
    assert "\n" not in message


def test_unknown_architecture_lists_the_shipped_ones() -> None:
    model = load_model("tiny_sdxl")
    model.architecture = "sd3"
    with pytest.raises(ModelLoadError, match=r"model.architecture=sd3: not shipped; choose one of .*sdxl"):
        build_pipeline(model, "t2i", torch.device("cpu"), torch.float32)


def get_pipeline_class(model):
    from hydra.utils import get_class

    return get_class(model.tasks["t2i"].pipeline)
