"""Measures a PSPNet model on a user's copy of ADE20K, Cityscapes or PASCAL VOC 2012.

The metrics are those of the Caffe release (evaluation/eval_acc.m with
intersectionAndUnion.m and pixelAccuracy.m): one confusion matrix accumulated
over the whole set, then per class IoU = TP / (TP + FP + FN) and accuracy =
TP / (TP + FN), their means, and pixel accuracy = sum of TP / labelled pixels.
Unlabelled pixels count nowhere: ADE20K label 0, VOC and Cityscapes 255, and
Cityscapes labelIds outside the 19 evaluated classes. Classes whose union is
empty over the evaluated images are left out of the means and reported as null
(eval_acc.m counts them as 0); so are accuracies of classes without a labelled
pixel.

    python evaluate.py -m pspnet50_ade20k --data ~/data/ADEChallengeData2016 -s --save-dir runs/ade

With --save-dir every prediction is kept as `<image stem>.png` (0-based class
ids); a rerun scores those files instead of predicting again, so an interrupted
run resumes where it stopped. Ctrl-C writes the metrics of the images done so
far, marked partial, and exits with 130.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import pspnet
import utils

IGNORE_LABEL = 255
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
REPORT_NAME = "metrics.json"
PREDICTION_SETTINGS_NAME = "predictions.json"

DATASET_TITLES = {"ade20k": "ADE20K", "voc2012": "PASCAL VOC 2012", "cityscapes": "Cityscapes"}
ADE20K_SPLIT_FOLDERS = {"val": "validation", "train": "training"}

# cityscapesScripts labels.py: labelId -> trainId of the 19 evaluated classes;
# every other labelId is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

# Caffe release README (spec H), measured with the sliding-window protocol (-s, or
# -ms which slides at every scale) and flip: (model, split, multi-scale) -> (mIoU, pixel accuracy).
PUBLISHED_RESULTS = {
    ("pspnet50_ade20k", "val", False): (0.4168, 0.8004),
    ("pspnet50_ade20k", "val", True): (0.4278, 0.8076),
    ("pspnet101_cityscapes", "val", False): (0.7970, 0.9638),
    ("pspnet101_cityscapes", "val", True): (0.8091, 0.9659),
}


def label_table(first_value, classes):
    """Lookup table sending label values first_value .. first_value + classes - 1 to
    class ids 0 .. classes - 1 and every other 8-bit value to IGNORE_LABEL."""
    table = np.full(256, IGNORE_LABEL, np.uint8)
    table[first_value:first_value + classes] = np.arange(classes)
    return table


def cityscapes_label_id_table():
    """Lookup table sending Cityscapes labelIds to trainIds, IGNORE_LABEL for the rest."""
    table = np.full(256, IGNORE_LABEL, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


ADE20K_LABELS = label_table(1, 150)
VOC2012_LABELS = label_table(0, 21)
CITYSCAPES_TRAIN_ID_LABELS = label_table(0, 19)
CITYSCAPES_LABEL_ID_LABELS = cityscapes_label_id_table()


class DataRootError(Exception):
    """A dataset root that does not hold the expected layout."""


class SaveDirError(Exception):
    """A --save-dir whose contents cannot be reused by this run."""


class SampleError(Exception):
    """An image or label that cannot be evaluated: `path` names the file, `problem` says why."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One image of the set, its label image, and the table turning label values into class ids."""

    image: Path
    label: Path
    label_table: np.ndarray


def ade20k_samples(root, split):
    """The samples of ADEChallengeData2016/images/<split> under `root`, or under its parent."""
    folder = ADE20K_SPLIT_FOLDERS.get(split, split)
    bases = (root / "ADEChallengeData2016", root)
    for base in bases:
        images = base / "images" / folder
        annotations = base / "annotations" / folder
        if images.is_dir() and annotations.is_dir():
            return [
                Sample(image, annotations / f"{image.stem}.png", ADE20K_LABELS)
                for image in sorted(images.glob("*.jpg"))
            ]
    expected = " or ".join(f"{base / 'images' / folder} with {base / 'annotations' / folder}" for base in bases)
    raise DataRootError(f"{root} is not an ADE20K root: expected {expected}")


def cityscapes_samples(root, split):
    """The samples of leftImg8bit/<split>/<city> under `root`, labelled by gtFine labelTrainIds
    where present, else by gtFine labelIds."""
    images = root / "leftImg8bit" / split
    labels = root / "gtFine" / split
    if not (images.is_dir() and labels.is_dir()):
        raise DataRootError(f"{root} is not a Cityscapes root: expected {images} with {labels}")
    samples = []
    for image in sorted(images.glob("*/*_leftImg8bit.png")):
        prefix = image.name.removesuffix("_leftImg8bit.png")
        train_ids = labels / image.parent.name / f"{prefix}_gtFine_labelTrainIds.png"
        label_ids = labels / image.parent.name / f"{prefix}_gtFine_labelIds.png"
        if label_ids.is_file() and not train_ids.is_file():
            samples.append(Sample(image, label_ids, CITYSCAPES_LABEL_ID_LABELS))
        else:
            samples.append(Sample(image, train_ids, CITYSCAPES_TRAIN_ID_LABELS))
    return samples


