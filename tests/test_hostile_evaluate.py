"""Hostile and careless input against evaluate.py: one line and a stated exit code, never a traceback,
a hang or a lost file.

Covers: reports over files of the dataset, the model or --save-dir (never replaced, even with
--overwrite) and over an existing report (only with --overwrite, but a save dir's own report on a
rerun); saved predictions reused only when stamped with their image's and the settings' SHA-256;
FIFOs, devices, directories and link loops among the saved predictions, as predictions.json or as
files of the data root; predictions.json validated field by field; images listed twice or sharing
a prediction; write failures at the file-size limit (RLIMIT_FSIZE, in a child process running the
stand-in network); hostile data roots (link loops, huge class files, labels and images that are
decompression bombs). The datasets and the colour-coded stand-in network are tests/test_evaluate.py's.
"""

import hashlib
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from PIL import PngImagePlugin

import test_evaluate
from pspnet_keras import datasets
from pspnet_keras import runtime
from test_evaluate import HEIGHT
from test_evaluate import PROJECT_ROOT
from test_evaluate import WIDTH
from test_evaluate import assert_folders_metrics
from test_evaluate import assert_voc_metrics
from test_evaluate import make_folders
from test_evaluate import make_voc
from test_evaluate import read_report
from test_evaluate import run
from test_evaluate import save_colour_image
from test_evaluate import save_label
from test_evaluate import skipped_line
from test_evaluate import write_user_model

# The fixtures of tests/test_evaluate.py: the stand-in network, dummy weights, SIGTERM restored.
network = test_evaluate.network
weights = test_evaluate.weights
restore_sigterm = test_evaluate.restore_sigterm

IMAGE_STAMP = "pspnet-keras image sha256"
SETTINGS_STAMP = "pspnet-keras settings sha256"
# A child process running evaluate.main with the stand-in network, and without TensorFlow: the
# modules scoring and segmenter.load_network import exception classes from are stood in for as well.
STAND_IN_SCRIPT = f"""
import sys
import types
sys.path[:0] = [{str(PROJECT_ROOT)!r}, {str(PROJECT_ROOT / "tests")!r}]
inference = types.ModuleType("pspnet_keras.inference")
inference.OutOfMemory = type("OutOfMemory", (Exception,), {{}})
sys.modules["pspnet_keras.inference"] = inference
layers_builder = types.ModuleType("layers_builder")
layers_builder.WeightsError = type("WeightsError", (Exception,), {{}})
sys.modules["layers_builder"] = layers_builder
import evaluate
import test_evaluate
from pspnet_keras import segmenter
segmenter.PSPNet = type("StandIn", (test_evaluate.ColourCodedNetwork,), {{
    "constructions": [], "calls": [], "interrupt_at_call": None, "terminate_at_call": None, "default_weights": None,
}})
sys.exit(evaluate.main(sys.argv[1:]))
"""


def error_lines(capsys):
    """The lines evaluate.py printed on stderr, without the progress bars."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py:")]


def contents(*folders):
    """{path: bytes} of every regular file under `folders`."""
    return {path: path.read_bytes() for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def png_declaring(width, height):
    """The bytes of an 8-bit grey PNG whose header declares `width` x `height` pixels over the data of 8x8."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # PNG specification 5.3 and 11.2.2: IHDR's data (width, height first) follows the 8-byte signature,
    # its 4-byte length and type; its CRC covers type and data.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def stamps_of(path):
    """The tEXt stamps of a saved prediction."""
    with Image.open(path) as saved:
        return {key: saved.info.get(key) for key in (IMAGE_STAMP, SETTINGS_STAMP)}


def run_limited(argv, cwd, file_size_limit):
    """Runs evaluate.py with the stand-in network in a child whose files may not grow beyond
    `file_size_limit` bytes (writes then fail with EFBIG); returns the completed process."""

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return subprocess.run(
        [sys.executable, "-c", STAND_IN_SCRIPT, *map(str, argv)], cwd=cwd, capture_output=True, text=True,
        timeout=120, preexec_fn=limit_file_size,
    )


# ---------------------------------------------------------------------------------------
# The report: never a file the run reads; an existing one only with --overwrite


