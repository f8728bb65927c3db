"""Image quality: CLIP score against the prompts, similarity to the un-accelerated images, broken output.

- ``clip_score``: torchmetrics' CLIPScore (100 x cosine of image and prompt embeddings, averaged, floored at
  0) with a pinned CLIP model. transformers 5 returns output objects from ``get_*_features`` where
  torchmetrics expects tensors; ``FeatureTensors`` hands it tensors whichever version is installed.
- ``similarity``: SSIM and PSNR (torchmetrics, images scaled to [0, 1]) of every image against the image of
  the same name (same call, prompt and seed) in the baseline run. PSNR of identical images is infinite and
  reported as ``PSNR_CAP_DB``.
- ``broken_images``: images that are all black, all white or a single colour; NaN or infinity anywhere in a
  pipeline turns into black pixels on the way to PIL, so all-black is how a NaN image shows.
"""

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.multimodal.clip_score import CLIPScore

from runner.config import Config, digest, image_facts
from runner.errors import RunnerError
from runner.pipelines import clip_tokenizer
from runner.record import Quality

PSNR_CAP_DB = 100.0
TINY = "tiny"


class QualityError(RunnerError):
    """A quality model that cannot be loaded; the message names it and the ways around it."""


class FeatureTensors(torch.nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` return tensors, as torchmetrics wants."""

    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _projected(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _projected(self.clip.get_text_features(*args, **kwargs))


def _projected(output: object) -> torch.Tensor:
    # transformers 4 returns the projected embeddings; 5 returns them as the output's pooler_output
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class Clip:
    name: str
    model: torch.nn.Module
    processor: object


def load_clip(name: str, revision: str | None) -> Clip:
    """The CLIP model ``name`` (a hub id, a local folder, or ``tiny``), in eval mode on the CPU."""
    if name == TINY:
        return tiny_clip()
    try:
        model = transformers.CLIPModel.from_pretrained(name, revision=revision, use_safetensors=True)
        processor = transformers.CLIPProcessor.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as error:
        raise QualityError(
            f"quality.clip_model={name} could not be loaded ({str(error).splitlines()[0][:160]}); with no hub "
            "access use quality.clip_model=/path/to/a/downloaded/copy, or quality.clip_model=tiny (its scores "
            "mean nothing)"
        ) from error
    return Clip(name, model.eval(), processor)


def tiny_clip() -> Clip:
    """A small CLIP with seeded random weights and the in-code tokenizer: for demos and tests only."""
    tower = {  # both encoders alike: tiny, and projecting into one 16-wide space
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 16,
    }
    text = transformers.CLIPTextConfig(
        vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1, **tower
    )
    vision = transformers.CLIPVisionConfig(image_size=32, patch_size=8, **tower)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.CLIPModel(config).eval()
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())
    return Clip(TINY, model, processor)


def clip_score(clip: Clip, images: list[Image.Image], prompts: list[str], device: torch.device) -> float:
    """torchmetrics' CLIP score of ``images`` against their ``prompts`` (same order), on ``device``."""
    metric = CLIPScore(model_name_or_path=lambda: (FeatureTensors(clip.model), clip.processor)).to(device)
    with torch.no_grad(), warnings.catch_warnings():
        # CLIP reads 77 tokens; cutting a longer prompt there is what the score means, not news for every job
        warnings.filterwarnings("ignore", message="Encountered caption longer than max_position_embeddings")
        metric.update([_tensor(image).to(device) for image in images], prompts)
        return float(metric.compute())


def similarity(
    images: dict[str, Image.Image], baseline: dict[str, Image.Image], device: torch.device
) -> dict[str, float]:
    """SSIM and PSNR of each image against the baseline's image of the same name; empty if none match."""
    names = sorted(set(images) & set(baseline))
    ssim, psnr = [], []
    for name in names:
        if images[name].size != baseline[name].size:
            (w, h), (bw, bh) = images[name].size, baseline[name].size
            raise QualityError(f"image {name} is {w}x{h} here but {bw}x{bh} in the baseline")
        ours, theirs = (_tensor(i).to(device).float().unsqueeze(0) / 255 for i in (images[name], baseline[name]))
        ssim.append(float(structural_similarity_index_measure(ours, theirs, data_range=1.0)))
        psnr.append(min(float(peak_signal_noise_ratio(ours, theirs, data_range=1.0)), PSNR_CAP_DB))
    if not names:
        return {}
    identical = sum(np.array_equal(np.asarray(images[n]), np.asarray(baseline[n])) for n in names)
    return {
        "ssim_vs_baseline": float(np.mean(ssim)),
        "ssim_vs_baseline_min": float(np.min(ssim)),
        "psnr_vs_baseline": float(np.mean(psnr)),
        "images_compared": float(len(names)),
        "identical_to_baseline": identical / len(names),
    }


def broken_images(images: dict[str, Image.Image]) -> list[str]:
    """A line for each image that is all black, all white or one flat colour."""
    found = []
    for name, image in images.items():
        pixels = np.asarray(image.convert("RGB"))
        if pixels.max() <= 4:
            found.append(f"{name}: all black (NaN or overflow in the pipeline shows as black)")
        elif pixels.min() >= 251:
            found.append(f"{name}: all white")
        elif (pixels == pixels[0, 0]).all():
            found.append(f"{name}: one flat colour {tuple(int(c) for c in pixels[0, 0])}")
    return found


def unaffected(
    similar: dict[str, float],
    clip: float | None,
    baseline_clip: float | None,
    broken: list[str],
    min_ssim: float,
    max_clip_drop_pct: float,
) -> tuple[bool, str]:
    """Whether quality counts as unaffected against the baseline, and why (one line)."""
    if broken:
        return False, f"{len(broken)} broken image(s)"
    ssim = similar["ssim_vs_baseline"]
    if ssim < min_ssim:
        return False, f"SSIM {ssim:.4f} < {min_ssim}"
    if clip is None or baseline_clip is None:
        return True, f"SSIM {ssim:.4f} >= {min_ssim} (CLIP scores not compared: meaningless here)"
    change_pct = 100 * (clip - baseline_clip) / baseline_clip if baseline_clip > 0 else 0.0
    if change_pct < -max_clip_drop_pct:
        return False, f"CLIP score {change_pct:+.2f}% against the baseline's (more than {max_clip_drop_pct}% lower)"
    return True, f"SSIM {ssim:.4f} >= {min_ssim}, CLIP score {change_pct:+.2f}% against the baseline's"


def judge(
    images: dict[str, Image.Image],
    baseline_images: dict[str, Image.Image],
    clip: float | None,
    baseline_clip: float | None,
    broken: list[str],
    min_ssim: float,
    max_clip_drop_pct: float,
    device: torch.device,
) -> tuple[dict[str, float], Quality, str]:
    """Similarity to a baseline run's images, the verdict and why. ``clip`` and ``baseline_clip`` are None
    where CLIP scores mean nothing (random weights, tiny CLIP)."""
    similar = similarity(images, baseline_images, device)
    if not similar:
        return {}, Quality.UNKNOWN, "no images in common with the baseline (it logged none, or other prompts)"
    ok, why = unaffected(similar, clip, baseline_clip, broken, min_ssim, max_clip_drop_pct)
    return similar, Quality.UNAFFECTED if ok else Quality.AFFECTED, why


def image_key(cfg: Config, device: torch.device, dtype: str, prompts: list[str], image: Image.Image | None) -> str:
    """A digest of everything that decides a job's images except the accelerator.

    Runs with the same key and no accelerator produce the same images, so the key finds a run's baseline:
    the settings the schema marks as deciding the images (runner/config.py: model and weights, scheduler,
    task and its arguments, size, steps, guidance, seed, negative prompt), and what the job resolved from
    them: the prompts, the dtype, the device's kind, and for image-to-image the input's pixels.
    """
    return digest(
        {
            **image_facts(cfg),
            "prompts": prompts,
            "dtype": dtype,
            "device": device.type,
            "input": hashlib.sha256(image.tobytes()).hexdigest() if image else None,
        }
    )


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
