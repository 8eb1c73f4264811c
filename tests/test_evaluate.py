"""Tests of evaluate.py on tiny synthetic datasets in the ADE20K, Cityscapes, VOC 2012 and folders layouts.

A stand-in for segmenter.PSPNet (pspnet_keras/segmenter.py; evaluate.py builds it through
load_network) predicts the class whose colour code each pixel carries (class = R // 64 +
4 * (G // 64) + 16 * (B // 64)); the tests paint
images in those colours, on 8-pixel-aligned rectangles so that even JPEG keeps
them, and paint labels by hand. Every confusion count and metric expected below
is worked out by hand from those rectangles.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import evaluate
from pspnet_keras import datasets
from pspnet_keras import models
from pspnet_keras import segmenter

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 30, 40
# Seconds a test may take before a hang (a FIFO opened for reading) is reported as a failure.

# cityscapesScripts labels.py, (labelId: name, trainId), typed in from the official table.
OFFICIAL_CITYSCAPES_TRAIN_IDS = {
    0: ("unlabeled", 255), 1: ("ego vehicle", 255), 2: ("rectification border", 255),
    3: ("out of roi", 255), 4: ("static", 255), 5: ("dynamic", 255), 6: ("ground", 255),
    7: ("road", 0), 8: ("sidewalk", 1), 9: ("parking", 255), 10: ("rail track", 255),
    11: ("building", 2), 12: ("wall", 3), 13: ("fence", 4), 14: ("guard rail", 255),
    15: ("bridge", 255), 16: ("tunnel", 255), 17: ("pole", 5), 18: ("polegroup", 255),
    19: ("traffic light", 6), 20: ("traffic sign", 7), 21: ("vegetation", 8), 22: ("terrain", 9),
    23: ("sky", 10), 24: ("person", 11), 25: ("rider", 12), 26: ("car", 13), 27: ("truck", 14),
    28: ("bus", 15), 29: ("caravan", 255), 30: ("trailer", 255), 31: ("train", 16),
    32: ("motorcycle", 17), 33: ("bicycle", 18),
}


def colour_coded(class_ids):
    """The RGB image whose pixels carry `class_ids` in the stand-in network's colour code."""
    class_ids = np.asarray(class_ids)
    channels = [class_ids % 4, (class_ids // 4) % 4, class_ids // 16]
    return (32 + 64 * np.stack(channels, axis=-1)).astype(np.uint8)


class ColourCodedNetwork:
    """Stands in for segmenter.PSPNet: predicts the class coded in each pixel's colour, with probability 0.9."""

    constructions = None
    calls = None
    interrupt_at_call = None
    terminate_at_call = None
    default_weights = None

    def __init__(self, model=None, weights=None, show_progress=True, precision="float32"):
        assert isinstance(model, models.ModelConfig)
        self.constructions.append({"model": model, "weights": weights})
        self.config = model
        self.classes = model.classes
        self.class_names = model.class_names
        self.dataset = model.dataset
        self.weights_path = Path(weights) if weights is not None else self.default_weights

    def class_map(self, image, sliding=False, flip=True, multi_scale=False, progress=None, probabilities=None):
        """Records the call (raising KeyboardInterrupt, or sending this process SIGTERM, at the call
        numbered `interrupt_at_call` or `terminate_at_call`) and returns the coded class ids."""
        self.calls.append({"sliding": sliding, "flip": flip, "multi_scale": multi_scale})
        if len(self.calls) == self.interrupt_at_call:
            raise KeyboardInterrupt
        if len(self.calls) == self.terminate_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the evaluation")
        levels = image.astype(np.int64) // 64
        class_ids = levels[..., 0] + 4 * levels[..., 1] + 16 * levels[..., 2]
        assert class_ids.max() < self.classes
        return class_ids.astype(np.uint8), np.full(image.shape[:2], 0.9, np.float32)


@pytest.fixture
def weights(tmp_path):
    """A dummy weights file (the stand-in network ignores it) and its SHA-256 computed here."""
    path = tmp_path / "weights.h5"
    path.write_bytes(b"not really weights")
    return path, hashlib.sha256(b"not really weights").hexdigest()


@pytest.fixture
def network(monkeypatch, weights):
    """Puts a fresh ColourCodedNetwork class in place of segmenter.PSPNet (what load_network builds) and returns it."""
    stand_in = type("StandIn", (ColourCodedNetwork,), {
        "constructions": [], "calls": [], "interrupt_at_call": None, "terminate_at_call": None,
        "default_weights": weights[0],
    })
    monkeypatch.setattr(segmenter, "PSPNet", stand_in)
    return stand_in


@pytest.fixture(autouse=True)
def restore_sigterm():
    """Puts back the SIGTERM handler evaluate.main installs."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def save_colour_image(path, class_ids):
    """Writes the colour-coded image of `class_ids` as PNG, or as JPEG at quality 100 for .jpg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 100, "subsampling": 0} if path.suffix == ".jpg" else {}
    Image.fromarray(colour_coded(class_ids)).save(path, **options)


def save_label(path, values, mode="L"):
    """Writes label values as an 8-bit grayscale PNG, or as a palette PNG for mode 'P'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.fromarray(np.asarray(values, np.uint8))
    if mode == "P":
        label = label.convert("P")
        label.putpalette([channel for value in range(256) for channel in (value, 255 - value, value // 2)])
    label.save(path)


def run(*argv):
    """Runs evaluate.main in this process; returns its exit code."""
    return evaluate.main([str(arg) for arg in argv])


def read_report(path):
    """The JSON report at `path`."""
    return json.loads(Path(path).read_text())


def run_cli(*argv, cwd):
    """Runs `python evaluate.py` as a subprocess in `cwd`, in the environment of a user who has not
    set TensorFlow's log level (an import of TensorFlow in this process sets it); returns the
    completed process."""
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "evaluate.py"), *map(str, argv)],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=environment,
    )


def model_sha256(config):
    """The SHA-256 of the canonical JSON of the description fields that change a model's predictions."""
    fields = {"depth": config.depth, "classes": config.classes, "crop_size": config.crop_size,
              "base_size": config.base_size, "mean_rgb": list(config.mean_rgb)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def skipped_line(skipped, expected):
    """The last line of a run that skipped `skipped` of `expected` images."""
    return (
        f"evaluate.py: {skipped} of {expected} images could not be evaluated (named above and under "
        '"skipped" in the report); the metrics count the others'
    )


def by_class(report, key):
    """{class id: value} of `key` in the report's per-class rows where it is defined."""
    return {row["id"]: row[key] for row in report["per_class"] if row[key] is not None}


# VOC set used by several tests: two 40x30 images (rows x columns below are 0-based, inclusive).
# 2007_000001: predicted 0 in columns 0-15, 1 in 16-39; labelled 0 in columns 0-11, 1 elsewhere,
#              row 29 is 255 (ignored).
# 2007_000002: predicted 3 in rows 0-7, 2 in rows 8-29; labelled 0 in rows 0-7, 2 below, except a
#              255 box (rows 20-29, columns 0-9) and a class-5 box (rows 10-14, columns 30-39).
# Confusion [label, prediction]: [0,0] = 29*12 = 348, [1,0] = 29*4 = 116, [1,1] = 29*24 = 696,
# [0,3] = 8*40 = 320, [2,2] = 22*40 - 100 - 50 = 730, [5,2] = 5*10 = 50. Labelled pixels: 2260.
# Labelled per class: 0 668, 1 812, 2 730, 5 50. Predicted per class: 0 464, 1 696, 2 780, 3 320.
# Classes 4 and 6-20: empty union (null, left out of the means); class 3: IoU 0, accuracy null.
VOC_IOU = {0: 348 / (668 + 464 - 348), 1: 696 / (812 + 696 - 696), 2: 730 / (730 + 780 - 730), 3: 0.0, 5: 0.0}
VOC_ACC = {0: 348 / 668, 1: 696 / 812, 2: 730 / 730, 5: 0 / 50}
VOC_PIXEL_ACC = (348 + 696 + 730) / 2260
VOC_PREDICTIONS = {
    "2007_000001": np.where(np.arange(WIDTH) < 16, 0, 1)[np.newaxis, :].repeat(HEIGHT, axis=0),
    "2007_000002": np.where(np.arange(HEIGHT) < 8, 3, 2)[:, np.newaxis].repeat(WIDTH, axis=1),
}


def make_voc(root, names=("2007_000001", "2007_000002")):
    """Writes the VOC set described above under root/VOCdevkit/VOC2012, plus an image outside val."""
    base = root / "VOCdevkit" / "VOC2012"
    label = np.ones((HEIGHT, WIDTH), np.uint8)
    label[:, :12] = 0
    label[29, :] = 255
    labels = {"2007_000001": label}
    label = np.full((HEIGHT, WIDTH), 2, np.uint8)
    label[:8, :] = 0
    label[20:, :10] = 255
    label[10:15, 30:] = 5
    labels["2007_000002"] = label
    for name, predicted in VOC_PREDICTIONS.items():
        save_colour_image(base / "JPEGImages" / f"{name}.jpg", predicted)
        save_label(base / "SegmentationClass" / f"{name}.png", labels[name], mode="P")
    save_colour_image(base / "JPEGImages" / "2007_000009.jpg", np.full((HEIGHT, WIDTH), 7))
    save_label(base / "SegmentationClass" / "2007_000009.png", np.zeros((HEIGHT, WIDTH)), mode="P")
    listing = base / "ImageSets" / "Segmentation"
    listing.mkdir(parents=True)
    (listing / "val.txt").write_text("".join(f"{name}\n" for name in names))
    (listing / "train.txt").write_text("2007_000009\n")
    return base


def assert_voc_metrics(report):
    assert by_class(report, "iou") == pytest.approx(VOC_IOU)
    assert by_class(report, "acc") == pytest.approx(VOC_ACC)
    assert report["miou"] == pytest.approx(sum(VOC_IOU.values()) / 5)
    assert report["mean_acc"] == pytest.approx(sum(VOC_ACC.values()) / 4)
    assert report["pixel_acc"] == pytest.approx(VOC_PIXEL_ACC)


@pytest.mark.parametrize("nesting", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_voc_metrics_by_hand(tmp_path, network, weights, nesting):
    make_voc(tmp_path / "data")
    report_path = tmp_path / "out.json"
    code = run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data" / nesting,
               "-s", "--no-flip", "--report", report_path)
    assert code == 0
    report = read_report(report_path)
    assert_voc_metrics(report)
    assert [row["id"] for row in report["per_class"]] == list(range(21))
    assert report["per_class"][1]["name"] == "aeroplane"
    assert report["per_class"][20]["name"] == "tvmonitor"
    empty_union = [row for row in report["per_class"] if row["id"] in (4, *range(6, 21))]
    assert all(row["iou"] is None and row["acc"] is None for row in empty_union)
    assert report["per_class"][3]["iou"] == 0.0 and report["per_class"][3]["acc"] is None
    assert report["images"] == 2 and report["partial"] is False and report["skipped"] == []
    assert report["published"] is None
    assert report["settings"] == {
        "model": "pspnet101_voc2012",
        "model_sha256": model_sha256(models.RELEASED_MODELS["pspnet101_voc2012"]),
        "weights": str(weights[0]),
        "weights_sha256": weights[1],
        "sliding": True,
        "multi_scale": False,
        "flip": False,
        "dataset": "voc2012",
        "split": "val",
        "data_root": str(tmp_path / "data" / nesting),
        "limit": None,
    }
    assert network.calls == [{"sliding": True, "flip": False, "multi_scale": False}] * 2


def make_ade20k(root):
    """One validation image, ADE_val_00000001: predicted 0 in columns 0-15, 1 in 16-39; labelled
    1 (class 0) in columns 0-19 and 2 (class 1) in 20-39, 0 (ignored) in rows 0-9 and 150 (class 149)
    in rows 20-29 x columns 30-39. Plus a training image that must not be evaluated."""
    base = root / "ADEChallengeData2016"
    predicted = np.where(np.arange(WIDTH) < 16, 0, 1)[np.newaxis, :].repeat(HEIGHT, axis=0)
    label = np.where(np.arange(WIDTH) < 20, 1, 2)[np.newaxis, :].repeat(HEIGHT, axis=0)
    label[:10, :] = 0
    label[20:, 30:] = 150
    save_colour_image(base / "images" / "validation" / "ADE_val_00000001.jpg", predicted)
    save_label(base / "annotations" / "validation" / "ADE_val_00000001.png", label)
    save_colour_image(base / "images" / "training" / "ADE_train_00000001.jpg", np.full((HEIGHT, WIDTH), 5))
    save_label(base / "annotations" / "training" / "ADE_train_00000001.png", np.ones((HEIGHT, WIDTH)))
    return base


@pytest.mark.parametrize("root_is_challenge_folder", [False, True])
def test_ade20k_metrics_by_hand(tmp_path, network, weights, root_is_challenge_folder):
    base = make_ade20k(tmp_path / "data")
    root = base if root_is_challenge_folder else tmp_path / "data"
    code = run("-m", "pspnet50_ade20k", "-w", weights[0], "--data", root, "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    # Labelled rows 10-29. Class 0: 20 x 20 = 400 labelled, 320 predicted right, 80 predicted 1.
    # Class 1: 400 - 100 = 300 labelled, all right. Class 149: 100 labelled, predicted 1.
    # Predicted 1 on labelled pixels: 80 + 300 + 100 = 480.
    assert by_class(report, "iou") == pytest.approx({0: 320 / 400, 1: 300 / 480, 149: 0.0})
    assert by_class(report, "acc") == pytest.approx({0: 320 / 400, 1: 1.0, 149: 0.0})
    assert report["miou"] == pytest.approx((0.8 + 0.625 + 0.0) / 3)
    assert report["mean_acc"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert report["pixel_acc"] == pytest.approx(620 / 800)
    assert len(report["per_class"]) == 150
    assert report["per_class"][0]["name"] == "wall"
    assert report["per_class"][149]["name"] == "flag"
    assert report["images"] == 1
    assert network.calls == [{"sliding": False, "flip": True, "multi_scale": False}]


def test_published_numbers_shown_for_the_caffe_protocol_only(tmp_path, network, weights, capsys):
    make_ade20k(tmp_path / "data")
    common = ("-m", "pspnet50_ade20k", "-w", weights[0], "--data", tmp_path / "data")
    assert run(*common, "-s", "--report", tmp_path / "ss.json") == 0
    assert read_report(tmp_path / "ss.json")["published"] == {"miou": 0.4168, "pixel_acc": 0.8004}
    shown = capsys.readouterr().out
    assert "41.68" in shown and "80.04" in shown and "47.50" in shown
    assert run(*common, "-ms", "--report", tmp_path / "ms.json") == 0
    assert read_report(tmp_path / "ms.json")["published"] == {"miou": 0.4278, "pixel_acc": 0.8076}
    assert "42.78" in capsys.readouterr().out
    assert run(*common, "-s", "--no-flip", "--report", tmp_path / "noflip.json") == 0
    assert read_report(tmp_path / "noflip.json")["published"] is None
    assert "41.68" not in capsys.readouterr().out


def test_cityscapes_metrics_by_hand(tmp_path, network, weights):
    images = tmp_path / "data" / "leftImg8bit" / "val"
    labels = tmp_path / "data" / "gtFine" / "val"
    # aachen: labelTrainIds (preferred over a decoy labelIds file). Predicted 0 in columns 0-15,
    # 1 in 16-39; labelled 0 in columns 0-23, 1 in 24-39, row 0 is 255.
    predicted = np.where(np.arange(WIDTH) < 16, 0, 1)[np.newaxis, :].repeat(HEIGHT, axis=0)
    save_colour_image(images / "aachen" / "aachen_000000_000019_leftImg8bit.png", predicted)
    train_ids = np.where(np.arange(WIDTH) < 24, 0, 1)[np.newaxis, :].repeat(HEIGHT, axis=0)
    train_ids[0, :] = 255
    save_label(labels / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    save_label(labels / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", np.full((HEIGHT, WIDTH), 26))
    # bochum: labelIds only. Predicted 0 in rows 0-14, 13 in rows 15-29 x columns 0-19, 1 in rows
    # 15-29 x columns 20-39; labelled road (7) in rows 0-14, car (26) in rows 15-29, unlabeled (0) in
    # columns 0-4, static (4) in rows 0-14 x columns 35-39.
    predicted = np.zeros((HEIGHT, WIDTH), np.int64)
    predicted[15:, :20] = 13
    predicted[15:, 20:] = 1
    save_colour_image(images / "bochum" / "bochum_000000_000313_leftImg8bit.png", predicted)
    label_ids = np.full((HEIGHT, WIDTH), 7)
    label_ids[15:, :] = 26
    label_ids[:, :5] = 0
    label_ids[:15, 35:] = 4
    save_label(labels / "bochum" / "bochum_000000_000313_gtFine_labelIds.png", label_ids)

    code = run("-m", "pspnet101_cityscapes", "-w", weights[0], "--data", tmp_path / "data",
               "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    # aachen: [0,0] = 29*16 = 464, [0,1] = 29*8 = 232, [1,1] = 29*16 = 464.
    # bochum: [0,0] = 15*30 = 450, [13,13] = 15*15 = 225, [13,1] = 15*20 = 300.
    # Labelled: class 0 1146, class 1 464, class 13 525; predicted: 0 914, 1 996, 13 225.
    assert by_class(report, "iou") == pytest.approx({0: 914 / 1146, 1: 464 / 996, 13: 225 / 525})
    assert by_class(report, "acc") == pytest.approx({0: 914 / 1146, 1: 1.0, 13: 225 / 525})
    assert report["miou"] == pytest.approx((914 / 1146 + 464 / 996 + 225 / 525) / 3)
    assert report["mean_acc"] == pytest.approx((914 / 1146 + 1.0 + 225 / 525) / 3)
    assert report["pixel_acc"] == pytest.approx((914 + 464 + 225) / 2135)
    assert report["per_class"][13]["name"] == "car"
    assert report["images"] == 2


def test_cityscapes_label_ids_follow_the_official_train_id_table(tmp_path, network, weights):
    """Column x of the labels holds labelId x (plus a 255 column); the image predicts the official
    trainId of each column, and class 0 (first city) or 1 (second city) on ignored columns, so any
    labelId mapped to the wrong trainId, or wrongly kept, costs accuracy in at least one city."""
    label_ids = np.array([*OFFICIAL_CITYSCAPES_TRAIN_IDS, 255])[np.newaxis, :].repeat(8, axis=0)
    for city, filler in (("aachen", 0), ("bochum", 1)):
        expected = [
            OFFICIAL_CITYSCAPES_TRAIN_IDS.get(label_id, (None, 255))[1] for label_id in label_ids[0]
        ]
        predicted = np.array([filler if train_id == 255 else train_id for train_id in expected])
        stem = f"{city}_000000_000001"
        save_colour_image(tmp_path / "data" / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png",
                          predicted[np.newaxis, :].repeat(8, axis=0))
        save_label(tmp_path / "data" / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", label_ids)
    code = run("-m", "pspnet101_cityscapes", "-w", weights[0], "--data", tmp_path / "data",
               "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    assert report["pixel_acc"] == 1.0
    assert by_class(report, "iou") == {train_id: 1.0 for train_id in range(19)}
    assert by_class(report, "acc") == {train_id: 1.0 for train_id in range(19)}


def test_predictions_saved_and_reused_on_rerun(tmp_path, network, weights):
    make_voc(tmp_path / "data")
    save_dir = tmp_path / "predictions"
    arguments = ("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--save-dir", save_dir)
    assert run(*arguments) == 0
    assert len(network.calls) == 2
    for name, expected in VOC_PREDICTIONS.items():
        with Image.open(save_dir / f"{name}.png") as saved:
            assert saved.format == "PNG" and saved.mode == "L"
            np.testing.assert_array_equal(np.asarray(saved), expected)
    assert sorted(path.name for path in save_dir.iterdir()) == [
        "2007_000001.png", "2007_000002.png", "metrics.json", "predictions.json"
    ]
    assert_voc_metrics(read_report(save_dir / "metrics.json"))

    network.calls.clear()
    (save_dir / "metrics.json").unlink()
    assert run(*arguments) == 0
    assert network.calls == []
    assert_voc_metrics(read_report(save_dir / "metrics.json"))

    (save_dir / "2007_000002.png").unlink()
    assert run(*arguments) == 0
    assert len(network.calls) == 1
    assert_voc_metrics(read_report(save_dir / "metrics.json"))


def test_save_dir_of_other_settings_is_refused(tmp_path, network, weights, capsys):
    make_voc(tmp_path / "data")
    save_dir = tmp_path / "predictions"
    arguments = ("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--save-dir", save_dir)
    assert run(*arguments) == 0
    network.calls.clear()
    capsys.readouterr()
    assert run(*arguments, "-ms") == 1
    assert network.calls == []
    error = capsys.readouterr().err
    assert str(save_dir) in error and "multi_scale" in error
    assert error.count("\n") == 1


def test_interrupt_reports_partial_metrics_and_rerun_resumes(tmp_path, network, weights):
    make_voc(tmp_path / "data")
    save_dir = tmp_path / "predictions"
    arguments = ("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--save-dir", save_dir)
    network.interrupt_at_call = 2
    assert run(*arguments) == 130
    report = read_report(save_dir / "metrics.json")
    assert report["partial"] is True
    assert report["images"] == 1
    # 2007_000001 alone: [0,0] = 348, [1,0] = 116, [1,1] = 696.
    assert by_class(report, "iou") == pytest.approx({0: 348 / 464, 1: 696 / 812})
    assert report["pixel_acc"] == pytest.approx((348 + 696) / 1160)
    assert report["miou"] == pytest.approx((348 / 464 + 696 / 812) / 2)

    network.calls.clear()
    network.interrupt_at_call = None
    assert run(*arguments) == 0
    assert len(network.calls) == 1
    report = read_report(save_dir / "metrics.json")
    assert report["partial"] is False and report["images"] == 2
    assert_voc_metrics(report)


def test_corrupt_image_and_missing_label_are_skipped(tmp_path, network, weights, capsys):
    base = make_voc(tmp_path / "data", names=("2007_000001", "2007_000003", "2007_000002", "2007_000004"))
    (base / "JPEGImages" / "2007_000003.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    save_label(base / "SegmentationClass" / "2007_000003.png", np.zeros((HEIGHT, WIDTH)), mode="P")
    save_colour_image(base / "JPEGImages" / "2007_000004.jpg", np.zeros((HEIGHT, WIDTH), np.int64))
    code = run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data",
               "--report", tmp_path / "r.json")
    assert code == 1
    report = read_report(tmp_path / "r.json")
    assert report["images"] == 2 and report["partial"] is False
    assert_voc_metrics(report)
    assert [entry["file"] for entry in report["skipped"]] == [
        str(base / "JPEGImages" / "2007_000003.jpg"), str(base / "SegmentationClass" / "2007_000004.png")
    ]
    assert all(entry["problem"] for entry in report["skipped"])
    error_lines = capsys.readouterr().err.splitlines()
    assert len([line for line in error_lines if "2007_000003.jpg" in line]) == 1
    assert len([line for line in error_lines if "2007_000004.png" in line and "missing" in line]) == 1
    assert error_lines[-1] == skipped_line(2, 4)
    assert len(network.calls) == 2


def test_limit_evaluates_the_first_images(tmp_path, network, weights):
    make_voc(tmp_path / "data")
    code = run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--limit", 1,
               "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    assert report["images"] == 1 and report["settings"]["limit"] == 1
    assert by_class(report, "iou") == pytest.approx({0: 348 / 464, 1: 696 / 812})


@pytest.mark.parametrize("model, expected", [
    ("pspnet50_ade20k", ["ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations/validation"]),
    ("pspnet101_cityscapes", ["leftImg8bit/val", "gtFine/val"]),
    ("pspnet101_voc2012", ["ImageSets/Segmentation/val.txt", "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"]),
])
def test_wrong_root_is_a_clear_error(tmp_path, model, expected):
    root = tmp_path / "not_a_dataset"
    root.mkdir()
    result = run_cli("-m", model, "--data", root, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("evaluate.py: ") and result.stderr.count("\n") == 1
    for path in expected:
        assert str(root / path) in result.stderr
    assert sorted(tmp_path.iterdir()) == [root]


def test_missing_weights_file_is_a_clear_error(tmp_path):
    make_voc(tmp_path / "data")
    result = run_cli("-m", "pspnet101_voc2012", "-w", tmp_path / "absent.h5", "--data", tmp_path / "data",
                     "--report", tmp_path / "r.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "absent.h5") in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_model_of_another_dataset_is_refused(tmp_path):
    images = tmp_path / "cityscapes" / "leftImg8bit" / "val" / "aachen"
    save_colour_image(images / "aachen_000000_000019_leftImg8bit.png", np.zeros((HEIGHT, WIDTH), np.int64))
    (tmp_path / "cityscapes" / "gtFine" / "val").mkdir(parents=True)
    result = run_cli("-m", "pspnet50_ade20k", "--data", tmp_path / "cityscapes", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Cityscapes" in result.stderr and "pspnet101_cityscapes" in result.stderr


@pytest.mark.slow
def test_end_to_end_with_synthetic_weights(tmp_path, synthetic_model):
    """The real network (synthetic weights) on two small ADE20K images; the metrics must be
    those computed here, class by class, from the saved predictions and the labels."""
    base = tmp_path / "data" / "ADEChallengeData2016"
    rng = np.random.default_rng(5)
    labels = {}
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        image = Image.fromarray(rng.integers(0, 256, (36, 52, 3), dtype=np.uint8))
        (base / "images" / "validation").mkdir(parents=True, exist_ok=True)
        image.save(base / "images" / "validation" / f"{stem}.jpg")
        labels[stem] = rng.integers(0, 151, (36, 52)).astype(np.uint8)
        save_label(base / "annotations" / "validation" / f"{stem}.png", labels[stem])
    save_dir = tmp_path / "predictions"
    result = run_cli("-m", "pspnet50_ade20k", "-w", synthetic_model("pspnet50_ade20k").converted_h5,
                     "--data", tmp_path / "data", "--no-flip", "--save-dir", save_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(save_dir / "metrics.json")
    assert report["images"] == 2 and report["partial"] is False and report["skipped"] == []

    predicted = {}
    for stem in labels:
        with Image.open(save_dir / f"{stem}.png") as saved:
            assert saved.mode == "L"
            predicted[stem] = np.asarray(saved).astype(np.int64)
    pred = np.concatenate([predicted[stem].ravel() for stem in labels])
    label = np.concatenate([labels[stem].ravel() for stem in labels]).astype(np.int64)
    assert pred.max() < 150
    expected_iou, expected_acc = {}, {}
    for class_id in range(150):
        is_label = label == class_id + 1
        is_pred = (pred == class_id) & (label != 0)
        true_positives = np.sum(is_label & is_pred)
        if np.sum(is_label | is_pred):
            expected_iou[class_id] = true_positives / np.sum(is_label | is_pred)
        if np.sum(is_label):
            expected_acc[class_id] = true_positives / np.sum(is_label)
    assert by_class(report, "iou") == pytest.approx(expected_iou)
    assert by_class(report, "acc") == pytest.approx(expected_acc)
    assert report["miou"] == pytest.approx(np.mean(list(expected_iou.values())))
    assert report["mean_acc"] == pytest.approx(np.mean(list(expected_acc.values())))
    assert report["pixel_acc"] == pytest.approx(np.sum((pred + 1 == label) & (label != 0)) / np.sum(label != 0))
    assert report["settings"]["flip"] is False


# ---------------------------------------------------------------------------------------
# The folders layout and users' own models

FOLDER_CLASSES = ("sky", "tree", "road")
# Folders set: three 40x30 images of val in three formats (rows x columns 0-based, inclusive).
# a.png: predicted 0 in rows 0-15, 2 in rows 16-29; labelled 0 in rows 0-9, 1 in rows 10-19, 2 in
#        rows 20-29, columns 0-3 are 255 (ignored).
# b.jpg: predicted 2 in columns 0-15, 1 in columns 16-39; labelled 1 in columns 0-23, 2 in 24-39.
# c.bmp: predicted 0 everywhere; labelled 0, row 29 is 255.
# Confusion [label, prediction], 36 labelled columns in a.png:
# a: [0,0] = 10*36 = 360, [1,0] = 6*36 = 216, [1,2] = 4*36 = 144, [2,2] = 10*36 = 360.
# b: [1,2] = 30*16 = 480, [1,1] = 30*8 = 240, [2,1] = 30*16 = 480.   c: [0,0] = 29*40 = 1160.
# Labelled per class: 0 1520, 1 1080, 2 840 (3440); predicted: 0 1736, 1 720, 2 984.
FOLDERS_IOU = {0: 1520 / (1520 + 1736 - 1520), 1: 240 / (1080 + 720 - 240), 2: 360 / (840 + 984 - 360)}
FOLDERS_ACC = {0: 1520 / 1520, 1: 240 / 1080, 2: 360 / 840}
FOLDERS_PIXEL_ACC = (1520 + 240 + 360) / 3440


def make_folders(root, class_names=FOLDER_CLASSES, palette=None):
    """Writes the folders set described above under `root`, with palette.txt when `palette` is given,
    plus files that are no samples: a text file, a hidden image and an image of the train split."""
    images, labels = root / "images" / "val", root / "labels" / "val"
    rows, columns = np.arange(HEIGHT)[:, np.newaxis], np.arange(WIDTH)[np.newaxis, :]
    predicted = np.where(rows < 16, 0, 2).repeat(WIDTH, axis=1)
    label = np.select([rows < 10, rows < 20], [0, 1], 2).repeat(WIDTH, axis=1)
    label[:, :4] = 255
    save_colour_image(images / "a.png", predicted)
    save_label(labels / "a.png", label)
    save_colour_image(images / "b.jpg", np.where(columns < 16, 2, 1).repeat(HEIGHT, axis=0))
    save_label(labels / "b.png", np.where(columns < 24, 1, 2).repeat(HEIGHT, axis=0), mode="P")
    save_colour_image(images / "c.bmp", np.zeros((HEIGHT, WIDTH), np.int64))
    label = np.zeros((HEIGHT, WIDTH))
    label[29, :] = 255
    save_label(labels / "c.png", label)
    (images / "notes.txt").write_text("not an image\n")
    save_colour_image(images / ".hidden.png", np.ones((HEIGHT, WIDTH), np.int64))
    save_colour_image(root / "images" / "train" / "t.png", np.ones((HEIGHT, WIDTH), np.int64))
    save_label(root / "labels" / "train" / "t.png", np.ones((HEIGHT, WIDTH)))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    if palette is not None:
        (root / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in palette))
    return root


def write_user_model(directory, name="mine", classes=len(FOLDER_CLASSES)):
    """A user model: dummy weights <name>.h5 (the stand-in ignores them) with its description beside."""
    directory.mkdir(parents=True, exist_ok=True)
    description = {
        "format": "pspnet-keras", "version": 1, "depth": 50, "classes": classes, "crop_size": 41,
        "base_size": 64, "class_names": [f"class {i}" for i in range(classes)],
        "palette": [[i, i, i] for i in range(classes)],
    }
    (directory / f"{name}.json").write_text(json.dumps(description))
    (directory / f"{name}.h5").write_bytes(b"user weights")
    return directory / f"{name}.h5"


def assert_folders_metrics(report):
    assert by_class(report, "iou") == pytest.approx(FOLDERS_IOU)
    assert by_class(report, "acc") == pytest.approx(FOLDERS_ACC)
    assert report["miou"] == pytest.approx(sum(FOLDERS_IOU.values()) / 3)
    assert report["mean_acc"] == pytest.approx(sum(FOLDERS_ACC.values()) / 3)
    assert report["pixel_acc"] == pytest.approx(FOLDERS_PIXEL_ACC)
    assert report["labelled_pixels"] == 3440


@pytest.mark.parametrize("palette, dataset_flag", [
    (None, ()),
    (((10, 20, 30), (40, 50, 60), (70, 80, 90)), ("--dataset", "folders")),
])
def test_user_model_on_folders_metrics_by_hand(tmp_path, network, palette, dataset_flag):
    root = make_folders(tmp_path / "data", palette=palette)
    weights = write_user_model(tmp_path / "model")
    code = run("-w", weights, "--data", root, *dataset_flag, "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    assert_folders_metrics(report)
    assert [(row["id"], row["name"]) for row in report["per_class"]] == list(enumerate(FOLDER_CLASSES))
    assert report["images"] == 3 and report["images_expected"] == 3 and report["skipped"] == []
    assert report["published"] is None and report["partial"] is False
    assert report["settings"]["model"] == "mine" and report["settings"]["dataset"] == "folders"
    assert report["settings"]["weights_sha256"] == hashlib.sha256(b"user weights").hexdigest()
    (construction,) = network.constructions
    assert construction["model"].name == "mine" and construction["model"].classes == 3
    assert not construction["model"].released and Path(construction["weights"]) == weights
    assert len(network.calls) == 3

    dataset = datasets.open_dataset("folders", root)
    assert dataset.class_names == FOLDER_CLASSES
    # Without palette.txt: the first PASCAL VOC colormap entries (background, aeroplane, bicycle).
    assert dataset.palette == (palette or ((0, 0, 0), (128, 0, 0), (0, 128, 0)))


def test_released_model_on_folders_data_of_its_classes(tmp_path, network, weights):
    names = [f"my {name}" for name in models.RELEASED_MODELS["pspnet101_voc2012"].class_names]
    root = make_folders(tmp_path / "data", class_names=names)
    code = run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", root, "-s", "--report", tmp_path / "r.json")
    assert code == 0
    report = read_report(tmp_path / "r.json")
    assert_folders_metrics(report)
    assert report["per_class"][20]["name"] == "my tvmonitor"
    assert report["published"] is None and report["settings"]["dataset"] == "folders"


def test_class_count_of_data_and_model_must_agree(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data", class_names=FOLDER_CLASSES + ("car",))
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    assert capsys.readouterr().err == (
        f"evaluate.py: {root / 'classes.txt'} has 4 classes but the model mine has 3; "
        "evaluate it on data with its classes\n"
    )
    assert network.constructions == [] and not (tmp_path / "r.json").exists()


def test_default_model_is_pspnet50_ade20k(tmp_path, network, capsys):
    make_ade20k(tmp_path / "ade")
    assert run("--data", tmp_path / "ade", "--report", tmp_path / "r.json") == 0
    assert network.constructions[0]["model"] is models.RELEASED_MODELS["pspnet50_ade20k"]
    assert network.constructions[0]["weights"] is None
    root = make_folders(tmp_path / "mine")
    capsys.readouterr()
    assert run("--data", root, "--report", tmp_path / "r2.json") == 1
    assert capsys.readouterr().err == (
        f"evaluate.py: {root / 'classes.txt'} has 3 classes but the model pspnet50_ade20k has 150; "
        "pass a model of these classes with -w\n"
    )


def test_released_name_with_a_user_model_is_refused(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    assert run("-m", "pspnet50_ade20k", "-w", weights, "--data", root) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"evaluate.py: {weights}: ") and "leave out -m pspnet50_ade20k" in line
    assert network.constructions == []


def test_two_layouts_at_one_root_need_dataset(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    (root / "annotations").mkdir()
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root) == 1
    assert capsys.readouterr().err == (
        f"evaluate.py: {root} holds the layouts of ade20k and folders; choose one with --dataset\n"
    )
    assert run("-w", weights, "--data", root, "--dataset", "folders", "--report", tmp_path / "r.json") == 0
    assert_folders_metrics(read_report(tmp_path / "r.json"))


def test_long_flags_take_either_spelling(tmp_path, network):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    code = run("--weights", weights, "--data", root, "--save_dir", tmp_path / "saved", "--multi-scale",
               "--no_flip", "--report=" + str(tmp_path / "r.json"))
    assert code == 0
    assert network.calls == [{"sliding": False, "flip": False, "multi_scale": True}] * 3
    assert sorted(path.name for path in (tmp_path / "saved").iterdir()) == [
        "a.png", "b.png", "c.png", "predictions.json"
    ]
    assert_folders_metrics(read_report(tmp_path / "r.json"))


# ---------------------------------------------------------------------------------------
# Hostile input: one line and exit status 1 (or a skipped file), never a traceback, a hang or a lost file


@pytest.mark.parametrize("content, kind", [
    ("[1, 2]", "an array"), ('"settings"', "a string"), ("3", "a number"), ("null", "null"),
])
def test_prediction_record_that_is_no_object_is_refused(tmp_path, network, content, kind, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    save_dir.mkdir()
    (save_dir / "predictions.json").write_text(content)
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 1
    assert capsys.readouterr().err == (
        f"evaluate.py: {save_dir / 'predictions.json'}: holds {kind}, not the JSON object of prediction "
        "settings this program writes there; delete it or choose another --save-dir\n"
    )
    assert network.constructions == []
    assert sorted(path.name for path in save_dir.iterdir()) == ["predictions.json"]


def report_targets(tmp_path, weights, root, save_dir):
    """{case: path} of inputs a --report must not replace, after a run that filled `save_dir`."""
    os.symlink(root / "labels" / "val" / "b.png", tmp_path / "link_to_label.json")
    os.link(root / "images" / "val" / "a.png", tmp_path / "hard_link_to_image.json")
    return {
        "weights": weights,
        "description": weights.with_suffix(".json"),
        "image": root / "images" / "val" / "c.bmp",
        "label": root / "labels" / "val" / "a.png",
        "classes": root / "classes.txt",
        "record": save_dir / "predictions.json",
        "prediction": save_dir / "b.png",
        "symlink": tmp_path / "link_to_label.json",
        "hard link": tmp_path / "hard_link_to_image.json",
    }


REPORT_TARGET_CASES = {
    "weights": "the weights file", "description": "the model description", "image": "an image of the set",
    "label": "a label of the set", "classes": "a class file of the dataset",
    "record": "the prediction record of --save-dir", "prediction": "a saved prediction of --save-dir",
    "symlink": "a label of the set", "hard link": "an image of the set",
}


@pytest.mark.parametrize("case", REPORT_TARGET_CASES)
def test_report_on_an_input_is_refused_before_any_work(tmp_path, network, case, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    target = report_targets(tmp_path, weights, root, save_dir)[case]
    contents = {path: path.read_bytes() for path in (*root.rglob("*.*"), *save_dir.iterdir(), weights)}
    network.constructions.clear()
    capsys.readouterr()
    assert run("-w", weights, "--data", root, "--save-dir", save_dir, "--report", target, "--overwrite") == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"evaluate.py: {target}: is {REPORT_TARGET_CASES[case]} ")
    assert line.endswith(", which this command reads; it is never replaced; choose another --report")
    assert network.constructions == []
    assert {path: path.read_bytes() for path in contents} == contents


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_report_on_a_special_file_is_refused(tmp_path, network, kind, capsys, hang_guard):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    target = {"fifo": tmp_path / "pipe", "directory": tmp_path / "folder", "device": Path(os.devnull)}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    if kind == "directory":
        target.mkdir()
    assert run("-w", weights, "--data", root, "--report", target) == 1
    problem = "is a directory" if kind == "directory" else "exists and is not a regular file; refusing to replace it"
    assert capsys.readouterr().err == f"evaluate.py: {target}: {problem}; choose another --report\n"
    assert network.constructions == []
    assert os.path.exists(target) and not target.is_file()


def test_report_folder_must_exist_before_the_run(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    target = tmp_path / "absent" / "r.json"
    assert run("-w", weights, "--data", root, "--report", target) == 1
    assert capsys.readouterr().err == f"evaluate.py: {target}: folder {target.parent}: no such directory\n"
    assert network.constructions == [] and not target.parent.exists()


def test_save_dir_on_the_labels_is_refused(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    labels = root / "labels" / "val"
    before = {path: path.read_bytes() for path in labels.iterdir()}
    assert run("-w", weights, "--data", root, "--save-dir", labels, "--report", tmp_path / "r.json") == 1
    assert capsys.readouterr().err == (
        f"evaluate.py: {labels}: lies in --data {root}, whose files this command never replaces; "
        "choose a --save-dir outside it\n"
    )
    assert network.constructions == []
    assert {path: path.read_bytes() for path in labels.iterdir()} == before


def test_labels_with_nothing_to_count_are_a_failure(tmp_path, network, capsys):
    """Every pixel of every label is unlabelled (255) or no class (3 and 9 in a 3-class set)."""
    root = make_folders(tmp_path / "data")
    labels = root / "labels" / "val"
    save_label(labels / "a.png", np.full((HEIGHT, WIDTH), 255))
    save_label(labels / "b.png", np.where(np.arange(WIDTH) < 20, 3, 255)[np.newaxis, :].repeat(HEIGHT, axis=0))
    save_label(labels / "c.png", np.where(np.arange(WIDTH) < 10, 9, 3)[np.newaxis, :].repeat(HEIGHT, axis=0))
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    error_lines = capsys.readouterr().err.splitlines()
    assert error_lines[-1] == (
        "evaluate.py: nothing to count: no pixel of the 3 evaluated labels holds a class of the dataset "
        f"(every value is unlabelled or undefined); check the labels under {root}"
    )
    warnings = [line for line in error_lines if line.startswith("evaluate.py: warning: ")]
    assert warnings == [
        f"evaluate.py: warning: {labels / 'b.png'}: label values 3 are not among the defined values (0-2, 255); "
        "counted as unlabelled",
        f"evaluate.py: warning: {labels / 'c.png'}: label values 3, 9 are not among the defined values (0-2, 255); "
        "counted as unlabelled",
    ]
    report = read_report(tmp_path / "r.json")
    assert report["labelled_pixels"] == 0 and report["miou"] is None and report["images"] == 3


def test_undefined_label_values_count_as_unlabelled_with_one_warning_per_file(tmp_path, network, capsys):
    """b.png gets values 7 and 200 in rows 0-4 and 100 in row 5: those 6 rows of 40 count nowhere.
    b alone would have been [1,2] = 30*16, [1,1] = 30*8, [2,1] = 30*16; now 24 rows of each."""
    root = make_folders(tmp_path / "data")
    label = np.where(np.arange(WIDTH) < 24, 1, 2)[np.newaxis, :].repeat(HEIGHT, axis=0)
    label[:5, :20] = 7
    label[:5, 20:] = 200
    label[5, :] = 100
    save_label(root / "labels" / "val" / "b.png", label)
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"evaluate.py: warning: {root / 'labels' / 'val' / 'b.png'}: label values 7, 100, 200 are not among the "
        "defined values (0-2, 255); counted as unlabelled"
    ]
    report = read_report(tmp_path / "r.json")
    assert report["undefined_label_values"] == [
        {"file": str(root / "labels" / "val" / "b.png"), "values": [7, 100, 200]}
    ]
    # Confusion: a and c as in the folders set; b: [1,2] = 24*16 = 384, [1,1] = 24*8 = 192, [2,1] = 24*16 = 384.
    # Labelled: 0 1520, 1 216 + 144 + 384 + 192 = 936, 2 384 + 360 = 744; predicted: 0 1736, 1 576, 2 888.
    assert by_class(report, "iou") == pytest.approx(
        {0: 1520 / 1736, 1: 192 / (936 + 576 - 192), 2: 360 / (744 + 888 - 360)}
    )
    assert by_class(report, "acc") == pytest.approx({0: 1.0, 1: 192 / 936, 2: 360 / 744})
    assert report["pixel_acc"] == pytest.approx((1520 + 192 + 360) / (1520 + 936 + 744))


@pytest.mark.slow
def test_malformed_weights_file_is_one_line(tmp_path):
    """A user model whose HDF5 file has a `weight_names` attribute of numbers: the real network refuses it."""
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    weights.unlink()
    with h5py.File(weights, "w") as handle:
        handle.attrs["layer_names"] = np.array([b"conv1_1_3x3_s2"])
        group = handle.create_group("conv1_1_3x3_s2")
        group.attrs["weight_names"] = np.array([1, 2, 3])
        group.create_dataset("conv1_1_3x3_s2/kernel:0", data=np.zeros((3, 3, 3, 64), np.float32))
    result = run_cli("-w", weights, "--data", root, "--report", tmp_path / "r.json", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"evaluate.py: {weights}: layer conv1_1_3x3_s2 has a weight_names attribute that is not a list of names"
    ]
    assert not (tmp_path / "r.json").exists()


def test_special_images_and_labels_are_skipped_one_line_each(tmp_path, network, capsys, hang_guard):
    root = make_folders(tmp_path / "data")
    images, labels = root / "images" / "val", root / "labels" / "val"
    os.mkfifo(images / "d_fifo.png")
    save_label(labels / "d_fifo.png", np.zeros((HEIGHT, WIDTH)))
    (images / "e_dir.png").mkdir()
    save_label(labels / "e_dir.png", np.zeros((HEIGHT, WIDTH)))
    os.symlink(images / "f_loop.png", images / "f_loop.png")
    save_label(labels / "f_loop.png", np.zeros((HEIGHT, WIDTH)))
    save_colour_image(images / "g.png", np.zeros((HEIGHT, WIDTH), np.int64))
    os.mkfifo(labels / "g.png")
    save_colour_image(images / "h.png", np.zeros((HEIGHT, WIDTH), np.int64))
    (labels / "h.png").mkdir()
    save_colour_image(images / "i.png", np.zeros((HEIGHT, WIDTH), np.int64))
    os.symlink(labels / "i.png", labels / "i.png")
    weights = write_user_model(tmp_path / "model")
    assert run("-w", weights, "--data", root, "--report", tmp_path / "r.json") == 1
    expected = {
        images / "d_fifo.png": "is a FIFO, not a regular file",
        images / "e_dir.png": "is a directory, not a file",
        images / "f_loop.png": "symbolic link loop",
        labels / "g.png": "is a FIFO, not a regular file",
        labels / "h.png": "is a directory, not a file",
        labels / "i.png": "symbolic link loop",
    }
    error_lines = capsys.readouterr().err.splitlines()
    skipped_lines = [line for line in error_lines if line.startswith("evaluate.py: skipped")]
    assert sorted(skipped_lines) == sorted(
        f"evaluate.py: skipped {path}: {problem}" for path, problem in expected.items()
    )
    assert error_lines[-1] == skipped_line(6, 9)
    report = read_report(tmp_path / "r.json")
    assert {entry["file"]: entry["problem"] for entry in report["skipped"]} == {
        str(path): problem for path, problem in expected.items()
    }
    assert report["images"] == 3 and report["images_expected"] == 9
    assert_folders_metrics(report)


def test_sigterm_writes_the_partial_report_and_exits_143(tmp_path, network, capsys):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    save_dir = tmp_path / "saved"
    network.terminate_at_call = 2
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 143
    assert "evaluate.py: terminated; reporting the images done so far" in capsys.readouterr().err.splitlines()
    report = read_report(save_dir / "metrics.json")
    assert report["partial"] is True and report["images"] == 1
    # a.png alone: [0,0] = 360, [1,0] = 216, [1,2] = 144, [2,2] = 360.
    assert by_class(report, "iou") == pytest.approx({0: 360 / 576, 1: 0.0, 2: 360 / 504})
    assert sorted(path.name for path in save_dir.iterdir()) == ["a.png", "metrics.json", "predictions.json"]

    network.calls.clear()
    network.terminate_at_call = None
    assert run("-w", weights, "--data", root, "--save-dir", save_dir) == 0
    assert len(network.calls) == 2
    assert_folders_metrics(read_report(save_dir / "metrics.json"))


def test_written_files_follow_the_umask(tmp_path, network):
    root = make_folders(tmp_path / "data")
    weights = write_user_model(tmp_path / "model")
    previous = os.umask(0o002)
    try:
        assert run("-w", weights, "--data", root, "--save-dir", tmp_path / "saved") == 0
    finally:
        os.umask(previous)
    written = sorted((tmp_path / "saved").iterdir())
    assert [path.name for path in written] == ["a.png", "b.png", "c.png", "metrics.json", "predictions.json"]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_an_image_that_runs_out_of_memory_is_skipped_with_one_line(tmp_path, monkeypatch, network, weights, capsys):
    from pspnet_keras.inference import OutOfMemory

    make_voc(tmp_path / "data")
    problem = "not enough memory to segment a 40x30 image in the default mode: try a smaller image"
    predict = network.class_map

    def first_runs_out_of_memory(self, image, **protocol):
        if not self.calls:
            self.calls.append(protocol)
            raise OutOfMemory(problem)
        return predict(self, image, **protocol)

    monkeypatch.setattr(network, "class_map", first_runs_out_of_memory)
    report_path = tmp_path / "out.json"
    assert run("-m", "pspnet101_voc2012", "-w", weights[0], "--data", tmp_path / "data", "--report", report_path) == 1
    image = tmp_path / "data" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate.py:")] == [
        f"evaluate.py: skipped {image}: {problem}", skipped_line(1, 2)
    ]
    report = read_report(report_path)
    assert report["images"] == 1 and report["skipped"] == [{"file": str(image), "problem": problem}]
    assert len(network.calls) == 2
