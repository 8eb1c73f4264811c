"""Tests of the download of missing weights by pspnet.py, from a server on 127.0.0.1.

The server serves the converted synthetic weights (conftest) and misbehaves on
purpose: 404, an HTML page instead of HDF5, an HDF5 file lacking layers, and a
transfer cut short of its Content-Length. The weights directory is a temporary
one; the network is built once and reused by every run.
"""

import http.server
import io
import re
import socket
import threading
from contextlib import redirect_stderr
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import layers_builder
import pspnet
from bench.synthetic_caffe import write_classifier_only_weights
from pspnet_keras import download
from pspnet_keras import models

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL = "pspnet50_ade20k"
CHUNK_BYTES = 1 << 20
SERVER_TIMEOUT_S = 30


class WeightsHandler(http.server.BaseHTTPRequestHandler):
    """Serves GET /<behaviour>/<model>.h5; the server's `files` holds the bodies."""

    timeout = SERVER_TIMEOUT_S

    def do_GET(self):
        behaviour = self.path.strip("/").split("/")[0]
        files = self.server.files
        self.server.requests.append(self.path)
        if behaviour == "missing":
            self.send_error(404, "Not Found")
            return
        if behaviour == "html":
            body = b"<html><body>This file is no longer available.</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        path = files["lacking"] if behaviour == "lacking" else files["weights"]
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        with open(path, "rb") as file:
            while chunk := file.read(CHUNK_BYTES):
                if behaviour == "cut" and sent + len(chunk) >= size // 2:
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
        self.close_connection = True

    def log_message(self, format, *args):
        """Keeps the test output quiet."""


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_model):
    """A weights server on 127.0.0.1, stopped when the module's tests are done."""
    lacking = write_classifier_only_weights(tmp_path_factory.mktemp("served") / "lacking.h5", 150)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WeightsHandler)
    httpd.daemon_threads = True
    httpd.files = {"weights": synthetic_model(MODEL).converted_h5, "lacking": lacking}
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", httpd=httpd)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(SERVER_TIMEOUT_S)


@pytest.fixture(scope="module")
def built_model():
    return layers_builder.build_pspnet(MODEL)


@pytest.fixture
def setup(tmp_path, monkeypatch, built_model, server):
    """A temporary weights directory, the built network reused, and an image to segment."""
    weights_dir = tmp_path / "weights" / "keras"
    monkeypatch.setattr(download, "WEIGHTS_DIR", weights_dir)
    monkeypatch.setattr(layers_builder, "build_pspnet", lambda model_name, *args, **kwargs: built_model)
    server.httpd.requests.clear()
    image = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(image)
    return SimpleNamespace(
        weights_dir=weights_dir, target=weights_dir / f"{MODEL}.h5", image=image, out=tmp_path / "out",
        server=server,
    )