@pytest.mark.parametrize("relative, what", [
    ("images/train/t.png", "a file of the dataset"),
    ("labels/train/t.png", "a file of the dataset"),
    ("images/val/notes.txt", "a file of the dataset"),
    ("README", "a file of the dataset"),
    ("palette.txt", "a class file of the dataset"),
    ("images/val/c.bmp", "an image of the set"),
])
def test_report_never_replaces_a_file_of_the_folders_dataset(tmp_path, network, capsys, relative, what):
    root = make_folders(tmp_path / "data", palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    (root / "README").write_text("my dataset\n")
    weights = write_user_model(tmp_path / "model")
    before = contents(root)
    target = root / relative
    assert run("-w", weights, "--data", root, "--report", target, "--overwrite") == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {target}: is {what} {target}, which this command reads; it is never replaced; "
        "choose another --report"
    ]
    assert network.constructions == []
    assert contents(root) == before


@pytest.mark.parametrize("relative", [
    "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt",
    "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt",
    "VOCdevkit/VOC2012/JPEGImages/2007_000009.jpg",
    "VOCdevkit/VOC2012/SegmentationClass/2007_000009.png",
])
def test_report_never_replaces_a_file_of_the_voc_dataset(tmp_path, network, weights, capsys, relative):
    make_voc(tmp_path / "data")
    before = contents(tmp_path / "data")
    target = tmp_path / "data" / relative
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--report", target,
               "--overwrite") == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {target}: is a file of the dataset {target}, which this command reads; it is never "
        "replaced; choose another --report"
    ]
    assert contents(tmp_path / "data") == before


def test_default_report_is_replaced_only_with_overwrite(tmp_path, network, capsys, monkeypatch):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run("-w", weights, "--data", root) == 0
    (work / "metrics.json").write_text('{"mine": true}\n')
    network.constructions.clear()
    capsys.readouterr()
    assert run("-w", weights, "--data", root) == 1
    assert error_lines(capsys) == [
        "evaluate.py: metrics.json: exists; pass --overwrite to replace it, or choose another path"
    ]
    assert network.constructions == []
    assert (work / "metrics.json").read_text() == '{"mine": true}\n'
    assert run("-w", weights, "--data", root, "--overwrite") == 0
    assert_folders_metrics(read_report(work / "metrics.json"))
    assert sorted(path.name for path in work.iterdir()) == ["metrics.json"]


def test_a_foreign_file_as_the_save_dirs_report_needs_overwrite(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    report = save_dir / "metrics.json"
    report.write_text('{"miou": 1}\n')
    capsys.readouterr()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {report}: exists; pass --overwrite to replace it, or choose another path"
    ]
    assert report.read_text() == '{"miou": 1}\n'
    assert run("-w", weights, "--data", root, "--save-dir", save_dir, "--overwrite") == 0
    assert_folders_metrics(read_report(report))


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_a_fifo_as_the_save_dirs_report_is_one_line(tmp_path, network, capsys, hang_guard, overwrite):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    (save_dir / "metrics.json").unlink()
    os.mkfifo(save_dir / "metrics.json")
    capsys.readouterr()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir, *overwrite) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {save_dir / 'metrics.json'}: exists and is not a regular file; refusing to replace it; "
        "choose another --report"
    ]


# ---------------------------------------------------------------------------------------
# Saved predictions: reused only when stamped with this image and these settings


def test_saved_predictions_carry_the_sha256_of_image_and_settings(tmp_path, network):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    record = json.loads((save_dir / "predictions.json").read_text())
    settings_sha256 = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    for image in ("a.png", "b.jpg", "c.bmp"):
        image_sha256 = hashlib.sha256((root / "images" / "val" / image).read_bytes()).hexdigest()
        stem = image.split(".")[0]
        assert stamps_of(save_dir / f"{stem}.png") == {IMAGE_STAMP: image_sha256, SETTINGS_STAMP: settings_sha256}


