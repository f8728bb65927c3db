"""A headless-Chromium screenshot of an MLflow page after clicking what a person clicks first: the [+] of every
sweep row, so the jobs' names show (Chromium's --screenshot cannot click). Talks to Chromium over its DevTools
protocol with aiohttp, which MLflow already brings.
    python benchmarks/ui_screenshot.py URL OUT.png [WIDTHxHEIGHT]"""

import asyncio
import base64
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

EXPAND = 'button[data-component-id*="runnamecellrenderer"]'  # the [+] beside a parent run's name
RENDER_S = 8.0  # MLflow's page fetches its runs and renders them in a few seconds


async def screenshot(url: str, out: Path, width: int, height: int) -> int:
    """Write the page at ``url`` to ``out`` with every parent run expanded; return how many were."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    browser = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--remote-debugging-port={port}",
         f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        page = _first_page(port)
        async with aiohttp.ClientSession() as session, session.ws_connect(page, max_msg_size=0) as socket_:
            ids = itertools.count(1)

            async def call(method: str, **params: object) -> dict:
                number = next(ids)
                await socket_.send_json({"id": number, "method": method, "params": params})
                async for message in socket_:
                    answer = json.loads(message.data)
                    if answer.get("id") == number:
                        return answer.get("result", {})
                raise RuntimeError(f"Chromium closed the connection during {method}")

            await call("Page.enable")
            await call("Page.navigate", url=url)
            await asyncio.sleep(RENDER_S)
            clicked = await call(
                "Runtime.evaluate",
                expression=f"Array.from(document.querySelectorAll('{EXPAND}')).map(b => b.click()).length",
                returnByValue=True,
            )
            await asyncio.sleep(2.0)
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
            return int(clicked.get("result", {}).get("value", 0))
    finally:
        browser.kill()


def _first_page(port: int) -> str:
    """The DevTools WebSocket of Chromium's first tab, once Chromium answers (within 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
            return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        except (OSError, StopIteration):
            if time.monotonic() > deadline:
                raise SystemExit(f"Chromium did not open its DevTools port {port} within 10 s") from None
            time.sleep(0.2)


def main() -> None:
    url, out = sys.argv[1], Path(sys.argv[2])
    width, height = (int(n) for n in (sys.argv[3] if len(sys.argv) > 3 else "1600x1000").split("x"))
    expanded = asyncio.run(screenshot(url, out, width, height))
    print(f"{out} ({expanded} run(s) expanded)")


if __name__ == "__main__":
    main()