def run_main(*args):
    """Runs pspnet.main in this process; returns its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = pspnet.main([str(arg) for arg in args])
    return SimpleNamespace(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def segment(setup, *flags):
    return run_main("-m", MODEL, "-i", setup.image, "-o", setup.out / "photo.png", "--no-flip", *flags)


def refused_port():
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_download_renames_the_checked_file_into_place(setup, monkeypatch):
    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, f"{setup.server.url}/ok")
    result = segment(setup)
    assert result.code == 0, result.stderr
    assert setup.server.httpd.requests == [f"/ok/{MODEL}.h5"]
    assert f"downloading {MODEL}.h5" in result.stderr
    assert [path.name for path in setup.weights_dir.iterdir()] == [f"{MODEL}.h5"]
    assert setup.target.read_bytes() == setup.server.httpd.files["weights"].read_bytes()
    assert (setup.out / "photo_seg_read.png").is_file()

    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, f"http://127.0.0.1:{refused_port()}")
    network = pspnet.PSPNet(MODEL)
    assert network.weights_path == setup.target
    assert setup.server.httpd.requests == [f"/ok/{MODEL}.h5"]


@pytest.mark.parametrize(
    "base, reason",
    [
        ("{server}/missing", "HTTP Error 404"),
        ("http://127.0.0.1:{port}", "Connection refused"),
        ("{server}/cut", "transfer interrupted after"),
        ("{server}/html", f"the downloaded file is not weights of {MODEL}"),
        ("{server}/lacking", f"the downloaded file is not weights of {MODEL}"),
    ],
)
@pytest.mark.slow
def test_failed_download_leaves_nothing_and_says_what_to_do(setup, monkeypatch, base, reason):
    url_base = base.format(server=setup.server.url, port=refused_port())
    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, url_base)
    result = segment(setup, "-q")
    assert result.code == 1
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("pspnet.py: error:")]
    assert message.startswith(f"pspnet.py: error: cannot download the weights of {MODEL} from {url_base}/{MODEL}.h5")
    assert reason in message
    assert f"Put the published {MODEL}.h5 at {setup.target}" in message and "-w" in message
    converter = PROJECT_ROOT / "weight_converter.py"
    caffemodel = PROJECT_ROOT / "weights" / "caffe" / "pspnet50_ADE20K.caffemodel"
    assert f"put pspnet50_ADE20K.caffemodel in {PROJECT_ROOT / 'weights' / 'caffe'} and run" in message
    assert f"python {converter} {caffemodel} -o {setup.target}" in message
    assert list(setup.weights_dir.iterdir()) == []
    assert not setup.out.exists()


def readme_paragraph(text, start):
    """The paragraph of a Markdown text that begins with `start`, its lines joined by spaces."""
    for paragraph in text.split("\n\n"):
        if paragraph.startswith(start):
            return " ".join(paragraph.split())
    raise AssertionError(f"no paragraph beginning {start!r}")


def test_published_urls_are_the_readme_ones(monkeypatch):
    """README.md's account of the weights, checked against what pspnet.py does: where it looks, where
    the links it downloads are listed (and that they are the ones it uses), where Caffe weights go."""
    monkeypatch.delenv(download.WEIGHTS_URL_BASE_VARIABLE, raising=False)
    readme = (PROJECT_ROOT / "README.md").read_text()
    paragraph = readme_paragraph(readme, "`pspnet.py` looks for `weights/keras/<model>.h5` beside itself")
    for name in models.RELEASED_MODEL_NAMES:
        assert download.default_weights_path(name) == PROJECT_ROOT / "weights" / "keras" / f"{name}.h5"
    assert PROJECT_ROOT / "pspnet.py" == Path(pspnet.__file__).resolve()
    # "the published Keras weights of the 2017 port (Dropbox links of its README, listed in weights/keras/README.md)"
    (listing,) = re.findall(r"listed in `([^`]+)`", paragraph)
    table = dict(re.findall(r"^\| `([^`]+\.h5)` \| (\S+) \|$", (PROJECT_ROOT / listing).read_text(), re.MULTILINE))
    assert table == {f"{name}.h5": download.weights_url(models.RELEASED_MODELS[name]) for name in models.RELEASED_MODEL_NAMES}
    assert all(url.startswith("https://www.dropbox.com/") for url in table.values())
    assert table["pspnet50_ade20k.h5"] == "https://www.dropbox.com/s/0uxn14y26jcui4v/pspnet50_ade20k.h5?dl=1"
    # "Put the .caffemodel in weights/caffe/ ... and run: python weight_converter.py weights/caffe/pspnet50_ADE20K.caffemodel"
    assert "Put the `.caffemodel` in `weights/caffe/`" in paragraph
    assert download.CAFFE_WEIGHTS_DIR == PROJECT_ROOT / "weights" / "caffe"
    command = re.search(r"^python weight_converter\.py weights/caffe/(\S+)$", readme, re.MULTILINE)
    assert command.group(1) == models.RELEASED_MODELS["pspnet50_ade20k"].caffe_weights
    assert f"{download.CAFFE_WEIGHTS_DIR / command.group(1)}" in download.weights_help(
        models.RELEASED_MODELS["pspnet50_ade20k"], download.default_weights_path("pspnet50_ade20k")
    )
    # A mirror replaces the base of every URL.
    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, "http://mirror.example/pspnet/")
    assert download.weights_url(models.RELEASED_MODELS["pspnet101_voc2012"]) == (
        "http://mirror.example/pspnet/pspnet101_voc2012.h5"
    )


@pytest.mark.slow
def test_weights_to_load_downloads_a_missing_released_file_once(setup, monkeypatch, tmp_path):
    """What pspnet.py --ray, evaluate.py --ray and train.py hand on: the file, fetched once, here."""
    config = models.RELEASED_MODELS[MODEL]
    monkeypatch.setenv(download.WEIGHTS_URL_BASE_VARIABLE, f"{setup.server.url}/ok")
    assert download.weights_to_load(config, show_progress=False) == setup.target
    assert download.weights_to_load(config, show_progress=False) == setup.target
    assert setup.server.httpd.requests == [f"/ok/{MODEL}.h5"]
    assert setup.target.read_bytes() == setup.server.httpd.files["weights"].read_bytes()
    given = tmp_path / "mine.h5"
    with pytest.raises(download.WeightsNotFound) as refused:
        download.weights_to_load(config, given)
    assert str(refused.value) == f"{given}: no such weights file"
    assert setup.server.httpd.requests == [f"/ok/{MODEL}.h5"]
