"""Measures a PSPNet model on ADE20K, Cityscapes, PASCAL VOC 2012 or a user's own data.

    python evaluate.py -m pspnet50_ade20k --data ~/data/ADEChallengeData2016 -s --save-dir runs/ade
    python evaluate.py -w runs/mine/final.h5 --data ~/data/mine

The model is a released one (-m, default pspnet50_ade20k) or a user's (-w X.h5
with its description X.json beside it, models.py). The data is one of the layouts
of datasets.py: --dataset, else the layout found at --data (the model's own
benchmark first), else the released model's benchmark, else the folders layout.
The dataset must have as many classes as the model. The metrics are the Caffe
release's (metrics.py); for the released models on their benchmark they are
printed beside the published numbers. The report is JSON.

With --save-dir every prediction is kept as `<image stem>.png` (0-based class
ids) and predictions.json records how they were made; a rerun scores those files
instead of predicting again, so an interrupted run resumes where it stopped.
Ctrl-C or SIGTERM writes the metrics of the images done so far, marked partial,
and exits with 130 or 143. Every file is written atomically.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

import datasets
import metrics
import models
import pspnet
import utils

PROG = "evaluate"
REPORT_NAME = "metrics.json"
PREDICTION_SETTINGS_NAME = "predictions.json"

# Caffe release README, measured with the sliding-window protocol (-s, or -ms which
# slides at every scale) and flip: (model, split, multi-scale) -> (mIoU, pixel accuracy).
PUBLISHED_RESULTS = {
    ("pspnet50_ade20k", "val", False): (0.4168, 0.8004),
    ("pspnet50_ade20k", "val", True): (0.4278, 0.8076),
    ("pspnet101_cityscapes", "val", False): (0.7970, 0.9638),
    ("pspnet101_cityscapes", "val", True): (0.8091, 0.9659),
}
JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


class Tally:
    """What a run has measured so far: the confusion matrix, the evaluated images, the skipped files
    and the label files holding values their layout does not define.

    The lists keep the order in which a single process takes the samples: each entry is filed
    under its sample's place in that order, which is the order of the calls unless given.
    """

    def __init__(self, classes):
        self.confusion = np.zeros((classes, classes), np.int64)
        self.images = 0
        self.places = {"skipped": [], "undefined_labels": []}

    @property
    def skipped(self):
        """The files that could not be evaluated: [{"file", "problem"}], in sample order."""
        return self.in_order("skipped")

    @property
    def undefined_labels(self):
        """The label files holding undefined values: [{"file", "values"}], in sample order."""
        return self.in_order("undefined_labels")

    def in_order(self, kind):
        """The entries of one list, by the place of their sample."""
        return [entry for _, entry in sorted(self.places[kind], key=lambda filed: filed[0])]

    def next_place(self):
        """The place of a sample counted now, when the caller does not give one."""
        return self.images + len(self.places["skipped"])

    def add(self, sample, confusion, undefined, place=None):
        """Counts one evaluated image by its confusion matrix, and reports on stderr label values its
        layout does not define."""
        place = self.next_place() if place is None else place
        self.confusion += confusion
        self.images += 1
        if undefined:
            tqdm.write(f"{PROG}: warning: {datasets.undefined_values_problem(sample, undefined)}", file=sys.stderr)
            self.places["undefined_labels"].append((place, {"file": str(sample.label), "values": list(undefined)}))

    def skip(self, error, place=None):
        """Records, and reports on stderr, a file that could not be evaluated."""
        place = self.next_place() if place is None else place
        tqdm.write(f"{PROG}: skipped {error.path}: {error.problem}", file=sys.stderr)
        self.places["skipped"].append((place, {"file": str(error.path), "problem": error.problem}))


def prediction_path(save_dir, sample):
    """Where the prediction of `sample` is kept: <save dir>/<image stem>.png."""
    return save_dir / f"{sample.image.stem}.png"


def read_saved_prediction(path, shape, classes):
    """The class ids an earlier run saved at `path`, or None where there is no usable file.

    Raises SampleError for a FIFO, directory or link loop in its place, which is never opened.
    """
    if not os.path.lexists(path):
        return None
    problem = utils.input_file_problem(path)
    if problem:
        raise datasets.SampleError(path, f"{problem}; remove it or choose another --save-dir")
    try:
        with Image.open(path) as saved:
            class_ids = np.asarray(saved) if saved.mode == "L" else None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        return None
    if class_ids is None or class_ids.shape != shape or class_ids.max() >= classes:
        return None
    return class_ids


def predict_class_ids(network, sample, shape, protocol):
    """The class id the network predicts at every pixel of `sample`'s image, whose size must be `shape`;
    SampleError for an image that cannot be read, has another size or does not fit in memory."""
    from inference import OutOfMemory  # imports TensorFlow: only once a network is there

    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        raise datasets.SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
    if image.shape[:2] != shape:
        raise datasets.SampleError(
            sample.image,
            f"image is {image.shape[1]}x{image.shape[0]} but its label {sample.label.name} is {shape[1]}x{shape[0]}",
        )
    try:
        class_ids, _ = network.class_map(image, **protocol)
    except OutOfMemory as error:
        raise datasets.SampleError(sample.image, str(error)) from None
    return class_ids


def measure_sample(network, sample, save_dir, protocol):
    """The confusion matrix of `sample` and its undefined label values, reusing its saved prediction
    when there is one and saving a new one otherwise; SampleError when it cannot be evaluated."""
    label_ids, undefined = datasets.read_label(sample)
    saved = prediction_path(save_dir, sample) if save_dir else None
    predicted_ids = read_saved_prediction(saved, label_ids.shape, network.classes) if saved else None
    if predicted_ids is None:
        predicted_ids = predict_class_ids(network, sample, label_ids.shape, protocol)
        if saved:
            utils.write_image_atomic(saved, predicted_ids)
    return metrics.confusion_matrix(label_ids, predicted_ids, network.classes), undefined


def evaluate_sample(network, sample, save_dir, protocol, tally):
    """Adds `sample` to `tally`, or records why it was skipped."""
    try:
        confusion, undefined = measure_sample(network, sample, save_dir, protocol)
    except datasets.SampleError as error:
        tally.skip(error)
        return
    tally.add(sample, confusion, undefined)


def prediction_groups(samples, save_dir):
    """The numbers of the samples with a saved prediction and of the others, the order a run takes them in."""
    saved, to_predict = [], []
    for index, sample in enumerate(samples):
        has_saved = save_dir is not None and prediction_path(save_dir, sample).is_file()
        (saved if has_saved else to_predict).append(index)
    return saved, to_predict


def evaluate_samples(network, samples, save_dir, protocol, tally):
    """Adds every sample to `tally`: first those with a saved prediction, then the others,
    each group with its own progress bar so that the ETA reflects the predictions left."""
    saved, to_predict = prediction_groups(samples, save_dir)
    for description, group in (("saved predictions", saved), ("predicting", to_predict)):
        if group:
            for index in tqdm(group, desc=description, unit="img", dynamic_ncols=True):
                evaluate_sample(network, samples[index], save_dir, protocol, tally)


def evaluate_on_ray(args, config, samples, protocol, tally):
    """Adds every sample to `tally` as evaluate_samples does, measured by workers on Ray (ray_runner)."""
    import ray_runner

    saved, to_predict = prediction_groups(samples, args.save_dir)
    try:
        ray_runner.evaluate_samples(args, config, samples, saved + to_predict, protocol, tally)
    except ray_runner.RunError as error:
        raise utils.CommandError(str(error)) from None


def weights_for_workers(config, weights, weights_path):
    """The weights file Ray workers load, downloaded here first where a released model's is missing."""
    if not weights_path.exists():
        load_network(config, weights)
    return weights_path


