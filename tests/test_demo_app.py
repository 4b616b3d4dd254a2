"""The browser demo (fastvideo.entrypoints.demo_app) driven by a real headless Chromium
(Debian's ``chromium`` through Playwright): type a prompt, click Generate, a video appears.

Skipped only when no chromium binary is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from playwright.sync_api import sync_playwright  # noqa: E402

from fastvideo import DEMO_MODEL_ID, AsyncVideoEngine  # noqa: E402
from fastvideo.entrypoints.demo_app import build_demo  # noqa: E402

CHROMIUM = next(
    (p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None
)
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    engine = AsyncVideoEngine.from_pretrained(DEMO_MODEL_ID, executor="inproc")
    out = tmp_path_factory.mktemp("demo-videos")
    demo = build_demo(engine, model_name=DEMO_MODEL_ID, output_dir=out)
    try:
        for attempt in range(3):  # the port is free when picked; retry if taken meanwhile
            port = _free_port()
            try:
                demo.queue().launch(
                    server_name="127.0.0.1",
                    server_port=port,
                    prevent_thread_lock=True,
                    quiet=True,
                    allowed_paths=[str(out)],
                )
                break
            except OSError:
                if attempt == 2:
                    raise
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
        engine.shutdown()


def test_prompt_to_video_in_a_browser(demo_url, tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(demo_url, wait_until="domcontentloaded", timeout=60_000)
            page.locator("#prompt textarea").fill("a red fox running through the snow")
            assert not page.locator("#image").is_visible()  # text-to-video: no image input
            page.locator("#generate").click()
            video = page.locator("#video video")
            video.wait_for(state="attached", timeout=120_000)
            page.wait_for_function(
                "() => { const v = document.querySelector('#video video');"
                " return v && v.readyState >= 1 && v.duration > 0; }",
                timeout=60_000,
            )  # the browser loaded the mp4's metadata: it decodes what we wrote
            status = page.locator("#status").inner_text()
            src = video.get_attribute("src")
            duration = page.evaluate("document.querySelector('#video video').duration")
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\nscreenshot: {shot}\nstatus: {status!r}\nvideo: {src} ({duration:.3f} s)")
        finally:
            browser.close()
    assert "Done" in status
    assert src and src.split("?")[0].endswith(".mp4")
    assert duration > 0
    assert shot.stat().st_size > 0