def test_a_changed_image_is_predicted_again(tmp_path, network):
    """a.png is repainted: class 1 everywhere. a alone is then [0,1] = 360, [1,1] = 360, [2,1] = 360."""
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    save_colour_image(root / "images" / "val" / "a.png", np.ones((HEIGHT, WIDTH), np.int64))
    network.calls.clear()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    assert len(network.calls) == 1
    with Image.open(save_dir / "a.png") as saved:
        np.testing.assert_array_equal(np.asarray(saved), np.ones((HEIGHT, WIDTH)))
    report = read_report(save_dir / "metrics.json")
    # b and c as in the folders set; a: [0,1] = 360, [1,1] = 360, [2,1] = 360.
    # Labelled: 0 1520, 1 1080, 2 840; predicted: 0 1160, 1 720 + 1080 = 1800, 2 480.
    assert report["per_class"][1]["iou"] == pytest.approx(600 / (1080 + 1800 - 600))
    assert report["pixel_acc"] == pytest.approx((1160 + 600 + 0) / 3440)


def forge(path, kind, good):
    """Writes at `path` a PNG of another origin than this run's: `good` (a stamped prediction) without
    stamps, with another image's stamp, of other settings, or declaring another size."""
    with Image.open(good) as saved:
        pixels, stamps = np.asarray(saved), dict(saved.info)
    if kind == "declared size":
        path.write_bytes(png_declaring(20000, 20000))
        return
    info = PngImagePlugin.PngInfo()
    if kind == "other image":
        info.add_text(IMAGE_STAMP, "0" * 64)
        info.add_text(SETTINGS_STAMP, stamps[SETTINGS_STAMP])
    if kind == "other settings":
        info.add_text(IMAGE_STAMP, stamps[IMAGE_STAMP])
        info.add_text(SETTINGS_STAMP, "0" * 64)
    Image.fromarray(np.zeros_like(pixels)).save(path, pnginfo=info)


@pytest.mark.parametrize("kind", ["unstamped", "other image", "other settings", "declared size"])
def test_a_prediction_of_another_origin_is_predicted_again_and_replaced(tmp_path, network, kind):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    good = tmp_path / "good.png"
    good.write_bytes((save_dir / "b.png").read_bytes())
    forge(save_dir / "b.png", kind, good)
    network.calls.clear()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    assert len(network.calls) == 1
    assert (save_dir / "b.png").read_bytes() == good.read_bytes()
    assert_folders_metrics(read_report(save_dir / "metrics.json"))
    assert sorted(path.name for path in save_dir.iterdir()) == [
        "a.png", "b.png", "c.png", "metrics.json", "predictions.json"
    ]


def test_a_prediction_made_with_other_flags_is_not_reused(tmp_path, network):
    """b.png from a --no-flip save dir copied into a save dir of the default protocol."""
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--save-dir", tmp_path / "noflip", "--no-flip") == 0
    assert run("-w", weights, "--data", root, "--save-dir", tmp_path / "flip") == 0
    (tmp_path / "flip" / "b.png").write_bytes((tmp_path / "noflip" / "b.png").read_bytes())
    network.calls.clear()
    assert run("-w", weights, "--data", root, "--save-dir", tmp_path / "flip") == 0
    assert network.calls == [{"sliding": False, "flip": True, "multi_scale": False}]
    assert stamps_of(tmp_path / "flip" / "b.png") == stamps_of(tmp_path / "flip" / "a.png") | {
        IMAGE_STAMP: stamps_of(tmp_path / "noflip" / "b.png")[IMAGE_STAMP]
    }


@pytest.mark.parametrize("kind", ["fifo", "directory", "link loop", "device"])
def test_a_special_file_among_the_predictions_is_never_opened(tmp_path, network, capsys, hang_guard, kind):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    special = save_dir / "b.png"
    special.unlink()
    {"fifo": os.mkfifo, "directory": os.mkdir, "link loop": lambda path: os.symlink(path, path),
     "device": lambda path: os.symlink(os.devnull, path)}[kind](special)
    problem = {"fifo": "is a FIFO, not a regular file", "directory": "is a directory, not a file",
               "link loop": "symbolic link loop", "device": "is a device, not a regular file"}[kind]
    network.calls.clear()
    capsys.readouterr()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: skipped {special}: {problem}; remove it or choose another --save-dir", skipped_line(1, 3)
    ]
    assert network.calls == []
    report = read_report(save_dir / "metrics.json")
    assert report["images"] == 2 and report["skipped"] == [
        {"file": str(special), "problem": f"{problem}; remove it or choose another --save-dir"}
    ]
    assert os.path.lexists(special) and not special.is_file()


