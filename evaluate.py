"""Measures a PSPNet model on ADE20K, Cityscapes, PASCAL VOC 2012 or a user's own data.

    python evaluate.py -m pspnet50_ade20k --data ~/data/ADEChallengeData2016 -s --save-dir runs/ade
    python evaluate.py -w runs/mine/final.h5 --data ~/data/mine

The model is a released one (-m, default pspnet50_ade20k) or a user's (-w X.h5
with its description X.json beside it, pspnet_keras/models.py). The data is one of the layouts
of pspnet_keras/datasets.py: --dataset, else the layout found at --data (the model's own
benchmark first), else the released model's benchmark, else the folders layout.
The dataset must have as many classes as the model. The metrics are the Caffe
release's (pspnet_keras/metrics.py); for the released models on their benchmark they are
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

import utils
from pspnet_keras import cli
from pspnet_keras import datasets
from pspnet_keras import metrics
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras import scoring
from pspnet_keras.download import default_weights_path
from pspnet_keras.segmenter import load_network

PROG = "evaluate.py"
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


def evaluate_on_ray(args, config, samples, protocol, tally):
    """Adds every sample to `tally` as evaluate_samples does, measured by workers on Ray (pspnet_keras/ray_pool.py)."""
    from pspnet_keras import ray_pool

    saved, to_predict = scoring.prediction_groups(samples, args.save_dir)
    try:
        ray_pool.evaluate_samples(PROG, args, config, samples, saved + to_predict, protocol, tally)
    except ray_pool.RunError as error:
        raise cli.CommandError(str(error)) from None


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
    problem = utils.file_problem(record)
    if problem:
        raise cli.CommandError(f"{record}: {problem}; {advice}")
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise cli.CommandError(f"{record}: unreadable ({getattr(error, 'strerror', None) or error}); {advice}") from None
    if not isinstance(recorded, dict):
        raise cli.CommandError(
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
            raise cli.CommandError(
                f"{save_dir} holds predictions made otherwise ({'; '.join(differing)}); choose another --save-dir"
            )
        return
    for sample in samples:
        if os.path.lexists(scoring.prediction_path(save_dir, sample)):
            raise cli.CommandError(
                f"{save_dir} holds {scoring.prediction_path(save_dir, sample).name} but no {PREDICTION_SETTINGS_NAME} "
                "saying how it was predicted; choose another --save-dir"
            )
    utils.write_json_atomic(save_dir / PREDICTION_SETTINGS_NAME, prediction_settings)


def resolve_model(args):
    """The ModelConfig of -m and -w, after checking that a -w file is readable."""
    if args.weights is not None:
        problem = utils.file_problem(args.weights)
        if problem:
            raise cli.CommandError(f"{args.weights}: {problem}")
    try:
        return models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None


def choose_dataset(requested, config, root):
    """The layout to read `root` as: `requested`, else the one found there (the model's benchmark first),
    else the model's benchmark, else the folders layout."""
    if requested:
        return requested
    found = datasets.datasets_laid_out_at(root)
    if config.dataset in found:
        return config.dataset
    if len(found) > 1:
        raise cli.CommandError(f"{root} holds the layouts of {' and '.join(found)}; choose one with --dataset")
    return found[0] if found else config.dataset or "folders"


def check_classes(config, dataset):
    """Refuses a model whose classes are not the dataset's, saying which model or data fits."""
    if dataset.classes == config.classes:
        return
    fitting = [name for name, released in models.RELEASED_MODELS.items() if released.dataset == dataset.name]
    if config.released and fitting:
        raise cli.CommandError(
            f"{dataset.root} holds {dataset.title} ({dataset.classes} classes), but {config.name} is a model of "
            f"{datasets.DATASET_TITLES[config.dataset]} ({config.classes} classes); use -m {', '.join(fitting)} "
            "for that data"
        )
    source = dataset.class_files[0] if dataset.class_files else f"{dataset.root} ({dataset.title})"
    advice = "pass a model of these classes with -w" if config.released else "evaluate it on data with its classes"
    raise cli.CommandError(
        f"{source} has {dataset.classes} classes but the model {config.name} has {config.classes}; {advice}"
    )


def open_data(args, config):
    """The dataset and the samples of the split to evaluate, and every sample of that split."""
    try:
        dataset = datasets.open_dataset(choose_dataset(args.dataset, config, args.data), args.data)
        check_classes(config, dataset)
        every_sample = dataset.samples(args.split)
    except datasets.DataRootError as error:
        raise cli.CommandError(str(error)) from None
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
            files[scoring.prediction_path(save_dir, sample)] = "a saved prediction"
    return files


def check_save_dir(save_dir, every_sample):
    """Refuses a --save-dir that cannot be created or written, or whose predictions would replace inputs."""
    if os.path.lexists(save_dir) and not save_dir.is_dir():
        raise cli.CommandError(f"{save_dir}: not a directory; choose another --save-dir")
    problem = cli.directory_problem(save_dir, "the save dir")
    if problem:
        raise cli.CommandError(f"{save_dir}: {problem}")
    inputs = {}
    for sample in every_sample:
        inputs[sample.image] = "the image"
        inputs[sample.label] = "the label"
    inputs = cli.file_index(inputs)
    for sample in every_sample:
        replaced = cli.replaced_file(scoring.prediction_path(save_dir, sample), inputs)
        if replaced:
            raise cli.CommandError(
                f"{save_dir}: the prediction of {sample.image.name} would replace {replaced[1]} {replaced[0]}; "
                "choose another --save-dir"
            )


def check_report_path(report_path, save_dir, protected):
    """Refuses a report path that is a special file or an input, or whose folder cannot be written."""
    problem = utils.file_problem(report_path, replace=True)
    if problem:
        raise cli.CommandError(f"{report_path}: {problem}; choose another --report")
    replaced = cli.replaced_file(report_path, cli.file_index(protected))
    if replaced:
        raise cli.CommandError(
            f"{report_path}: the report would replace {replaced[1]} {replaced[0]}; choose another --report"
        )
    folder = report_path.parent
    if save_dir is not None and os.path.realpath(folder) == os.path.realpath(save_dir):
        return
    if not folder.is_dir():
        raise cli.CommandError(f"{report_path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise cli.CommandError(f"{report_path}: cannot write in {folder} (permission denied)")


def published_results(config, dataset, args):
    """The published (mIoU, pixel accuracy) this run is comparable with, or None."""
    if not (config.released and dataset.name == config.dataset and (args.sliding or args.multi_scale) and args.flip):
        return None
    return PUBLISHED_RESULTS.get((config.name, args.split, args.multi_scale))


def run(args):
    """Evaluates the model on the data of the command line; returns the exit code."""
    config = resolve_model(args)
    dataset, samples, every_sample = open_data(args, config)
    weights_path = Path(args.weights) if args.weights is not None else default_weights_path(config.name)
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
            raise cli.CommandError(f"{args.save_dir}: cannot create the save dir ({error.strerror or error})") from None

    protocol = cli.protocol(args)
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
        raise cli.CommandError(str(error)) from None

    tally = scoring.Tally(config.classes, PROG)
    stopped = None
    failure = None
    try:
        if args.ray is None:
            scoring.evaluate_samples(network, samples, args.save_dir, protocol, tally)
        else:
            evaluate_on_ray(args, config, samples, protocol, tally)
    except KeyboardInterrupt as error:
        stopped = error
        reason = "terminated" if isinstance(error, cli.Terminated) else "interrupted"
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
        raise cli.CommandError(f"cannot write the report: {error}") from None
    published_elsewhere = (
        config.released and dataset.name == config.dataset
        and any(key[:2] == (config.name, args.split) for key in PUBLISHED_RESULTS)
    )
    print_report(report, published_elsewhere)
    print(f"report written to {report_path}")
    if stopped is not None:
        return cli.interruption_exit_code(stopped)
    if failure is not None:
        raise cli.CommandError(failure)
    if tally.images == 0:
        raise cli.CommandError("no image of the set could be evaluated")
    if report["labelled_pixels"] == 0:
        raise cli.CommandError(
            f"nothing to count: no pixel of the {tally.images} evaluated labels holds a class of the dataset "
            f"(every value is unlabelled or undefined); check the labels under {args.data}"
        )
    return cli.EXIT_OK


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = cli.ArgumentParser(
        prog=PROG,
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
    cli.add_model_arguments(parser)
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
    parser.add_argument("--limit", type=cli.positive_int, help="evaluate only the first N images")
    parser.add_argument("--save-dir", type=Path, help="keep predictions as <image stem>.png; reuse them on rerun")
    parser.add_argument(
        "--report", type=Path,
        help=f"JSON report (default: {REPORT_NAME} in --save-dir or the current directory); its folder must exist",
    )
    cli.add_ray_arguments(parser)
    return parser


def main(argv=None):
    """Runs the evaluation the command line asks for; returns the exit code."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    cli.check_ray_arguments(parser, args)
    runtime.configure()
    return cli.run_command(PROG, run, args, error_prefix="", interrupted_suffix=" before any image was evaluated")


if __name__ == "__main__":
    sys.exit(main())