def voc2012_samples(root, split):
    """The samples listed in ImageSets/Segmentation/<split>.txt of the VOC2012 folder at
    `root`, at root/VOC2012 or at root/VOCdevkit/VOC2012."""
    bases = (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    for base in bases:
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if listing.is_file():
            try:
                names = listing.read_text(encoding="utf-8").split()
            except (OSError, UnicodeDecodeError) as error:
                raise DataRootError(f"{listing}: cannot read the image list ({error})") from None
            return [
                Sample(base / "JPEGImages" / f"{name}.jpg", base / "SegmentationClass" / f"{name}.png", VOC2012_LABELS)
                for name in names
            ]
    expected = " or ".join(str(base / "ImageSets" / "Segmentation" / f"{split}.txt") for base in bases)
    raise DataRootError(f"{root} is not a PASCAL VOC 2012 root: expected {expected}")


SAMPLE_FINDERS = {"ade20k": ade20k_samples, "cityscapes": cityscapes_samples, "voc2012": voc2012_samples}


def datasets_laid_out_at(root):
    """The datasets whose folder layout `root` holds, whatever the split."""
    found = []
    if (root / "ADEChallengeData2016" / "images").is_dir() or (
        (root / "images").is_dir() and (root / "annotations").is_dir()
    ):
        found.append("ade20k")
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        found.append("cityscapes")
    if any(
        (base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir()
        for base in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012")
    ):
        found.append("voc2012")
    return found


def find_samples(model_name, root, split):
    """The samples of `split` of the dataset `model_name` is evaluated on, found under `root`."""
    dataset = pspnet.DATASETS[model_name]
    if not root.is_dir():
        raise DataRootError(f"{root}: no such directory")
    try:
        samples = SAMPLE_FINDERS[dataset](root, split)
    except DataRootError as error:
        other = [found for found in datasets_laid_out_at(root) if found != dataset]
        if not other:
            raise
        models = ", ".join(name for name, of in pspnet.DATASETS.items() if of in other)
        raise DataRootError(
            f"{root} holds {DATASET_TITLES[other[0]]}, but {model_name} is evaluated on "
            f"{DATASET_TITLES[dataset]} (use -m {models} for that data). {error}"
        ) from None
    if not samples:
        raise DataRootError(f"{root}: no {DATASET_TITLES[dataset]} images found for split '{split}'")
    return samples


def read_label(sample):
    """The label image of `sample` as 0-based class ids, IGNORE_LABEL where unlabelled."""
    if not sample.label.is_file():
        raise SampleError(sample.label, "label file missing")
    try:
        with Image.open(sample.label) as label:
            if label.mode not in ("L", "P"):
                raise SampleError(sample.label, f"label is not an 8-bit class-index image (mode {label.mode})")
            values = np.asarray(label)
    except (OSError, SyntaxError, ValueError) as error:
        raise SampleError(sample.label, f"cannot read label ({error})") from None
    return sample.label_table[values]


def read_saved_prediction(path, shape, classes):
    """The class ids an earlier run saved at `path`, or None where there is no usable file."""
    try:
        with Image.open(path) as saved:
            class_ids = np.asarray(saved) if saved.mode == "L" else None
    except (OSError, SyntaxError, ValueError):
        return None
    if class_ids is None or class_ids.shape != shape or class_ids.max() >= classes:
        return None
    return class_ids


def predict_class_ids(network, sample, shape, protocol):
    """The class id PSPNet predicts at every pixel of `sample`'s image, whose size must be `shape`."""
    if not sample.image.is_file():
        raise SampleError(sample.image, "image file missing")
    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        raise SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
    if image.shape[:2] != shape:
        raise SampleError(
            sample.image,
            f"image is {image.shape[1]}x{image.shape[0]} but its label {sample.label.name} is {shape[1]}x{shape[0]}",
        )
    from inference import best_classes

    class_ids, _ = best_classes(network.probability_map(image, **protocol))
    return class_ids


def confusion_matrix(label_ids, predicted_ids, classes):
    """Pixel counts indexed [label class, predicted class] over the labelled pixels of one image."""
    labelled = label_ids != IGNORE_LABEL
    pairs = label_ids[labelled].astype(np.int64) * classes + predicted_ids[labelled]
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


class Tally:
    """What a run has measured so far: the confusion matrix over the evaluated images and the skipped files."""

    def __init__(self, classes):
        self.confusion = np.zeros((classes, classes), np.int64)
        self.images = 0
        self.skipped = []

    def add(self, label_ids, predicted_ids):
        """Counts one evaluated image."""
        self.confusion += confusion_matrix(label_ids, predicted_ids, len(self.confusion))
        self.images += 1

    def skip(self, error):
        """Records, and reports on stderr, a file that could not be evaluated."""
        tqdm.write(f"evaluate: skipped {error.path}: {error.problem}", file=sys.stderr)
        self.skipped.append({"file": str(error.path), "problem": error.problem})


def prediction_path(save_dir, sample):
    """Where the prediction of `sample` is kept: <save dir>/<image stem>.png."""
    return save_dir / f"{sample.image.stem}.png"


def evaluate_sample(network, sample, save_dir, protocol, tally):
    """Adds `sample` to `tally`, reusing its saved prediction when there is one and saving a new one otherwise."""
    try:
        label_ids = read_label(sample)
        saved = prediction_path(save_dir, sample) if save_dir else None
        predicted_ids = read_saved_prediction(saved, label_ids.shape, network.classes) if saved else None
        if predicted_ids is None:
            predicted_ids = predict_class_ids(network, sample, label_ids.shape, protocol)
            if saved:
                utils.write_image_atomic(saved, predicted_ids)
    except SampleError as error:
        tally.skip(error)
        return
    tally.add(label_ids, predicted_ids)


def evaluate_samples(network, samples, save_dir, protocol, tally):
    """Adds every sample to `tally`: first those with a saved prediction, then the others,
    each group with its own progress bar so that the ETA reflects the predictions left."""
    saved, to_predict = [], []
    for sample in samples:
        has_saved = save_dir is not None and prediction_path(save_dir, sample).is_file()
        (saved if has_saved else to_predict).append(sample)
    for description, group in (("saved predictions", saved), ("predicting", to_predict)):
        if group:
            for sample in tqdm(group, desc=description, unit="img", dynamic_ncols=True):
                evaluate_sample(network, sample, save_dir, protocol, tally)


def class_metrics(confusion):
    """Per-class IoU and accuracy from a [label, prediction] confusion matrix, None where undefined."""
    true_positives = np.diag(confusion)
    labelled = confusion.sum(axis=1)
    union = labelled + confusion.sum(axis=0) - true_positives
    iou = [int(tp) / int(u) if u else None for tp, u in zip(true_positives, union)]
    accuracy = [int(tp) / int(n) if n else None for tp, n in zip(true_positives, labelled)]
    return iou, accuracy


def mean_of_defined(values):
    """Mean of the values that are not None; None when there are none."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def build_report(tally, class_names, partial, images_expected, settings, published):
    """The JSON report of a run."""
    iou, accuracy = class_metrics(tally.confusion)
    labelled = int(tally.confusion.sum())
    return {
        "miou": mean_of_defined(iou),
        "pixel_acc": int(np.trace(tally.confusion)) / labelled if labelled else None,
        "mean_acc": mean_of_defined(accuracy),
        "per_class": [
            {"id": class_id, "name": name, "iou": iou[class_id], "acc": accuracy[class_id]}
            for class_id, name in enumerate(class_names)
        ],
        "images": tally.images,
        "images_expected": images_expected,
        "partial": partial,
        "skipped": tally.skipped,
        "published": None if published is None else {"miou": published[0], "pixel_acc": published[1]},
        "settings": settings,
    }


def percent(value):
    """A fraction as a percentage with two decimals, '-' when undefined."""
    return "-" if value is None else f"{100 * value:.2f}"


def print_report(report):
    """Prints the per-class table and the summary of `report`, with the published numbers beside."""
    width = max(len(row["name"]) for row in report["per_class"])
    print(f"{'id':>4}  {'class':<{width}}  {'IoU %':>7}  {'acc %':>7}")
    for row in report["per_class"]:
        print(f"{row['id']:>4}  {row['name']:<{width}}  {percent(row['iou']):>7}  {percent(row['acc']):>7}")
    published = report["published"] or {}
    for title, key in (("mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc")):
        beside = f"   (published {percent(published[key])})" if key in published else ""
        print(f"{title:<10} {percent(report[key]):>7}{beside}")
    settings = report["settings"]
    if report["published"] is None and any(
        key[:2] == (settings["model"], settings["split"]) for key in PUBLISHED_RESULTS
    ):
        print("published numbers were measured with sliding windows (-s or -ms) and flip; not comparable")
    status = "partial" if report["partial"] else "complete"
    print(f"images     {report['images']} of {report['images_expected']} ({status}), skipped {len(report['skipped'])}")


def write_json_atomic(path, data):
    """Writes `data` as JSON to `path` so that readers see either no file or the complete one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def sha256_of(path):
    """Hex SHA-256 of the file at `path`."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def claim_save_dir(save_dir, samples, prediction_settings):
    """Makes `save_dir` a folder of predictions made with `prediction_settings`, recorded in
    predictions.json; refuses a folder whose predictions were made otherwise."""
    record = save_dir / PREDICTION_SETTINGS_NAME
    if record.exists():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SaveDirError(f"{record}: unreadable ({error}); choose another --save-dir") from None
        differing = [
            f"{key} {recorded.get(key)!r} there, {value!r} now"
            for key, value in prediction_settings.items()
            if recorded.get(key) != value
        ]
        if differing:
            raise SaveDirError(
                f"{save_dir} holds predictions made otherwise ({'; '.join(differing)}); choose another --save-dir"
            )
        return
    for sample in samples:
        if prediction_path(save_dir, sample).exists():
            raise SaveDirError(
                f"{save_dir} holds {prediction_path(save_dir, sample).name} but no {PREDICTION_SETTINGS_NAME} "
                "saying how it was predicted; choose another --save-dir"
            )
    write_json_atomic(record, prediction_settings)


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv):
    """The command line options."""
    parser = argparse.ArgumentParser(
        description="Measure a PSPNet model on ADE20K, Cityscapes or PASCAL VOC 2012 as the Caffe release does."
    )
    parser.add_argument("-m", "--model", required=True, choices=pspnet.MODEL_NAMES,
                        help="model; it decides the dataset (ade20k, voc2012 or cityscapes)")
    parser.add_argument("-w", "--weights", type=Path, help="Keras .h5 weights (default: pspnet.py's)")
    parser.add_argument("--data", required=True, type=Path, help="dataset root")
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument("-s", "--sliding", action="store_true",
                        help="the Caffe release's single-scale protocol (sliding crops); see pspnet.py -h")
    parser.add_argument("-ms", "--multi_scale", action="store_true", help="the -s protocol at scales 0.5 to 1.75")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="no mirrored second pass")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--save-dir", type=Path, help="keep predictions as <image stem>.png; reuse them on rerun")
    parser.add_argument("--report", type=Path,
                        help=f"JSON report (default: {REPORT_NAME} in --save-dir or the current directory)")
    return parser.parse_args(argv)


def fail(message):
    """Prints one error line on stderr and gives the exit code of a failed run."""
    print(f"evaluate: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv=None):
    """Runs the evaluation the command line asks for; returns the exit code."""
    args = parse_args(argv)
    try:
        samples = find_samples(args.model, args.data, args.split)[:args.limit]
    except DataRootError as error:
        return fail(str(error))
    report_path = args.report or (args.save_dir or Path()) / REPORT_NAME
    if args.save_dir:
        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return fail(f"{args.save_dir}: cannot create the save dir ({error.strerror})")
    if not report_path.parent.is_dir():
        return fail(f"{report_path}: folder {report_path.parent} does not exist")
    protocol = {"sliding": args.sliding, "flip": args.flip, "multi_scale": args.multi_scale}
    try:
        network = pspnet.PSPNet(args.model, weights=args.weights)
        weights_path = network.weights_path
        prediction_settings = {"model": args.model, "weights_sha256": sha256_of(weights_path), **protocol}
        if args.save_dir:
            claim_save_dir(args.save_dir, samples, prediction_settings)
    except (OSError, ValueError, SaveDirError) as error:
        return fail(str(error))
    except KeyboardInterrupt:
        print("evaluate: interrupted before any image was evaluated", file=sys.stderr)
        return EXIT_INTERRUPTED

    tally = Tally(network.classes)
    failure = None
    interrupted = False
    try:
        evaluate_samples(network, samples, args.save_dir, protocol, tally)
    except KeyboardInterrupt:
        interrupted = True
        print("evaluate: interrupted; reporting the images done so far", file=sys.stderr)
    except OSError as error:
        failure = f"stopped: {error}"

    settings = {
        **prediction_settings,
        "weights": str(weights_path),
        "split": args.split,
        "data_root": str(args.data),
        "limit": args.limit,
    }
    caffe_protocol = (args.sliding or args.multi_scale) and args.flip
    published = PUBLISHED_RESULTS.get((args.model, args.split, args.multi_scale)) if caffe_protocol else None
    report = build_report(
        tally, utils.class_names(network.dataset), interrupted or failure is not None, len(samples), settings, published
    )
    try:
        write_json_atomic(report_path, report)
    except OSError as error:
        return fail(f"{report_path}: cannot write the report ({error})")
    print_report(report)
    print(f"report written to {report_path}")
    if interrupted:
        return EXIT_INTERRUPTED
    if failure is not None:
        return fail(failure)
    if tally.images == 0:
        return fail("no image of the set could be evaluated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
