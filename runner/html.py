"""The report as one self-contained HTML file: the Markdown rendered, its plots and images inside it as data
URIs (images as thumbnails), so it reads the same from disk, from MLflow's Artifacts tab, or mailed."""

import base64
import io
import re
from pathlib import Path

import markdown
from PIL import Image

# Thumbnails show 200 px wide; embedded at 240 px, JPEG quality 80. At 320 px and quality 85 the H100 grid's
# 36 random-weight pictures (noise, which JPEG barely compresses) made a 2.4 MB report; now under 1 MB.
THUMBNAIL_PX = 240
THUMBNAIL_QUALITY = 80

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 3px 7px; }
th { background: #f3f3f3; }
img.plot { max-width: 100%; display: block; margin: 1em 0; }
figure { display: inline-block; margin: 0 8px 8px 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; text-align: center; }
img.thumb { width: 200px; display: block; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
"""


def to_html(text: str, title: str, folder: Path) -> str:
    """``text`` (Markdown whose images are files under ``folder``) as HTML with every image embedded."""
    body = markdown.markdown(text, extensions=["tables"])
    body = re.sub(r'<img alt="([^"]*)" src="([^"]+)" />', lambda m: _embedded(m.group(1), folder / m.group(2)), body)
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def _embedded(alt: str, path: Path) -> str:
    """The image as a data URI; a run's image as a captioned thumbnail (the caption names its accelerator)."""
    if not path.is_file():
        return f"<span>({alt}: image missing)</span>"
    if path.parent.name == "plots":
        data, kind, css = path.read_bytes(), "png", "plot"
    else:
        with Image.open(path) as image:
            thumbnail = image.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            thumbnail.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
        data, kind, css = buffer.getvalue(), "jpeg", "thumb"
    image = f'<img class="{css}" alt="{alt}" src="data:image/{kind};base64,{base64.b64encode(data).decode()}" />'
    return image if css == "plot" else f"<figure>{image}<figcaption>{alt}</figcaption></figure>"
