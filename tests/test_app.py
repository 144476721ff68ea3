"""The web app (app.py) used as a person would: a real headless Chromium (Debian's `chromium`, driven by Playwright)
types a prompt, presses Generate, hears the stream start before generation ends, downloads the clip; bad input
shows the validation message on the page. Skipped, with the reason, where gradio, playwright or chromium is missing
(`make test` installs them: the `app` extra and `apt-get install chromium ffmpeg`)."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e .[app])")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[app])")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium browser on PATH (apt-get install chromium)", allow_module_level=True)
if shutil.which("ffmpeg") is None:
    pytest.skip("no ffmpeg on PATH: Gradio streams audio through it (apt-get install ffmpeg)", allow_module_level=True)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPT = "a plucked string arpeggio in e minor with drums, 140 bpm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w+")
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--checkpoints",
                               str(tmp_path_factory.mktemp("checkpoints"))], cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert server.poll() is None, open(log.name).read()
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def page(app_url):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--autoplay-policy=no-user-gesture-required", "--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(app_url)
        yield page
        browser.close()


def playback_and_status(page) -> tuple[float, str]:
    """`(furthest playback position of the page's audio elements in s, the status text)`."""
    position = page.evaluate("() => Math.max(0, ...[...document.querySelectorAll('audio')].map(a => a.currentTime))")
    return position, page.get_by_label("Status").input_value()


def test_streamed_audio_plays_before_generation_ends_and_the_file_downloads(page, tmp_path):
    import soundfile

    page.get_by_label("Prompts (one per line)").fill(PROMPT)
    page.get_by_label("Duration (s)").fill("24")
    page.get_by_role("button", name="Generate").click()
    played_while_generating, status = False, ""
    deadline = time.time() + 240
    while not status.startswith("Finished") and time.time() < deadline:
        position, status = playback_and_status(page)
        played_while_generating |= position > 0 and status.startswith("Generating")
        time.sleep(0.2)
    assert status.startswith("Finished"), status
    assert played_while_generating, "no audio played before generation ended"
    with page.expect_download() as download:
        page.locator('a[download="clip-1.wav"]').click()
    path = tmp_path / "clip.wav"
    download.value.save_as(path)
    info = soundfile.info(str(path))
    assert info.samplerate == 32000 and info.channels == 1 and info.frames == 24 * 32000


def test_bad_input_shows_the_validation_message(page):
    page.get_by_label("Prompts (one per line)").fill(PROMPT)
    page.get_by_label("Top-p").fill("2")
    page.get_by_role("button", name="Generate").click()
    playwright.expect(page.get_by_text("top_p must be a finite number in [0, 1]", exact=False)).to_be_visible(timeout=60_000)