# ---------------------------------------------------------------------------------------
# predictions.json


@pytest.mark.parametrize("content, problem", [
    ('{"model": "mine", "sliding": "yes"}', "field 'sliding' holds a string, not true or false"),
    ('{"model": 3}', "field 'model' holds a number, not a string"),
    ('{"model": "mine", "note": "x"}',
     "field 'note' is none of the prediction settings (model, model_sha256, weights_sha256, sliding, flip, "
     "multi_scale)"),
    (json.dumps({"model": "m" * 300}), "field 'model' is longer than 255 characters"),
    (" " * 70000 + "{}", "larger than 64 KiB, too large for a prediction record"),
    ('{"model": ', "unreadable (Expecting value: line 1 column 11 (char 10))"),
])
def test_a_malformed_prediction_record_is_one_line(tmp_path, network, capsys, content, problem):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    (save_dir / "predictions.json").write_text(content)
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {save_dir / 'predictions.json'}: {problem}; delete it or choose another --save-dir"
    ]
    assert network.constructions == []
    assert sorted(path.name for path in save_dir.iterdir()) == ["predictions.json"]


def test_a_fifo_as_the_prediction_record_is_one_line(tmp_path, network, capsys, hang_guard):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    os.mkfifo(save_dir / "predictions.json")
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {save_dir / 'predictions.json'}: is a FIFO, not a regular file; delete it or choose "
        "another --save-dir"
    ]


# ---------------------------------------------------------------------------------------
# Images listed twice, or sharing a prediction


def test_an_image_listed_twice_is_counted_once_with_one_warning(tmp_path, network, weights, capsys):
    base = make_voc(tmp_path / "data")
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text("2007_000001\n2007_000002\n2007_000001\n\n2007_000002 2007_000001\n")
    report_path = tmp_path / "r.json"
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--report", report_path) == 0
    assert error_lines(capsys) == [
        f"evaluate.py: warning: {listing}: 2 images listed more than once, each counted once: "
        "2007_000001 (lines 1, 3, 5), 2007_000002 (lines 2, 5)"
    ]
    report = read_report(report_path)
    assert report["images"] == 2 and report["images_expected"] == 2
    assert_voc_metrics(report)
    assert len(network.calls) == 2


@pytest.mark.parametrize("name", ["../2007_000001", "/etc/passwd", "..", "a\0b"])
def test_a_list_naming_no_file_name_is_one_line(tmp_path, network, weights, capsys, name):
    base = make_voc(tmp_path / "data")
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text(f"2007_000001\n{name}\n")
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data") == 1
    assert error_lines(capsys) == [f"evaluate.py: {listing}: line 2: {name!r} is not an image name"]
    assert network.constructions == []


def test_two_cities_sharing_an_image_name_cannot_share_a_save_dir(tmp_path, network, weights, capsys):
    name = "x_000000_000001"
    for city in ("aachen", "bochum"):
        save_colour_image(tmp_path / "data" / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png",
                          np.zeros((HEIGHT, WIDTH), np.int64))
        save_label(tmp_path / "data" / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png",
                   np.zeros((HEIGHT, WIDTH)))
    images = tmp_path / "data" / "leftImg8bit" / "val"
    save_dir = tmp_path / "saved"
    arguments = ("-m", "pspnet101_cityscapes", "-w", weights[0], "--data", tmp_path / "data")
    assert run(*arguments, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {save_dir}: {images / 'aachen' / f'{name}_leftImg8bit.png'} and "
        f"{images / 'bochum' / f'{name}_leftImg8bit.png'} would share the prediction {name}_leftImg8bit.png; "
        "evaluate them without --save-dir, or rename one"
    ]
    assert not save_dir.exists() and network.constructions == []
    assert run(*arguments, "--report", tmp_path / "r.json") == 0
    assert read_report(tmp_path / "r.json")["images"] == 2


