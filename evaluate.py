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
ids, stamped with the SHA-256 of its image and of the prediction settings) and
predictions.json records how they were made; a rerun scores the files stamped for
this image and these settings instead of predicting again, so an interrupted run
resumes where it stopped. Ctrl-C or SIGTERM writes the metrics of the images done
so far, marked partial, and exits with 130 or 143. An image that cannot be
evaluated is skipped and named; the run goes on and exits with 1 after the report.

No output replaces a file the run reads (the model's files, any file under --data,
the save dir's record and predictions); an existing report is replaced only with
--overwrite, except the report a save dir keeps for itself, replaced on a rerun.
Every file is written atomically.
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import argparse
import json
import os
import sys
from pathlib import Path

import utils
from pspnet_keras import cli
from pspnet_keras import compile_cache
from pspnet_keras import datasets
from pspnet_keras import download
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
# The fields of predictions.json (scoring.prediction_settings) and the JSON type of each.
RECORD_FIELDS = {
    "model": str, "model_sha256": str, "weights_sha256": str, "sliding": bool, "flip": bool, "multi_scale": bool,
}
# predictions.json holds six short fields; a larger file is not one this program wrote.
MAX_RECORD_BYTES = 64 * 1024
# The longest string of a record: a model's name is a file stem.
MAX_RECORD_STRING = 255
# The report of a run of a million skipped images stays below this; a larger file is not a report.
MAX_REPORT_BYTES = 256 << 20
REPORT_FIELDS = frozenset({
    "miou", "pixel_acc", "mean_acc", "per_class", "images", "images_expected", "labelled_pixels", "partial",
    "skipped", "undefined_label_values", "published", "settings",
})


def evaluate_on_ray(args, config, samples, protocol, tally):
    """Adds every sample to `tally` as evaluate_samples does, measured by workers on Ray (pspnet_keras/ray_pool.py)."""
    from pspnet_keras import ray_pool

    saved, to_predict = scoring.prediction_groups(samples, args.save_dir)
    try:
        ray_pool.evaluate_samples(PROG, args, config, samples, saved + to_predict, protocol, tally)
    except ray_pool.RunError as error:
        raise cli.CommandError(str(error)) from None


def weights_for_workers(config, weights):
    """The weights file Ray workers load, downloaded here first where a released model's is missing."""
    try:
        return download.weights_to_load(config, weights)
    except download.WeightsNotFound as error:
        raise cli.CommandError(str(error)) from None


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


def json_kind(value):
    """What a JSON value is, in words."""
    return "null" if value is None else JSON_KINDS.get(type(value), "an object")


def read_small_json(path, max_bytes, what):
    """The JSON value of the regular file at `path`, read only when it holds at most `max_bytes`
    (utils.read_small_file; `what` it should be); utils.FileError where it cannot be read,
    ValueError or RecursionError where it is not JSON."""
    return json.loads(utils.read_small_file(path, max_bytes, what).decode("utf-8"))


def read_prediction_record(save_dir):
    """The prediction settings recorded in <save dir>/predictions.json, checked field by field;
    None when there is no such file."""
    record = save_dir / PREDICTION_SETTINGS_NAME
    if not os.path.lexists(record):
        return None
    advice = "delete it or choose another --save-dir"
    try:
        recorded = read_small_json(record, MAX_RECORD_BYTES, "a prediction record")
    except utils.FileError as error:
        raise cli.CommandError(f"{error}; {advice}") from None
    except (ValueError, RecursionError) as error:
        raise cli.CommandError(f"{record}: unreadable ({error}); {advice}") from None
    if not isinstance(recorded, dict):
        raise cli.CommandError(
            f"{record}: holds {json_kind(recorded)}, not the JSON object of prediction settings this "
            f"program writes there; {advice}"
        )
    problem = record_problem(recorded)
    if problem:
        raise cli.CommandError(f"{record}: {problem}; {advice}")
    return recorded


def record_problem(recorded):
    """Why a predictions.json object is not one this program writes, or None: a field it does not
    write, or a field of another JSON type, or a string longer than any it writes."""
    for field, value in recorded.items():
        kind = RECORD_FIELDS.get(field)
        if kind is None:
            return f"field {field[:40]!r} is none of the prediction settings ({', '.join(RECORD_FIELDS)})"
        if type(value) is not kind:
            return f"field '{field}' holds {json_kind(value)}, not {JSON_KINDS[kind]}"
        if kind is str and len(value) > MAX_RECORD_STRING:
            return f"field '{field}' is longer than {MAX_RECORD_STRING} characters"
    return None


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
    """The dataset and the samples of the split to evaluate, and every sample of that split; a line on
    stderr names the images a list names more than once."""

    def warn(line):
        print(f"{PROG}: warning: {line}", file=sys.stderr)

    try:
        dataset = datasets.open_dataset(choose_dataset(args.dataset, config, args.data), args.data)
        check_classes(config, dataset)
        every_sample = dataset.samples(args.split, warn)
    except datasets.DataRootError as error:
        raise cli.CommandError(str(error)) from None
    return dataset, every_sample[:args.limit], every_sample


def read_files(dataset, every_sample, weights_path):
    """The cli.Inputs of a run: the weights and the description beside them, the class files, the
    images and labels of the split, and every file under the data root."""
    inputs = cli.Inputs({
        weights_path: "the weights file", models.description_path(weights_path): "the model description",
    })
    for path in dataset.class_files:
        inputs.add(path, "a class file of the dataset")
    for sample in every_sample:
        inputs.add(sample.image, "an image of the set")
        inputs.add(sample.label, "a label of the set")
    inputs.add_folder(dataset.root, "a file of the dataset")
    return inputs


def add_save_dir_files(inputs, save_dir, every_sample):
    """Adds to `inputs` the files of --save-dir a run reads: its record and the predictions of the split."""
    inputs.add(save_dir / PREDICTION_SETTINGS_NAME, "the prediction record of --save-dir")
    for sample in every_sample:
        inputs.add(scoring.prediction_path(save_dir, sample), "a saved prediction of --save-dir")


def save_dir_kind_problem(save_dir):
    """Why an existing --save-dir path is no folder, or None."""
    if os.path.isdir(save_dir):
        return None
    problem = utils.file_problem(save_dir)
    return problem.replace("not a regular file", "not a directory") if problem else "not a directory"


def check_save_dir(save_dir, every_sample, inputs, data_root):
    """Refuses a --save-dir that cannot be created or written, that lies in the data root, where two
    images would share a prediction, or whose predictions would replace inputs."""
    problem = save_dir_kind_problem(save_dir) if os.path.lexists(save_dir) else None
    if problem:
        raise cli.CommandError(f"{save_dir}: {problem}; choose another --save-dir")
    problem = cli.directory_problem(save_dir, "the save dir")
    if problem:
        raise cli.CommandError(f"{save_dir}: {problem}")
    if cli.is_within(save_dir, data_root):
        raise cli.CommandError(
            f"{save_dir}: lies in --data {data_root}, whose files this command never replaces; "
            "choose a --save-dir outside it"
        )
    owners = {}
    for sample in every_sample:
        prediction = scoring.prediction_path(save_dir, sample)
        if prediction in owners:
            raise cli.CommandError(
                f"{save_dir}: {owners[prediction]} and {sample.image} would share the prediction {prediction.name}; "
                "evaluate them without --save-dir, or rename one"
            )
        owners[prediction] = sample.image
        replaced = inputs.find(prediction)
        if replaced:
            raise cli.CommandError(
                f"{save_dir}: the prediction of {sample.image.name} would replace {replaced[1]} {replaced[0]}; "
                "choose another --save-dir"
            )


def is_own_report(path):
    """Whether `path` holds a report of this program: a regular file of at most MAX_REPORT_BYTES
    holding a JSON object of the report's fields."""
    try:
        report = read_small_json(path, MAX_REPORT_BYTES, "a report")
    except (ValueError, RecursionError):
        return False
    return isinstance(report, dict) and set(report) == REPORT_FIELDS and isinstance(report["settings"], dict)


def replaces_own_report(report_path, save_dir, recorded):
    """Whether the run may replace `report_path` without --overwrite: the report of a save dir of
    this program (one with a record) in that save dir, on a rerun."""
    return (
        recorded is not None
        and report_path.name == REPORT_NAME
        and os.path.realpath(report_path.parent) == os.path.realpath(save_dir)
        and is_own_report(report_path)
    )


def check_report_path(report_path, save_dir, inputs, overwrite):
    """Refuses a report path that is an input or a special file, an existing file without `overwrite`,
    or one whose folder cannot be written."""
    problem = cli.output_problem(report_path, inputs, overwrite)
    if problem:
        advice = "" if cli.OVERWRITE_FLAG in problem else "; choose another --report"
        raise cli.CommandError(f"{report_path}: {problem}{advice}")
    folder = report_path.parent
    if save_dir is not None and os.path.realpath(folder) == os.path.realpath(save_dir):
        return
    problem = datasets.folder_problem(folder)
    if problem:
        raise cli.CommandError(f"{report_path}: folder {folder}: {problem}")
    problem = cli.directory_problem(folder)
    if problem:
        raise cli.CommandError(f"{report_path}: {problem}")


def error_line(error):
    """An OSError or OutputError as one line naming the file."""
    if isinstance(error, utils.OutputError) or not getattr(error, "strerror", None):
        return str(error)
    return f"{error.filename}: {error.strerror}" if error.filename else error.strerror


def published_results(config, dataset, args):
    """The published (mIoU, pixel accuracy) this run is comparable with, or None."""
    if not (config.released and dataset.name == config.dataset and (args.sliding or args.multi_scale) and args.flip):
        return None
    return PUBLISHED_RESULTS.get((config.name, args.split, args.multi_scale))


def prepare_outputs(args, dataset, every_sample, weights_path):
    """Checks --save-dir and the report path before any work, creates the save dir, and returns
    (report path, the save dir's record or None)."""
    inputs = read_files(dataset, every_sample, weights_path)
    recorded = None
    if args.save_dir is not None:
        check_save_dir(args.save_dir, every_sample, inputs, args.data)
        recorded = read_prediction_record(args.save_dir) if args.save_dir.is_dir() else None
        add_save_dir_files(inputs, args.save_dir, every_sample)
    report_path = args.report or (args.save_dir or Path()) / REPORT_NAME
    overwrite = args.overwrite or replaces_own_report(report_path, args.save_dir, recorded)
    check_report_path(report_path, args.save_dir, inputs, overwrite)
    if args.save_dir is not None:
        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise cli.CommandError(f"{args.save_dir}: cannot create the save dir ({error.strerror or error})") from None
    return report_path, recorded


def write_report(report_path, report, failure):
    """Writes the report; a CommandError, naming also the run's `failure` where there is one, when it
    cannot be written."""
    try:
        utils.write_json_atomic(report_path, report)
    except utils.OutputError as error:
        if failure is not None:
            raise cli.CommandError(f"{failure}; the report was not written either ({error})") from None
        raise cli.CommandError(f"cannot write the report: {error}") from None


def run(args):
    """Evaluates the model on the data of the command line; returns the exit code."""
    config = resolve_model(args)
    dataset, samples, every_sample = open_data(args, config)
    weights_path = Path(args.weights) if args.weights is not None else default_weights_path(config.name)
    report_path, recorded = prepare_outputs(args, dataset, every_sample, weights_path)

    protocol = cli.protocol(args)
    if args.ray is None:
        network = load_network(config, args.weights)
        weights_path = network.weights_path
    else:
        weights_path = weights_for_workers(config, args.weights)
    try:
        prediction_settings = scoring.prediction_settings(config, weights_path, protocol)
        if args.save_dir is not None:
            claim_save_dir(args.save_dir, samples, prediction_settings, recorded)
    except (OSError, utils.OutputError) as error:
        raise cli.CommandError(error_line(error)) from None

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
        failure = f"stopped: {error_line(error)}"

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
    write_report(report_path, report, failure)
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
    return outcome(tally, report, len(samples), args.data)


def outcome(tally, report, images_expected, data_root):
    """The exit code of a run that went through the set: CommandError where no image could be
    evaluated, no pixel was labelled or an image was skipped."""
    if tally.images == 0:
        raise cli.CommandError("no image of the set could be evaluated")
    if report["labelled_pixels"] == 0:
        raise cli.CommandError(
            f"nothing to count: no pixel of the {tally.images} evaluated labels holds a class of the dataset "
            f"(every value is unlabelled or undefined); check the labels under {data_root}"
        )
    if tally.skipped:
        raise cli.CommandError(
            f"{len(tally.skipped)} of {images_expected} images could not be evaluated (named above and "
            "under \"skipped\" in the report); the metrics count the others"
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
            "accepted with '-' for '_' and '_' for '-'. Exit status: 0 when every image of the set was "
            "evaluated; 1 when an image or label could not be evaluated (skipped and named; after writing the "
            "report of the others), when nothing was evaluated or labelled, and on a wrong model, data or "
            "output path; 2 for a wrong command line; 130 when interrupted and 143 when terminated (both after "
            "writing the partial report)."
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
    parser.add_argument(
        "--save-dir", type=Path,
        help="keep predictions as <image stem>.png, outside --data; a rerun reuses those made from the same "
             "image with the same model, weights and protocol, and replaces the report kept there",
    )
    parser.add_argument(
        "--report", type=Path,
        help=f"JSON report (default: {REPORT_NAME} in --save-dir or the current directory); its folder must exist",
    )
    cli.add_overwrite_argument(parser, "the --report file")
    cli.add_backend_argument(parser)
    cli.add_cache_argument(parser)
    cli.add_ray_arguments(parser)
    return parser


def main(argv=None):
    """Runs the evaluation the command line asks for; returns the exit code."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    cli.check_ray_arguments(parser, args)
    runtime.configure(backend=args.backend)
    if args.no_cache:
        compile_cache.disable()
    cli.check_backend(parser)
    return cli.run_command(PROG, run, args, error_prefix="", interrupted_suffix=" before any image was evaluated")


if __name__ == "__main__":
    sys.exit(main())
