"""The image-to-image input: a file, a URL, a text-to-image run's image, or the built-in picture."""

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from runner.inputs import InputError, builtin_picture, load_image


def nowhere(model: str, height: int, width: int) -> None:
    return None


def test_builtin_picture_at_the_job_size() -> None:
    image, origin = load_image(None, "m", 96, 64, nowhere)
    assert image.size == (96, 64) and image.mode == "RGB" and origin == "built-in"
    assert len(set(image.getdata())) > 10  # a picture, not a flat colour
    assert builtin_picture(64, 64).tobytes() == builtin_picture(64, 64).tobytes()


def test_file_is_resized_to_the_job_size(tmp_path: Path) -> None:
    Image.new("RGBA", (300, 200), (10, 20, 30, 255)).save(tmp_path / "in.png")
    image, origin = load_image(str(tmp_path / "in.png"), "m", 128, 128, nowhere)
    assert image.size == (128, 128) and image.mode == "RGB" and origin.endswith("in.png")


def test_missing_file_names_the_value_and_the_alternatives() -> None:
    with pytest.raises(InputError, match=r"task.image=/no/such.png: no such file; give an image file or an http"):
        load_image("/no/such.png", "m", 64, 64, nowhere)


def test_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(str(tmp_path / "notes.txt"), "m", 64, 64, nowhere)


def test_url_is_downloaded(tmp_path: Path) -> None:
    Image.new("RGB", (50, 50), (200, 0, 0)).save(tmp_path / "red.png")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        image, origin = load_image(f"{base}/red.png", "m", 64, 64, nowhere)
        assert image.size == (64, 64) and image.getpixel((10, 10)) == (200, 0, 0) and origin == f"{base}/red.png"
        with pytest.raises(InputError, match="could not download"):
            load_image(f"{base}/missing.png", "m", 64, 64, nowhere)
    finally:
        server.shutdown()


def test_text_to_image_run_is_looked_up_for_the_right_model_and_size(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (0, 200, 0)).save(tmp_path / "000.png")
    asked = []

    def find(model: str, height: int, width: int) -> tuple[Path, str]:
        asked.append((model, height, width))
        return tmp_path / "000.png", "run abc images/000.png"

    image, origin = load_image("t2i", "realvisxl_v4", 64, 48, find)
    assert image.size == (64, 48) and origin == "run abc images/000.png"
    load_image("t2i:sdxl_base", "instruct_pix2pix", 64, 48, find)
    assert asked == [("realvisxl_v4", 48, 64), ("sdxl_base", 48, 64)]


def test_missing_text_to_image_run_says_what_to_run_first() -> None:
    with pytest.raises(InputError, match=r"no finished t2i run of sdxl_base at 64x64 .* run model=sdxl_base task=t2i"):
        load_image("t2i:sdxl_base", "instruct_pix2pix", 64, 64, nowhere)