def test_two_images_of_one_stem_are_one_line(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    save_colour_image(root / "images" / "val" / "a.jpg", np.zeros((HEIGHT, WIDTH), np.int64))
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--save-dir", tmp_path / "saved") == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {root / 'images' / 'val'}: a.jpg and a.png would share the label a.png; keep one of them"
    ]


def test_a_prediction_hard_linked_to_a_label_is_refused(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    label = root / "labels" / "val" / "b.png"
    os.link(label, save_dir / "b.png")
    before = label.read_bytes()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {save_dir}: the prediction of b.jpg would replace a label of the set {label}; "
        "choose another --save-dir"
    ]
    assert label.read_bytes() == before


# ---------------------------------------------------------------------------------------
# Write failures at the file-size limit


def test_a_report_beyond_the_file_size_limit_is_one_line(tmp_path):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    result = run_limited(["-w", weights, "--data", root, "--report", out / "r.json"], tmp_path, 512)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"evaluate.py: cannot write the report: {out / 'r.json'}: cannot write (File too large)"
    )
    assert "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def test_a_prediction_record_beyond_the_file_size_limit_is_one_line(tmp_path):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    result = run_limited(["-w", weights, "--data", root, "--save-dir", save_dir], tmp_path, 100)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"evaluate.py: {save_dir / 'predictions.json'}: cannot write (File too large)"
    ]
    assert list(save_dir.iterdir()) == []


@pytest.mark.parametrize("limit", [4096, 600])
def test_a_prediction_beyond_the_file_size_limit_stops_the_run_with_one_line(tmp_path, limit):
    """b.png is 160x120 of noise of three classes: its prediction is some 6 KiB as PNG, beyond either
    limit; predictions.json (256 bytes) and a's flat prediction (297) stay below both, the report
    (991) below 4096 only."""
    root = make_folders(tmp_path / "data")
    noise = np.random.default_rng(0).integers(0, 3, (120, 160))
    (root / "images" / "val" / "b.jpg").unlink()
    save_colour_image(root / "images" / "val" / "b.png", noise)
    save_label(root / "labels" / "val" / "b.png", noise)
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    result = run_limited(["-w", weights, "--data", root, "--save-dir", save_dir], tmp_path, limit)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    stopped = f"evaluate.py: stopped: {save_dir / 'b.png'}: cannot write (File too large)"
    if limit == 4096:
        assert result.stderr.splitlines()[-1] == stopped
        assert sorted(path.name for path in save_dir.iterdir()) == ["a.png", "metrics.json", "predictions.json"]
        report = read_report(save_dir / "metrics.json")
        assert report["partial"] is True and report["images"] == 1
    else:
        assert result.stderr.splitlines()[-1] == (
            f"{stopped}; the report was not written either ({save_dir / 'metrics.json'}: cannot write (File too large))"
        )
        assert sorted(path.name for path in save_dir.iterdir()) == ["a.png", "predictions.json"]


# ---------------------------------------------------------------------------------------
# Hostile data roots


def test_a_data_root_that_is_a_link_loop_is_one_line(tmp_path, network, capsys, hang_guard):
    root = tmp_path / "data"
    os.symlink(root, root)
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    assert error_lines(capsys) == [f"evaluate.py: {root}: symbolic link loop"]


