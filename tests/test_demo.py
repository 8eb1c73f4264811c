"""demo.py: its command line, and its page in a real browser.

The browser tests start `python demo.py` on 127.0.0.1 with a small synthetic model (the synthetic
pspnet50_ade20k weights with 41-pixel crops) and drive Debian's Chromium with Playwright (headless;
`apt-get install chromium`, which .ci/run does). They upload photos as a user would, run them, and
compare what the page shows and serves with what `pspnet.py` writes for the same photo and flags:
the class ids and colours byte for byte, the legend's shares against the ids counted with NumPy. No
request may leave 127.0.0.1. A screenshot of the page is saved beside the test's files.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from helpers import PROJECT_ROOT
from helpers import decoded
from helpers import run_cli
from helpers import save_image
from helpers import smooth_image
from pspnet_keras import palettes

DEMO = PROJECT_ROOT / "demo.py"
PHOTO = PROJECT_ROOT / "example_images" / "chelsea.png"
# Seconds for the server to say where it serves, and milliseconds for a run to show its result.
SERVE_TIMEOUT_S = 120
RUN_TIMEOUT_MS = 240_000
# Debian's Chromium as root in a closed network: no sandbox (root), no GPU, no background connections
# (the machine refuses them), as in the tool library's notes on browser tests.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run")
VIEWPORT = {"width": 1400, "height": 1800}
# A port nothing listens on: released weights that are missing are "downloaded" from it and fail at once.
CLOSED_PORT_URL = "http://127.0.0.1:9"
SHARE_PATTERN = re.compile(r"^([\d.]+) %$")
ADE20K_NAMES = [name for name, _ in palettes.ADE20K_CLASSES]


def demo_process(*args, **options):
    """Runs `python demo.py *args` to its end; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(DEMO), *map(str, args)], capture_output=True, text=True,
                          timeout=120, **options)


def test_help_names_the_options_and_the_requirements_file():
    result = demo_process("--help")
    assert result.returncode == 0
    for text in ("--port", "--host", "-m MODEL", "-w H5", "requirements-demo.txt", "Ctrl-C"):
        assert text in result.stdout


def test_missing_weights_file_is_one_line(tmp_path):
    result = demo_process("-w", tmp_path / "nowhere.h5")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"demo.py: error: {tmp_path / 'nowhere.h5'}: no such weights file\n"


def test_port_out_of_range_is_a_usage_error():
    result = demo_process("--port", "70000")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == "demo.py: error: argument --port: must be at most 65535, got 70000"


def test_without_gradio_the_line_says_what_to_install(tmp_path):
    """A module path where `import gradio` fails, as where Gradio is not installed."""
    (tmp_path / "gradio.py").write_text("raise ImportError(\"No module named 'gradio'\")\n")
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = demo_process(env=environment)
    assert result.returncode == 1
    assert result.stderr == (
        "demo.py: error: the page needs Gradio (No module named 'gradio'): "
        "python -m pip install -r requirements-demo.txt\n"
    )


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_port_in_use_is_one_line(small_weights):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = demo_process("-w", small_weights, "--port", port)
    assert result.returncode == 1
    assert result.stderr == (
        f"demo.py: error: 127.0.0.1:{port}: cannot serve there (Address already in use); choose another --port "
        "or --host\n"
    )


