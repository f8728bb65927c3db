"""Image quality: CLIP score, similarity to the baseline, broken output, the verdict, prompt sets; and the
whole path in real sweeps read back from MLflow."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from runner.config import compose_job, to_config
from runner.inputs import InputError, load_prompts
from runner.quality import (
    PSNR_CAP_DB,
    FeatureTensors,
    QualityError,
    broken_images,
    clip_score,
    image_key,
    load_clip,
    similarity,
    tiny_clip,
    unaffected,
)

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (128, 64, 200)]
WORDS = ["a red square", "green", "the sea", "yellow light", "cyan", "purple rain", "a lighthouse", "snow"]


def manual_cosines(clip, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
    with torch.no_grad():
        pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = clip.processor(text=prompts, return_tensors="pt", padding=True)
        image_features = FeatureTensors(clip.model).get_image_features(pixels)
        text_features = FeatureTensors(clip.model).get_text_features(tokens["input_ids"], tokens["attention_mask"])
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (100 * (image_features * text_features).sum(-1)).numpy()


def test_clip_score_is_torchmetrics_mean_cosine_on_the_tiny_clip() -> None:
    clip = tiny_clip()
    pairs = [(Image.new("RGB", (64, 64), c), w) for c in COLOURS for w in WORDS]
    cosines = manual_cosines(clip, [p[0] for p in pairs], [p[1] for p in pairs])
    positive = [pair for pair, cosine in zip(pairs, cosines, strict=True) if cosine > 0][:4]
    assert len(positive) == 4, "the tiny CLIP should find some image-prompt pairs alike"
    images, prompts = [p[0] for p in positive], [p[1] for p in positive]
    expected = float(manual_cosines(clip, images, prompts).mean())
    score = clip_score(clip, images, prompts, torch.device("cpu"))
    assert score == pytest.approx(expected, rel=1e-4) and 0 < score <= 100
    assert clip_score(tiny_clip(), images, prompts, torch.device("cpu")) == pytest.approx(score)  # seeded


def test_feature_tensors_accept_both_transformers_conventions() -> None:
    class Old(torch.nn.Module):  # transformers 4: tensors
        config = None

        def get_image_features(self, x):
            return x * 2

        def get_text_features(self, x):
            return x * 3

    x = torch.ones(2, 4)
    assert torch.equal(FeatureTensors(Old()).get_image_features(x), x * 2)
    assert torch.equal(FeatureTensors(Old()).get_text_features(x), x * 3)
    clip = tiny_clip()  # the installed transformers (5 here: output objects)
    out = FeatureTensors(clip.model).get_image_features(torch.zeros(1, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 16)


def test_real_clip_without_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QualityError) as raised:
        load_clip("openai/clip-vit-base-patch16", None)
    message = str(raised.value)
    assert message.startswith("quality.clip_model=openai/clip-vit-base-patch16 could not be loaded")
    assert "quality.clip_model=/path/to/a/downloaded/copy" in message and "quality.clip_model=tiny" in message


def noise(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_similarity_image_by_image() -> None:
    cpu = torch.device("cpu")
    ours = {"000.png": noise(0), "001.png": noise(1), "002.png": noise(2)}
    same = similarity(ours, dict(ours), cpu)
    assert same["ssim_vs_baseline"] == pytest.approx(1.0) and same["psnr_vs_baseline"] == PSNR_CAP_DB
    assert same["identical_to_baseline"] == 1.0 and same["images_compared"] == 3
    # Only images of the same name are compared; one differs completely.
    other = similarity(ours, {"000.png": ours["000.png"], "001.png": noise(9), "099.png": noise(3)}, cpu)
    assert other["images_compared"] == 2 and other["identical_to_baseline"] == 0.5
    assert other["ssim_vs_baseline_min"] < 0.1 < other["ssim_vs_baseline"] < 0.6
    assert similarity(ours, {"099.png": noise(3)}, cpu) == {}
    with pytest.raises(QualityError, match=r"image 000.png is 64x64 here but 32x32 in the baseline"):
        similarity(ours, {"000.png": noise(0, 32)}, cpu)


def test_broken_images_are_named() -> None:
    images = {
        "black.png": Image.new("RGB", (8, 8)),
        "white.png": Image.new("RGB", (8, 8), (255, 255, 255)),
        "grey.png": Image.new("RGB", (8, 8), (128, 128, 128)),
        "fine.png": noise(0, 8),
    }
    found = broken_images(images)
    assert found == [
        "black.png: all black (NaN or overflow in the pipeline shows as black)",
        "white.png: all white",
        "grey.png: one flat colour (128, 128, 128)",
    ]


def test_verdict() -> None:
    good = {"ssim_vs_baseline": 0.97}
    assert unaffected(good, 30.0, 30.1, [], 0.95, 1.0) == (
        True,
        "SSIM 0.9700 >= 0.95, CLIP score -0.33% against the baseline's",
    )
    assert unaffected(good, 29.0, 30.0, [], 0.95, 1.0)[0] is False
    assert unaffected({"ssim_vs_baseline": 0.9}, 30.0, 30.0, [], 0.95, 1.0) == (False, "SSIM 0.9000 < 0.95")
    assert unaffected(good, None, None, [], 0.95, 1.0)[1].endswith("(CLIP scores not compared: meaningless here)")
    assert unaffected(good, 30.0, 30.0, ["x.png: all black"], 0.95, 1.0) == (False, "1 broken image(s)")


def test_image_key_changes_with_what_decides_the_images_but_not_the_accelerator() -> None:
    cpu = torch.device("cpu")

    def key(*overrides: str, prompts: tuple[str, ...] = ("a",), image: Image.Image | None = None) -> str:
        return image_key(to_config(compose_job(*overrides)), cpu, "fp32", list(prompts), image)

    base = key()
    assert key("accelerator=none", "runs=3", "warmup=0", "pin_cpu=false") == base
    for changed in (
        key("seed=1"),
        key("res=512"),
        key("steps=7"),
        key("guidance_scale=2"),
        key(prompts=("b",)),
        key("model=tiny_pix2pix", "task=i2i", image=noise(0)),
        key("negative_prompt=blurry"),
    ):
        assert changed != base
    assert key("task=i2i", image=noise(0)) != key("task=i2i", image=noise(1))


def test_prompt_sets(tmp_path: Path) -> None:
    assert load_prompts(None, "one prompt") == ["one prompt"]
    assert len(load_prompts("photo", "x")) == 8 and len(load_prompts("edits", "x")) == 8
    mine = tmp_path / "mine.txt"
    mine.write_text("# my prompts\nfirst\n\n second \n")
    assert load_prompts(str(mine), "x") == ["first", "second"]
    with pytest.raises(InputError, match=r"prompts=nope: neither a shipped prompt set \(edits, photo\) nor a file"):
        load_prompts("nope", "x")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"), "x")


def test_accelerated_runs_are_compared_with_the_baseline_in_a_sweep(cli, test_accelerators: str) -> None:
    sweep = cli("-m", "accelerator=none,same,perturb,blackout", "res=64", "runs=3", test_accelerators)
    runs = sweep.runs()
    assert sweep.code == 0, sweep.output  # broken images are a quality verdict, not a failed job
    none, same, perturb, blackout = (runs[f"tiny/t2i/64/{a}"] for a in ("none", "same", "perturb", "blackout"))
    assert len({run.data.tags["image_key"] for run in runs.values()}) == 1
    assert none.data.tags["baseline_run"] == "self" and none.data.tags["quality_unaffected"] == "true"
    assert none.data.tags["quality_baseline_run"] == "self" and "speedup_vs_baseline" not in none.data.metrics
    assert "ssim_vs_baseline" not in none.data.metrics
    for run in runs.values():
        assert (
            run.data.tags["clip_model"] == "tiny" and run.data.tags["clip_score_meaningful"] == "false: random weights"
        )
        assert 0 <= run.data.metrics["clip_score"] <= 100

    assert same.data.tags["baseline_run"] == same.data.tags["quality_baseline_run"] == none.info.run_id
    assert same.data.metrics["ssim_vs_baseline"] == pytest.approx(1.0)
    assert same.data.metrics["psnr_vs_baseline"] == PSNR_CAP_DB and same.data.metrics["identical_to_baseline"] == 1
    assert same.data.metrics["images_compared"] == 3 and same.data.tags["quality_unaffected"] == "true"

    assert perturb.data.metrics["ssim_vs_baseline"] < 0.95 and perturb.data.metrics["identical_to_baseline"] == 0
    assert perturb.data.tags["quality_unaffected"] == "false"
    assert perturb.data.tags["quality_verdict"].startswith("SSIM 0.")

    assert blackout.data.tags["broken_output"].startswith("000_p00_seed0.png: all black")
    assert blackout.data.tags["quality_unaffected"] == "false"
    assert blackout.data.tags["quality_verdict"] == "3 broken image(s)"
    assert "WARNING: 3 broken image(s)" in sweep.output


def test_missing_baseline_is_said_not_guessed(cli, test_accelerators: str) -> None:
    sweep = cli("accelerator=same", "res=64", "runs=2", test_accelerators)
    assert sweep.code == 0, sweep.output
    [run] = sweep.runs().values()
    assert run.data.tags["quality_verdict"].startswith("no baseline: run accelerator=none for this job too")
    assert run.data.tags["quality_unaffected"] == "unknown" and "ssim_vs_baseline" not in run.data.metrics
    assert run.data.tags["pace"] == "no baseline" and "speedup_vs_baseline" not in run.data.metrics
    assert "[tiny/t2i/64/same] CLIP score" in sweep.output and "Encountered caption" not in sweep.output


def test_prompt_set_gives_one_image_per_prompt_and_seed(cli) -> None:
    sweep = cli("prompts=photo", "res=64", "runs=3", "warmup=0")
    assert sweep.code == 0, sweep.output
    [run] = sweep.runs().values()
    client = MlflowClient(sweep.tracking_uri)
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
    assert names == ["images/000_p00_seed0.png", "images/001_p01_seed1.png", "images/002_p02_seed2.png"]
    assert run.data.params["prompts"] == "photo" and run.data.params["prompt_count"] == "8"


def test_runs_of_different_lengths_compare_the_images_they_share(cli, test_accelerators: str) -> None:
    assert cli("res=64", "runs=3").code == 0
    sweep = cli("accelerator=same", "res=64", "runs=2", test_accelerators)
    assert sweep.code == 0, sweep.output
    runs = sweep.runs()
    assert runs["tiny/t2i/64/same"].data.metrics["images_compared"] == 2
    assert runs["tiny/t2i/64/same"].data.tags["baseline_run"] == runs["tiny/t2i/64/none"].info.run_id


@pytest.mark.gpu
def test_quality_metrics_run_on_cuda() -> None:
    cuda = torch.device("cuda")
    images = [noise(0), noise(1)]
    assert 0 <= clip_score(tiny_clip(), images, ["a", "b"], cuda) <= 100
    assert similarity({"a.png": images[0]}, {"a.png": images[0]}, cuda)["ssim_vs_baseline"] == pytest.approx(1.0)