def test_link_loops_in_the_tree_are_skipped_or_ignored(tmp_path, network, weights, capsys, hang_guard):
    """A city folder that is a loop holds no image; an image and a label that are loops are skipped."""
    images, labels = tmp_path / "data" / "leftImg8bit" / "val", tmp_path / "data" / "gtFine" / "val"
    save_colour_image(images / "aachen" / "aachen_1_leftImg8bit.png", np.zeros((HEIGHT, WIDTH), np.int64))
    save_label(labels / "aachen" / "aachen_1_gtFine_labelTrainIds.png", np.zeros((HEIGHT, WIDTH)))
    os.symlink(images / "loop", images / "loop")
    os.symlink(labels / "loop", labels / "loop")
    os.symlink(images / "aachen" / "aachen_2_leftImg8bit.png", images / "aachen" / "aachen_2_leftImg8bit.png")
    save_label(labels / "aachen" / "aachen_2_gtFine_labelTrainIds.png", np.zeros((HEIGHT, WIDTH)))
    save_colour_image(images / "aachen" / "aachen_3_leftImg8bit.png", np.zeros((HEIGHT, WIDTH), np.int64))
    os.symlink(labels / "aachen" / "aachen_3_gtFine_labelTrainIds.png",
               labels / "aachen" / "aachen_3_gtFine_labelTrainIds.png")
    report_path = tmp_path / "r.json"
    assert run("-m", "pspnet101_cityscapes", "-w", weights[0], "--data", tmp_path / "data",
               "--report", report_path) == 1
    assert error_lines(capsys) == [
        f"evaluate.py: skipped {images / 'aachen' / 'aachen_2_leftImg8bit.png'}: symbolic link loop",
        f"evaluate.py: skipped {labels / 'aachen' / 'aachen_3_gtFine_labelTrainIds.png'}: symbolic link loop",
        skipped_line(2, 3),
    ]
    assert read_report(report_path)["images"] == 1