def build_report(tally, class_names, partial, images_expected, settings, published):
    """The JSON report of a run."""
    summary = metrics.summary(tally.confusion)
    return {
        "miou": summary["miou"],
        "pixel_acc": summary["pixel_acc"],
        "mean_acc": summary["mean_acc"],
        "per_class": [
            {"id": class_id, "name": name, "iou": summary["iou"][class_id], "acc": summary["acc"][class_id]}
            for class_id, name in enumerate(class_names)
        ],
        "images": tally.images,
        "images_expected": images_expected,
        "labelled_pixels": int(tally.confusion.sum()),
        "partial": partial,
        "skipped": tally.skipped,
        "undefined_label_values": tally.undefined_labels,
        "published": None if published is None else {"miou": published[0], "pixel_acc": published[1]},
        "settings": settings,
    }


def percent(value):
    """A fraction as a percentage with two decimals, '-' when undefined."""
    return "-" if value is None else f"{100 * value:.2f}"


def print_report(report, published_elsewhere):
    """Prints the per-class table and the summary of `report`, with the published numbers beside;
    `published_elsewhere` says that numbers exist for this model and split but for another protocol."""
    width = max(len(row["name"]) for row in report["per_class"])
    print(f"{'id':>4}  {'class':<{width}}  {'IoU %':>7}  {'acc %':>7}")
    for row in report["per_class"]:
        print(f"{row['id']:>4}  {row['name']:<{width}}  {percent(row['iou']):>7}  {percent(row['acc']):>7}")
    published = report["published"] or {}
    for title, key in (("mIoU", "miou"), ("pixel acc", "pixel_acc"), ("mean acc", "mean_acc")):
        beside = f"   (published {percent(published[key])})" if key in published else ""
        print(f"{title:<10} {percent(report[key]):>7}{beside}")
    if report["published"] is None and published_elsewhere:
        print("published numbers were measured with sliding windows (-s or -ms) and flip; not comparable")
    status = "partial" if report["partial"] else "complete"
    print(f"images     {report['images']} of {report['images_expected']} ({status}), skipped {len(report['skipped'])}")