class Server:
    """`python demo.py` started in the background; `url` once it says where it serves, `stderr` its lines."""

    def __init__(self, *args, env):
        self.process = subprocess.Popen([sys.executable, str(DEMO), *map(str, args)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
        self.stderr = []
        self.served = threading.Event()
        self.url = None
        threading.Thread(target=self.read_stderr, daemon=True).start()

    def read_stderr(self):
        for line in self.process.stderr:
            self.stderr.append(line)
            found = re.search(r" on (http://\S+) ", line)
            if found and self.url is None:
                self.url = found.group(1)
                self.served.set()
        self.served.set()


@pytest.fixture(scope="module")
def server(small_weights, tmp_path_factory):
    """demo.py serving the small model on a free port of 127.0.0.1, Gradio's files in a folder of the test's."""
    folder = tmp_path_factory.mktemp("demo_server")
    environment = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"), "PSPNET_WEIGHTS_URL_BASE": CLOSED_PORT_URL}
    started = Server("-w", small_weights, "--port", free_port(), env=environment)
    assert started.served.wait(SERVE_TIMEOUT_S) and started.url, "".join(started.stderr)
    yield started
    if started.process.poll() is None:
        started.process.kill()
        started.process.wait()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's Chromium is not installed: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=list(CHROMIUM_ARGS))
        yield launched
        launched.close()


class Page:
    """The demo page open in the browser; `outside` lists the requests it made beyond the server."""

    def __init__(self, browser, url):
        self.url = url
        self.outside = []
        self.page = browser.new_page(viewport=VIEWPORT)
        self.page.route("**/*", self.route)
        self.page.goto(url)
        self.page.wait_for_selector("#segment")

    def route(self, route):
        if route.request.url.startswith(self.url):
            route.continue_()
        else:
            self.outside.append(route.request.url)
            route.abort()

    def run(self, photo, mode="one crop", flip=True, model=None):
        """Uploads `photo`, sets the protocol and the model, clicks Segment and waits for the status line
        of the run (its data-run, the run's number, changes)."""
        self.wait_for_run(self.start_run(photo, mode, flip, model))

    def start_run(self, photo, mode="one crop", flip=True, model=None):
        """Uploads `photo`, sets the protocol and the model, clicks Segment; returns the run number the
        status line showed before."""
        self.page.set_input_files("#photo input[type=file]", str(photo))
        self.page.wait_for_selector("#photo img")
        if model is not None:
            self.page.click("#model input")
            self.page.get_by_role("option", name=model).click()
        self.page.get_by_label(mode).check()
        self.page.locator("#flip input[type=checkbox]").set_checked(flip)
        previous = self.page.eval_on_selector("#status", "status => status.querySelector('p')?.dataset.run ?? ''")
        self.page.click("#segment")
        return previous

    def wait_for_run(self, previous):
        """Waits for the status line of a run after the one numbered `previous`."""
        self.page.wait_for_function(
            "previous => { const status = document.querySelector('#status p');"
            " return status !== null && status.dataset.run !== previous; }",
            arg=previous, timeout=RUN_TIMEOUT_MS, polling=50,
        )

    def status(self):
        """(text, is an error) of the status line."""
        line = self.page.query_selector("#status p")
        return line.inner_text(), "error" in line.get_attribute("class")

    def fetched(self, url):
        """The bytes the server serves at `url`."""
        response = self.page.request.get(url)
        assert response.ok, url
        return response.body()

    def downloads(self):
        """{file name: bytes} of the download links."""
        links = self.page.query_selector_all("#downloads a[download]")
        return {Path(link.get_attribute("href")).name: self.fetched(link.get_attribute("href")) for link in links}

    def legend(self):
        """[(class id, name, share in per cent, swatch colour)] of the legend's rows, top to bottom."""
        rows = []
        for row in self.page.query_selector_all("#legend tbody tr"):
            cells = [cell.inner_text().strip() for cell in row.query_selector_all("td")]
            share = float(SHARE_PATTERN.match(cells[3]).group(1))
            swatch = row.query_selector(".swatch").evaluate("element => getComputedStyle(element).backgroundColor")
            rows.append((int(cells[1]), cells[2], share, swatch))
        return rows


@pytest.fixture(scope="module")
def page(browser, server):
    """The page open in a new tab."""
    opened = Page(browser, server.url)
    yield opened
    opened.page.close()


@pytest.fixture(scope="module")
def cli_outputs(small_weights, tmp_path_factory):
    """What pspnet.py writes for PHOTO with the default protocol: {suffix: path}."""
    folder = tmp_path_factory.mktemp("demo_cli")
    result = run_cli("-w", small_weights, "-i", PHOTO, "-o", folder / "chelsea.png", "-q")
    assert result.returncode == 0, result.stderr
    return {suffix: folder / f"chelsea{suffix}" for suffix in ("_seg.png", "_seg_blended.png", "_seg_read.png",
                                                               "_probs.png")}


@pytest.fixture(scope="module")
def photo_run(page, tmp_path_factory):
    """The page after a run of PHOTO with the default protocol; a screenshot of it is saved."""
    page.run(PHOTO)
    page.page.wait_for_selector("#annotated img.mask")
    screenshot = tmp_path_factory.mktemp("demo_screenshot") / "demo_page.png"
    page.page.screenshot(path=screenshot, full_page=True)
    print(f"screenshot of the page: {screenshot}")
    return page


@pytest.mark.slow
def test_photo_gives_pspnet_py_s_files(photo_run, cli_outputs):
    """The downloads (ids, colours), the blended image and the confidence map the page shows are the files
    pspnet.py writes for the photo."""
    text, error = photo_run.status()
    assert not error and re.fullmatch(r"chelsea.png: 451 x 300, small, one crop, flipped: 2 forward passes, [\d.]+ s", text)
    downloads = photo_run.downloads()
    assert sorted(downloads) == ["chelsea_seg.png", "chelsea_seg_read.png"]
    for name, content in downloads.items():
        assert content == cli_outputs[name.removeprefix("chelsea")].read_bytes(), name
    for element, suffix in (("#blended", "_seg_blended.png"), ("#confidence", "_probs.png")):
        shown = photo_run.page.query_selector(f"{element} img").get_attribute("src")
        assert photo_run.fetched(shown) == cli_outputs[suffix].read_bytes(), element


@pytest.mark.slow
def test_legend_lists_the_classes_of_the_ids_by_share(photo_run, cli_outputs):
    class_ids = decoded(cli_outputs["_seg_read.png"])
    counts = np.bincount(class_ids.ravel(), minlength=len(ADE20K_NAMES))
    legend = photo_run.legend()
    assert [class_id for class_id, *_ in legend] == sorted(np.flatnonzero(counts), key=lambda k: (-counts[k], k))
    assert abs(sum(share for _, _, share, _ in legend) - 100) <= 0.005 * len(legend) + 1e-9
    for class_id, name, share, swatch in legend:
        assert name == ADE20K_NAMES[class_id]
        assert share == pytest.approx(100 * counts[class_id] / class_ids.size, abs=0.005 + 1e-9)
        assert swatch == "rgb({}, {}, {})".format(*palettes.ADE20K_CLASSES[class_id][1])
    buttons = [button.inner_text() for button in photo_run.page.query_selector_all("#annotated .legend-item")]
    assert buttons == [name for _, name, _, _ in legend]


def inner_pixel(class_ids, margin):
    """(row, column) of a pixel whose class covers the square of `margin` pixels around it."""
    height, width = class_ids.shape
    for row in range(margin, height - margin, margin):
        for column in range(margin, width - margin, margin):
            square = class_ids[row - margin:row + margin + 1, column - margin:column + margin + 1]
            if (square == class_ids[row, column]).all():
                yield row, column


@pytest.mark.slow
def test_hovering_a_region_names_and_highlights_its_class(photo_run, cli_outputs):
    class_ids = decoded(cli_outputs["_seg_read.png"])
    legend_names = [button.inner_text() for button in photo_run.page.query_selector_all("#annotated .legend-item")]
    box = photo_run.page.query_selector("#annotated img.base-image").bounding_box()
    height, width = class_ids.shape
    hovered = set()
    for row, column in inner_pixel(class_ids, margin=6):
        name = ADE20K_NAMES[class_ids[row, column]]
        if name in hovered:
            continue
        photo_run.page.mouse.move(box["x"] + (column + 0.5) * box["width"] / width,
                                  box["y"] + (row + 0.5) * box["height"] / height)
        photo_run.page.wait_for_function("name => document.querySelector('#region-name')?.innerText === name",
                                         arg=name, timeout=5000)
        masks = [mask.get_attribute("class").split() for mask in photo_run.page.query_selector_all("#annotated img.mask")]
        assert ["active" in mask for mask in masks] == [legend == name for legend in legend_names]
        hovered.add(name)
    assert len(hovered) >= 2
    photo_run.page.mouse.move(0, 0)
    assert photo_run.page.query_selector("#region-name").is_hidden()


@pytest.mark.slow
def test_multi_scale_shows_forward_passes_and_gives_pspnet_py_s_ids(photo_run, small_weights, tmp_path):
    photo = tmp_path / "scene.png"
    save_image(photo, smooth_image(137, 180, seed=5))
    progress_texts = photo_run.page.evaluate_handle(
        "() => { const texts = new Set(); const observer = new MutationObserver(() => {"
        " const text = document.querySelector('#blended')?.innerText ?? ''; if (text.includes('passes')) texts.add(text); });"
        " observer.observe(document.body, {subtree: true, childList: true, characterData: true}); return texts; }"
    )
    photo_run.run(photo, mode="multi-scale (-s -ms)", flip=False)
    seen = photo_run.page.evaluate("texts => [...texts]", progress_texts)
    text, error = photo_run.status()
    passes = int(re.fullmatch(r"scene.png: 180 x 137, small, multi-scale \(-s -ms\): (\d+) forward passes, [\d.]+ s",
                              text).group(1))
    assert not error
    assert any(f"/{passes} passes" in line and "forward passes" in line for line in seen), seen
    result = run_cli("-w", small_weights, "-i", photo, "-o", tmp_path / "cli" / "scene.png", "-s", "-ms", "--no-flip", "-q")
    assert result.returncode == 0, result.stderr
    assert photo_run.downloads()["scene_seg_read.png"] == (tmp_path / "cli" / "scene_seg_read.png").read_bytes()


@pytest.mark.slow
def test_two_users_at_once_are_queued(photo_run, browser, server, tmp_path):
    """A second tab's run waits in Gradio's queue while the first tab's multi-scale run goes on."""
    photo = tmp_path / "large.png"
    save_image(photo, smooth_image(400, 520, seed=9))
    other = Page(browser, server.url)
    first = photo_run.start_run(photo, mode="multi-scale (-s -ms)")
    photo_run.page.wait_for_function("() => document.querySelector('#blended').innerText.includes('passes')",
                                     timeout=RUN_TIMEOUT_MS, polling=50)
    second = other.start_run(PHOTO)
    other.page.wait_for_function("() => /queue: 1\\/1/.test(document.querySelector('#blended').innerText)",
                                 timeout=RUN_TIMEOUT_MS, polling=50)
    photo_run.wait_for_run(first)
    other.wait_for_run(second)
    runs = [int(tab.page.eval_on_selector("#status p", "line => line.dataset.run")) for tab in (photo_run, other)]
    assert runs[1] == runs[0] + 1
    assert not photo_run.status()[1] and not other.status()[1]
    other.page.close()


@pytest.mark.slow
def test_a_file_that_is_no_image_is_one_line_and_the_page_goes_on(photo_run, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"these are notes, not a photo\n" * 20)
    photo_run.run(bad)
    assert photo_run.status() == ("notes.jpg: not an image Pillow can read", True)
    assert photo_run.page.query_selector_all("#downloads a[download]") == []
    assert photo_run.page.query_selector_all("#legend tr") == []
    photo_run.run(PHOTO)
    text, error = photo_run.status()
    assert not error and text.startswith("chelsea.png:")


@pytest.mark.slow
def test_weights_that_fail_to_load_are_one_line_and_the_page_goes_on(photo_run, small_weights):
    photo_run.run(PHOTO, model="pspnet101_voc2012")
    text, error = photo_run.status()
    assert error and "pspnet101_voc2012.h5" in text and "\n" not in text
    assert "Traceback" not in text
    photo_run.run(PHOTO, model=f"small ({small_weights})")
    assert not photo_run.status()[1]


@pytest.mark.slow
def test_the_page_fetches_nothing_beyond_the_server(photo_run):
    photo_run.page.reload()
    photo_run.page.wait_for_selector("#segment")
    assert photo_run.outside == []


@pytest.mark.slow
def test_sigterm_stops_the_server(server):
    """As Ctrl-C does (130, "interrupted"), through the same handler of cli.run_command."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 143
    assert server.stderr[-1] == "demo.py: terminated\n"
    assert not any("Traceback" in line for line in server.stderr)