@pytest.mark.parametrize("name", ["classes.txt", "palette.txt"])
def test_a_fifo_as_a_class_file_is_one_line(tmp_path, network, capsys, hang_guard, name):
    root = make_folders(tmp_path / "data", palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    (root / name).unlink()
    os.mkfifo(root / name)
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--dataset", "folders", "--report", tmp_path / "r.json") == 1
    assert error_lines(capsys) == [f"evaluate.py: {root / name}: is a FIFO, not a regular file"]


def test_a_fifo_as_the_image_list_is_one_line(tmp_path, network, weights, capsys, hang_guard):
    base = make_voc(tmp_path / "data")
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    listing.unlink()
    os.mkfifo(listing)
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data") == 1
    assert error_lines(capsys) == [f"evaluate.py: {listing}: is a FIFO, not a regular file"]


@pytest.mark.parametrize("name, what", [("classes.txt", "the class names"), ("palette.txt", "the palette")])
def test_a_class_file_of_a_gigabyte_is_refused_unread(tmp_path, network, capsys, name, what):
    root = make_folders(tmp_path / "data", palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    with open(root / name, "r+b") as file:
        file.truncate(1 << 30)
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    assert error_lines(capsys) == [f"evaluate.py: {root / name}: larger than 1024 KiB, too large for {what}"]


def test_a_list_of_more_than_8_mib_is_refused(tmp_path, network, weights, capsys):
    base = make_voc(tmp_path / "data")
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    with open(listing, "r+b") as file:
        file.truncate((8 << 20) + 1)
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data") == 1
    assert error_lines(capsys) == [f"evaluate.py: {listing}: larger than 8192 KiB, too large for the image list"]


def test_more_than_255_classes_is_one_line(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data", class_names=[f"class {i}" for i in range(300)])
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    assert error_lines(capsys) == [
        f"evaluate.py: {root / 'classes.txt'}: 300 classes; at most 255, as label value 255 marks unlabelled pixels"
    ]


def test_decompression_bombs_are_skipped_undecoded(tmp_path, network, capsys):
    """a's label declares 20000x20000 pixels (past Pillow's error limit), b's 10000x10000 (past its
    warning limit); c's image declares 10000x10000 for a 40x30 label. None is decoded."""
    root = make_folders(tmp_path / "data")
    labels, images = root / "labels" / "val", root / "images" / "val"
    (labels / "a.png").write_bytes(png_declaring(20000, 20000))
    (labels / "b.png").write_bytes(png_declaring(10000, 10000))
    (images / "c.bmp").unlink()
    (images / "c.png").write_bytes(png_declaring(10000, 10000))
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    stderr = capsys.readouterr().err
    assert "DecompressionBomb" not in stderr
    assert [line for line in stderr.splitlines() if line.startswith("evaluate.py:")] == [
        f"evaluate.py: skipped {labels / 'a.png'}: cannot read label (Image size (400000000 pixels) exceeds "
        "limit of 178956970 pixels, could be decompression bomb DOS attack.)",
        f"evaluate.py: skipped {labels / 'b.png'}: label is 10000x10000, more than the 89478485 pixels Pillow "
        "decodes safely",
        f"evaluate.py: skipped {images / 'c.png'}: image is 10000x10000 but its label c.png is 40x30",
        "evaluate.py: no image of the set could be evaluated",
    ]
    assert network.calls == []
    assert read_report(tmp_path / "r.json")["images"] == 0


def test_labels_beyond_the_free_memory_are_skipped(tmp_path, network, capsys, monkeypatch):
    """A machine of 1 GiB free, and a label counting taken to need 1 GiB a pixel."""
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    monkeypatch.setattr(runtime, "available_memory", lambda: 1 << 30)
    monkeypatch.setattr(datasets, "LABEL_BYTES_PER_PIXEL", 1 << 30)
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    problem = "the 40x30 label needs at least 1200.0 GiB of memory; this machine has 1.0 GiB free"
    assert error_lines(capsys) == [
        *(f"evaluate.py: skipped {root / 'labels' / 'val' / name}: {problem}" for name in ("a.png", "b.png", "c.png")),
        "evaluate.py: no image of the set could be evaluated",
    ]
    assert network.calls == []


@pytest.mark.parametrize("kind, problem", [
    ("fifo", "is a FIFO, not a directory"),
    ("file", "not a directory"),
    ("link loop", "symbolic link loop"),
    ("dangling link", "dangling symbolic link"),
])
def test_a_save_dir_that_is_no_folder_is_one_line(tmp_path, network, capsys, hang_guard, kind, problem):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    {"fifo": os.mkfifo, "file": lambda path: path.write_text("mine\n"),
     "link loop": lambda path: os.symlink(path, path),
     "dangling link": lambda path: os.symlink(tmp_path / "absent", path)}[kind](save_dir)
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert error_lines(capsys) == [f"evaluate.py: {save_dir}: {problem}; choose another --save-dir"]
    assert network.constructions == []


@pytest.mark.parametrize("kind, problem, report_problem", [
    ("fifo", "not a directory", "folder {special}: not a directory"),
    ("link loop", "symbolic link loop", "symbolic link loop; choose another --report"),
])
def test_a_data_root_or_report_folder_that_is_no_folder_is_one_line(tmp_path, network, capsys, hang_guard,
                                                                    kind, problem, report_problem):
    special = tmp_path / "special"
    os.mkfifo(special) if kind == "fifo" else os.symlink(special, special)
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", special) == 1
    assert error_lines(capsys) == [f"evaluate.py: {special}: {problem}"]
    root = make_folders(tmp_path / "data")
    assert run("-w", weights, "--data", root, "--report", special / "r.json") == 1
    assert error_lines(capsys) == [f"evaluate.py: {special / 'r.json'}: {report_problem.format(special=special)}"]
    assert network.constructions == []


def test_a_fifo_as_a_cityscapes_train_id_label_is_skipped_not_replaced_by_label_ids(tmp_path, network, weights,
                                                                                    capsys, hang_guard):
    images, labels = tmp_path / "data" / "leftImg8bit" / "val", tmp_path / "data" / "gtFine" / "val"
    for number in (1, 2):
        save_colour_image(images / "aachen" / f"aachen_{number}_leftImg8bit.png", np.zeros((HEIGHT, WIDTH), np.int64))
        save_label(labels / "aachen" / f"aachen_{number}_gtFine_labelIds.png", np.full((HEIGHT, WIDTH), 7))
    os.mkfifo(labels / "aachen" / "aachen_2_gtFine_labelTrainIds.png")
    assert run("-m", "pspnet101_cityscapes", "-w", weights[0], "--data", tmp_path / "data",
               "--report", tmp_path / "r.json") == 1
    assert error_lines(capsys) == [
        f"evaluate.py: skipped {labels / 'aachen' / 'aachen_2_gtFine_labelTrainIds.png'}: is a FIFO, not a "
        "regular file",
        skipped_line(1, 2),
    ]