def sha256_of(path):
    """Hex SHA-256 of the file at `path`."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def json_kind(value):
    """What a JSON value is, in words."""
    return "null" if value is None else JSON_KINDS.get(type(value), "an object")


def read_prediction_record(save_dir):
    """The prediction settings recorded in <save dir>/predictions.json; None when there is no such file."""
    record = save_dir / PREDICTION_SETTINGS_NAME
    if not os.path.lexists(record):
        return None
    advice = "delete it or choose another --save-dir"
    problem = utils.input_file_problem(record)
    if problem:
        raise utils.CommandError(f"{record}: {problem}; {advice}")
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise utils.CommandError(f"{record}: unreadable ({getattr(error, 'strerror', None) or error}); {advice}") from None
    if not isinstance(recorded, dict):
        raise utils.CommandError(
            f"{record}: holds {json_kind(recorded)}, not the JSON object of prediction settings this "
            f"program writes there; {advice}"
        )
    return recorded


def claim_save_dir(save_dir, samples, prediction_settings, recorded):
    """Makes `save_dir` a folder of predictions made with `prediction_settings`, recorded in
    predictions.json; refuses a folder whose predictions were made otherwise."""
    if recorded is not None:
        differing = [
            f"{key} {recorded.get(key)!r} there, {value!r} now"
            for key, value in prediction_settings.items()
            if recorded.get(key) != value
        ]
        if differing:
            raise utils.CommandError(
                f"{save_dir} holds predictions made otherwise ({'; '.join(differing)}); choose another --save-dir"
            )
        return
    for sample in samples:
        if os.path.lexists(prediction_path(save_dir, sample)):
            raise utils.CommandError(
                f"{save_dir} holds {prediction_path(save_dir, sample).name} but no {PREDICTION_SETTINGS_NAME} "
                "saying how it was predicted; choose another --save-dir"
            )
    utils.write_json_atomic(save_dir / PREDICTION_SETTINGS_NAME, prediction_settings)


def resolve_model(args):
    """The ModelConfig of -m and -w, after checking that a -w file is readable."""
    if args.weights is not None:
        problem = utils.input_file_problem(args.weights)
        if problem:
            raise utils.CommandError(f"{args.weights}: {problem}")
    try:
        return models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise utils.CommandError(str(error)) from None


def choose_dataset(requested, config, root):
    """The layout to read `root` as: `requested`, else the one found there (the model's benchmark first),
    else the model's benchmark, else the folders layout."""
    if requested:
        return requested
    found = datasets.datasets_laid_out_at(root)
    if config.dataset in found:
        return config.dataset
    if len(found) > 1:
        raise utils.CommandError(f"{root} holds the layouts of {' and '.join(found)}; choose one with --dataset")
    return found[0] if found else config.dataset or "folders"


def check_classes(config, dataset):
    """Refuses a model whose classes are not the dataset's, saying which model or data fits."""
    if dataset.classes == config.classes:
        return
    fitting = [name for name, released in models.RELEASED_MODELS.items() if released.dataset == dataset.name]
    if config.released and fitting:
        raise utils.CommandError(
            f"{dataset.root} holds {dataset.title} ({dataset.classes} classes), but {config.name} is a model of "
            f"{datasets.DATASET_TITLES[config.dataset]} ({config.classes} classes); use -m {', '.join(fitting)} "
            "for that data"
        )
    source = dataset.class_files[0] if dataset.class_files else f"{dataset.root} ({dataset.title})"
    advice = "pass a model of these classes with -w" if config.released else "evaluate it on data with its classes"
    raise utils.CommandError(
        f"{source} has {dataset.classes} classes but the model {config.name} has {config.classes}; {advice}"
    )


def open_data(args, config):
    """The dataset and the samples of the split to evaluate, and every sample of that split."""
    try:
        dataset = datasets.open_dataset(choose_dataset(args.dataset, config, args.data), args.data)
        check_classes(config, dataset)
        every_sample = dataset.samples(args.split)
    except datasets.DataRootError as error:
        raise utils.CommandError(str(error)) from None
    return dataset, every_sample[:args.limit], every_sample


def protected_files(every_sample, dataset, weights_path, save_dir):
    """{path: what it is} of the files a run reads or keeps, which no output may replace."""
    files = {weights_path: "the weights file", models.description_path(weights_path): "the model description"}
    for path in dataset.class_files:
        files[path] = "a class file of the dataset"
    for sample in every_sample:
        files[sample.image] = "an image of the set"
        files[sample.label] = "a label of the set"
    if save_dir is not None:
        files[save_dir / PREDICTION_SETTINGS_NAME] = "the prediction record of --save-dir"
        for sample in every_sample:
            files[prediction_path(save_dir, sample)] = "a saved prediction"
    return files


def identity(path):
    """(device, inode) of an existing file, None otherwise: two paths of one identity are one file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def file_index(files):
    """`files` ({path: what it is}) indexed by resolved path and by file identity, for replaced_file."""
    by_path, by_identity = {}, {}
    for path, what in files.items():
        by_path.setdefault(os.path.realpath(path), (path, what))
        key = identity(path)
        if key is not None:
            by_identity.setdefault(key, (path, what))
    return by_path, by_identity


def replaced_file(target, index):
    """The (path, what it is) of a file_index that writing `target` would replace, or None.

    Compares resolved paths (symbolic links) and, for an existing target, file identities (hard links).
    """
    by_path, by_identity = index
    found = by_path.get(os.path.realpath(target))
    key = identity(target)
    if found is None and key is not None:
        found = by_identity.get(key)
    return found


def existing_ancestor(path):
    """The nearest of `path` and its parents that exists."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_save_dir(save_dir, every_sample):
    """Refuses a --save-dir that cannot be created or written, or whose predictions would replace inputs."""
    if os.path.lexists(save_dir) and not save_dir.is_dir():
        raise utils.CommandError(f"{save_dir}: not a directory; choose another --save-dir")
    existing = existing_ancestor(save_dir)
    if not existing.is_dir():
        raise utils.CommandError(f"{save_dir}: cannot create the save dir ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise utils.CommandError(f"{save_dir}: cannot write in {existing} (permission denied)")
    inputs = {}
    for sample in every_sample:
        inputs[sample.image] = "the image"
        inputs[sample.label] = "the label"
    inputs = file_index(inputs)
    for sample in every_sample:
        replaced = replaced_file(prediction_path(save_dir, sample), inputs)
        if replaced:
            raise utils.CommandError(
                f"{save_dir}: the prediction of {sample.image.name} would replace {replaced[1]} {replaced[0]}; "
                "choose another --save-dir"
            )


def check_report_path(report_path, save_dir, protected):
    """Refuses a report path that is a special file or an input, or whose folder cannot be written."""
    problem = utils.output_target_problem(report_path)
    if problem:
        raise utils.CommandError(f"{report_path}: {problem}; choose another --report")
    replaced = replaced_file(report_path, file_index(protected))
    if replaced:
        raise utils.CommandError(
            f"{report_path}: the report would replace {replaced[1]} {replaced[0]}; choose another --report"
        )
    folder = report_path.parent
    if save_dir is not None and os.path.realpath(folder) == os.path.realpath(save_dir):
        return
    if not folder.is_dir():
        raise utils.CommandError(f"{report_path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise utils.CommandError(f"{report_path}: cannot write in {folder} (permission denied)")


def load_network(config, weights):
    """The network of `config` with its weights; utils.CommandError with one line when they cannot be loaded."""
    try:
        return pspnet.PSPNet(config, weights=weights)
    except (OSError, ValueError) as error:
        raise utils.CommandError(str(error)) from None


def published_results(config, dataset, args):
    """The published (mIoU, pixel accuracy) this run is comparable with, or None."""
    if not (config.released and dataset.name == config.dataset and (args.sliding or args.multi_scale) and args.flip):
        return None
    return PUBLISHED_RESULTS.get((config.name, args.split, args.multi_scale))


def run(args):
    """Evaluates the model on the data of the command line; returns the exit code."""
    config = resolve_model(args)
    dataset, samples, every_sample = open_data(args, config)
    weights_path = Path(args.weights) if args.weights is not None else pspnet.default_weights_path(config.name)
    recorded = None
    if args.save_dir is not None:
        check_save_dir(args.save_dir, every_sample)
        recorded = read_prediction_record(args.save_dir) if args.save_dir.is_dir() else None
    report_path = args.report or (args.save_dir or Path()) / REPORT_NAME
    check_report_path(report_path, args.save_dir, protected_files(every_sample, dataset, weights_path, args.save_dir))
    if args.save_dir is not None:
        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise utils.CommandError(f"{args.save_dir}: cannot create the save dir ({error.strerror or error})") from None

    protocol = {"sliding": args.sliding, "flip": args.flip, "multi_scale": args.multi_scale}
    if args.ray is None:
        network = load_network(config, args.weights)
        weights_path = network.weights_path
    else:
        weights_path = weights_for_workers(config, args.weights, weights_path)
    try:
        prediction_settings = {"model": config.name, "weights_sha256": sha256_of(weights_path), **protocol}
        if args.save_dir is not None:
            claim_save_dir(args.save_dir, samples, prediction_settings, recorded)
    except (OSError, utils.OutputError) as error:
        raise utils.CommandError(str(error)) from None

    tally = Tally(config.classes)
    stopped = None
    failure = None
    try:
        if args.ray is None:
            evaluate_samples(network, samples, args.save_dir, protocol, tally)
        else:
            evaluate_on_ray(args, config, samples, protocol, tally)
    except KeyboardInterrupt as error:
        stopped = error
        reason = "terminated" if isinstance(error, utils.Terminated) else "interrupted"
        print(f"{PROG}: {reason}; reporting the images done so far", file=sys.stderr)
    except (OSError, utils.OutputError) as error:
        failure = f"stopped: {error}"

    settings = {
        **prediction_settings,
        "weights": str(weights_path),
        "dataset": dataset.name,
        "split": args.split,
        "data_root": str(args.data),
        "limit": args.limit,
    }
    published = published_results(config, dataset, args)
    report = build_report(
        tally, dataset.class_names, stopped is not None or failure is not None, len(samples), settings, published
    )
    try:
        utils.write_json_atomic(report_path, report)
    except utils.OutputError as error:
        raise utils.CommandError(f"cannot write the report: {error}") from None
    published_elsewhere = (
        config.released and dataset.name == config.dataset
        and any(key[:2] == (config.name, args.split) for key in PUBLISHED_RESULTS)
    )
    print_report(report, published_elsewhere)
    print(f"report written to {report_path}")
    if stopped is not None:
        return utils.interruption_exit_code(stopped)
    if failure is not None:
        raise utils.CommandError(failure)
    if tally.images == 0:
        raise utils.CommandError("no image of the set could be evaluated")
    if report["labelled_pixels"] == 0:
        raise utils.CommandError(
            f"nothing to count: no pixel of the {tally.images} evaluated labels holds a class of the dataset "
            f"(every value is unlabelled or undefined); check the labels under {args.data}"
        )
    return utils.EXIT_OK


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=(
            "Measure a PSPNet model on ADE20K, Cityscapes, PASCAL VOC 2012 or your own data as the Caffe "
            "release does: confusion matrix over the set, per-class IoU and accuracy, mIoU, pixel accuracy "
            "and mean class accuracy, written as a JSON report."
        ),
        epilog=(
            "Your own data (--dataset folders): ROOT/images/<split>/<name>.<ext> (any format Pillow reads), "
            "ROOT/labels/<split>/<name>.png (8-bit class ids, 255 = unlabelled), ROOT/classes.txt (one class "
            "name per line), optionally ROOT/palette.txt (one 'R G B' line per class). Long options are also "
            "accepted with '-' for '_' and '_' for '-'. Exit status: 0 when the set was evaluated, 1 on an "
            "error (nothing evaluated, nothing labelled, a wrong model, data or output path), 2 for a wrong "
            "command line, 130 when interrupted and 143 when terminated (both after writing the partial report)."
        ),
    )
    pspnet.add_model_arguments(parser)
    parser.add_argument("--data", required=True, type=Path, help="dataset root")
    parser.add_argument(
        "--dataset", choices=datasets.DATASET_NAMES,
        help="layout of --data (default: the one found there, the model's benchmark first)",
    )
    parser.add_argument("--split", default="val", help="split to evaluate (default: %(default)s)")
    parser.add_argument("-s", "--sliding", action="store_true",
                        help="the Caffe release's single-scale protocol (sliding crops); see pspnet.py -h")
    parser.add_argument("-ms", "--multi_scale", action="store_true", help="the -s protocol at scales 0.5 to 1.75")
    parser.add_argument(
        "-f", "--flip", action=argparse.BooleanOptionalAction, default=True,
        help="add the mirrored pass (on by default; --no-flip turns it off)",
    )
    parser.add_argument("--limit", type=utils.positive_int, help="evaluate only the first N images")
    parser.add_argument("--save-dir", type=Path, help="keep predictions as <image stem>.png; reuse them on rerun")
    parser.add_argument(
        "--report", type=Path,
        help=f"JSON report (default: {REPORT_NAME} in --save-dir or the current directory); its folder must exist",
    )
    pspnet.add_ray_arguments(parser)
    return parser


def main(argv=None):
    """Runs the evaluation the command line asks for; returns the exit code."""
    parser = argument_parser()
    args = parser.parse_args(utils.canonical_flag_spellings(parser, sys.argv[1:] if argv is None else argv))
    pspnet.check_ray_arguments(parser, args)
    return utils.run_command(PROG, run, args, error_prefix="", interrupted_suffix=" before any image was evaluated")


if __name__ == "__main__":
    sys.exit(main())
