"""What a task's pipeline is given: the prompts, and the input image of image-to-image tasks.

``prompts`` names a prompt set shipped in ``runner/prompts/`` (``photo``, ``edits``) or a file with one
prompt a line (``#`` starts a comment); empty, the job uses its single ``prompt``. Timed call ``i`` uses
prompt ``i mod P`` with seed ``seed + i``: one image per prompt and seed.

``task.image`` is a file path, an http(s) URL, ``t2i`` (the first image of the text-to-image run of the
same model and size with accelerator=none, as the original report did), ``t2i:<model>`` (another model's),
or empty for a built-in picture. The image is converted to RGB and resized to the job's resolution, so
every accelerator of one model and size starts from the same pixels.
"""

import io
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from runner.errors import RunnerError

TIMEOUT_S = 30
PROMPT_SETS = Path(__file__).parent / "prompts"


class InputError(RunnerError, ValueError):
    """An input that cannot be read; the message names the key, the value and the alternatives."""


ALTERNATIVES = (
    "give an image file or an http(s) URL, t2i (or t2i:<model>) for a text-to-image run's image, "
    "or leave task.image empty for the built-in picture"
)

# (model, height, width) -> local file of that t2i run's first image and where it came from, or None
FindT2iImage = Callable[[str, int, int], tuple[Path, str] | None]


def load_prompts(prompts: str | None, prompt: str, key: str = "prompts") -> list[str]:
    """The job's prompts, in the order the timed calls cycle through them (``key``: the setting that named
    ``prompts``, for the error)."""
    if not prompts:
        return [prompt]
    shipped = PROMPT_SETS / f"{prompts}.txt"
    path = shipped if shipped.is_file() else Path(prompts).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in PROMPT_SETS.glob("*.txt")))
        raise InputError(f"{key}={prompts}: neither a shipped prompt set ({names}) nor a file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise InputError(f"{key}={prompts}: {path} holds no prompts (one a line; # starts a comment)")
    return found


def load_image(
    source: str | None, model: str, width: int, height: int, find_t2i_image: FindT2iImage
) -> tuple[Image.Image, str]:
    """The input image at ``width`` x ``height``, and a short description of its source for the run's tags."""
    if not source:
        return builtin_picture(width, height), "built-in"
    if source == "t2i" or source.startswith("t2i:"):
        source_model = source.partition(":")[2] or model
        found = find_t2i_image(source_model, height, width)
        if found is None:
            raise InputError(
                f"task.image={source}: no finished t2i run of {source_model} at {height}x{width} with "
                f"accelerator=none in this experiment; run model={source_model} task=t2i first, or {ALTERNATIVES}"
            )
        path, origin = found
        return _open(path, source).resize((width, height), Image.Resampling.LANCZOS), origin
    if source.startswith(("http://", "https://")):
        return _open(io.BytesIO(_download(source)), source).resize((width, height), Image.Resampling.LANCZOS), source
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"task.image={source}: no such file; {ALTERNATIVES}")
    return _open(path, source).resize((width, height), Image.Resampling.LANCZOS), str(path)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return response.read()
    except OSError as error:
        raise InputError(f"task.image={url}: could not download ({error}); {ALTERNATIVES}") from error


def _open(file: Path | io.BytesIO, source: str) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except OSError as error:
        raise InputError(f"task.image={source}: not a readable image ({error}); {ALTERNATIVES}") from error


def builtin_picture(width: int, height: int) -> Image.Image:
    """A lighthouse on a rocky coast at sunset, drawn in code (matches the default text-to-image prompt)."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)
    for y in range(horizon):  # sky: deep blue to orange
        f = y / horizon
        draw.line([(0, y), (width, y)], fill=(int(40 + 215 * f), int(60 + 100 * f), int(120 - 60 * f)))
    for y in range(horizon, height):  # sea
        f = (y - horizon) / max(1, height - horizon)
        draw.line([(0, y), (width, y)], fill=(int(30 + 20 * f), int(70 + 30 * f), int(110 + 20 * f)))
    w, h = width / 100, height / 100
    draw.ellipse([62 * w, 44 * h, 78 * w, 60 * h], fill=(255, 200, 90))  # sun
    draw.polygon([(0, 100 * h), (0, 70 * h), (18 * w, 58 * h), (40 * w, 66 * h), (55 * w, 100 * h)], fill=(60, 50, 45))
    draw.polygon([(22 * w, 60 * h), (24 * w, 22 * h), (30 * w, 22 * h), (32 * w, 60 * h)], fill=(235, 235, 230))
    for band in (30, 44):  # red stripes
        draw.polygon(
            [(23.5 * w, (band + 6) * h), (23.8 * w, band * h), (30.2 * w, band * h), (30.5 * w, (band + 6) * h)],
            fill=(190, 40, 40),
        )
    draw.rectangle([23 * w, 16 * h, 31 * w, 22 * h], fill=(255, 240, 160))  # lamp room
    draw.polygon([(22 * w, 16 * h), (27 * w, 10 * h), (32 * w, 16 * h)], fill=(40, 40, 40))
    return image
