"""Trains PSPNet with the paper's recipe: the `train.py` command line over pspnet_keras/training/.

    python train.py --data ~/data/mine --dataset folders --out runs/mine
    python train.py --data ~/data/mine --out runs/mine --resume

Fine-tunes a released model (by default the one of the dataset's benchmark) or a
user's earlier run on one of the dataset layouts of datasets.py, and writes
OUT/final.h5 with its description OUT/final.json, which pspnet.py -w and
evaluate.py -w take. The whole set is checked before the first iteration. OUT also
holds run.json (the run's settings), checkpoint.h5, log.csv and tensorboard/.

TensorFlow is imported after the command line is parsed, quietly (runtime.configure,
runtime.import_tensorflow), and TF_CONFIG's MultiWorkerMirroredStrategy is made
before TensorFlow runs anything, as it must be.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import utils
from pspnet_keras import cli
from pspnet_keras import datasets
from pspnet_keras import download
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.training import recipe
from pspnet_keras.training import run_files
from pspnet_keras.training.distribute import cluster_spec
from pspnet_keras.training.distribute import distribution_strategy
from pspnet_keras.training.distribute import is_chief
from pspnet_keras.training.errors import TrainingError

PROG = "train.py"
DEFAULT_OUT = "runs/train"
DEFAULT_SEED = 0
DEFAULT_VAL_EVERY = 0
DEFAULT_CHECKPOINT_EVERY = 1000
# Flags that fix what a run computes: a resumed run keeps the values it was started with.
RECIPE_FLAGS = {
    "dataset": "--dataset", "init": "--init", "crop": "--crop", "base_size": "--base-size", "batch": "--batch",
    "iterations": "--iterations", "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
    "power": "--power", "aux_weight": "--aux-weight", "head_lr_mult": "--head-lr-mult", "train_bn": "--train-bn",
    "seed": "--seed", "precision": "--precision",
}


def read_run_record(out):
    """The settings recorded in OUT/run.json (run_files.RUN_RECORD_NAME) by the run being resumed."""
    path = out / run_files.RUN_RECORD_NAME
    problem = utils.file_problem(path)
    if problem:
        raise cli.CommandError(f"{path}: {problem}; there is no run to resume in {out} (start one without --resume)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise cli.CommandError(f"{path}: unreadable ({getattr(error, 'strerror', None) or error})") from None
    if not isinstance(record, dict) or not all(key in record for key in RECIPE_FLAGS):
        raise cli.CommandError(f"{path}: not the record of a train.py run")
    return record


def check_out(out, resume):
    """Refuses an OUT that is not a directory, or that holds a run when not resuming."""
    if os.path.lexists(out) and not out.is_dir():
        raise cli.CommandError(f"{out}: not a directory; choose another --out")
    if resume:
        return
    names = (run_files.RUN_RECORD_NAME, run_files.CHECKPOINT_NAME, run_files.FINAL_WEIGHTS_NAME)
    held = [name for name in names if (out / name).exists()]
    if held:
        raise cli.CommandError(f"{out}: holds a run ({held[0]}); pass --resume to continue it, or choose another --out")


def dataset_layout(requested, root):
    """The layout of --data: --dataset, else the one found there."""
    if requested:
        return requested
    found = datasets.datasets_laid_out_at(root)
    if len(found) == 1:
        return found[0]
    if found:
        raise cli.CommandError(f"{root} holds the layouts of {' and '.join(found)}; choose one with --dataset")
    raise cli.CommandError(
        f"{root}: no dataset layout found (ade20k, cityscapes, voc2012 or folders: images/<split> with "
        "labels/<split> and classes.txt); name it with --dataset"
    )


def recipe_values(args, record):
    """{flag dest: value} of the recipe flags: the command line's, or the resumed run's.

    A resumed run keeps its settings; a flag given with another value is refused.
    """
    values = {}
    for dest, flag in RECIPE_FLAGS.items():
        given = getattr(args, dest)
        if record is None:
            values[dest] = given
            continue
        if given is not None and given != record[dest]:
            raise cli.CommandError(
                f"{flag} {given}: the run in {args.out} was started with {record[dest]}; a resumed run keeps "
                "its settings (start a new run with another --out to change them)"
            )
        values[dest] = record[dest]
    return values


def problem_lines(problems):
    """The problem lines of check_samples' result, in sample order."""
    return [line for lines in problems.values() for line in lines]


def checked_samples(samples, split, skip_bad, quiet):
    """The samples of a split that can be used, after checking every one.

    Each problem is one line on stderr; any problem stops the run unless skip_bad,
    which leaves those samples out and says how many.
    """
    from pspnet_keras.training.data import check_samples

    problems = check_samples(samples, description=f"checking {split}", quiet=quiet)
    for line in problem_lines(problems):
        print(f"{PROG}: {'skipped' if skip_bad else 'error'}: {line}", file=sys.stderr)
    if problems and not skip_bad:
        raise cli.CommandError(
            f"{len(problems)} of the {len(samples)} samples of the {split} split cannot be used (above); "
            "fix them, or pass --skip-bad to train without them"
        )
    good = [sample for sample in samples if sample not in problems]
    if problems:
        print(f"{PROG}: skipping {len(problems)} of the {len(samples)} samples of the {split} split", file=sys.stderr)
    if not good:
        raise cli.CommandError(f"no usable sample in the {split} split")
    return good


def init_weights_path(config, path, quiet):
    """The weights file to start from: `path`, or the released model's, downloaded when missing."""
    if path is not None:
        return path
    from layers_builder import build_pspnet

    path = download.default_weights_path(config.name)
    if not path.exists():
        try:
            download.download_weights(
                build_pspnet(config, models.SMALLEST_CROP_SIZE), config, path, show_progress=not quiet
            )
        except download.WeightsNotFound as error:
            raise cli.CommandError(str(error)) from None
    return path


def recipe_with_defaults(values, dataset_name, init_config):
    """The recipe values with the defaults filled in: the paper's, and crop and base size from the
    dataset's released model (a folders dataset: from the --init model)."""
    benchmark = models.RELEASED_MODELS[recipe.INIT_MODELS[dataset_name]] if dataset_name != "folders" else init_config
    defaults = {
        "crop": benchmark.crop_size, "base_size": benchmark.base_size, "batch": recipe.BATCH_SIZE,
        "iterations": recipe.ITERATIONS[dataset_name], "lr": recipe.BASE_LR, "momentum": recipe.MOMENTUM,
        "weight_decay": recipe.WEIGHT_DECAY, "power": recipe.POLY_POWER, "aux_weight": recipe.AUX_WEIGHT,
        "head_lr_mult": recipe.HEAD_LR_MULTIPLIER, "train_bn": False, "seed": DEFAULT_SEED, "precision": "float32",
    }
    return {key: defaults[key] if value is None else value for key, value in values.items()}


def settings_of(values, args):
    """loop.Settings of the recipe values (recipe_with_defaults) and the bookkeeping flags."""
    from pspnet_keras.training.loop import Settings

    return Settings(
        iterations=values["iterations"], batch=values["batch"], crop_size=values["crop"], lr=values["lr"],
        momentum=values["momentum"], weight_decay=values["weight_decay"], power=values["power"],
        aux_weight=values["aux_weight"], head_lr_mult=values["head_lr_mult"], train_bn=values["train_bn"],
        seed=values["seed"], precision=values["precision"], val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
    )


def open_data(values, args):
    """(dataset, training samples, validation samples) of --data; fills in values["dataset"]."""
    try:
        values["dataset"] = dataset_layout(values["dataset"], args.data)
        dataset = datasets.open_dataset(values["dataset"], args.data)
        return dataset, dataset.samples("train"), dataset.samples("val") if args.val_every else []
    except datasets.DataRootError as error:
        raise cli.CommandError(str(error)) from None


def starting_model(values):
    """(ModelConfig, weights path or None for a released model's own) of --init; fills in values["init"]."""
    from pspnet_keras.training.init_weights import init_model

    values["init"] = values["init"] or recipe.INIT_MODELS[values["dataset"]]
    try:
        return init_model(values["init"])
    except TrainingError as error:
        raise cli.CommandError(str(error)) from None


def check_settings(settings, strategy):
    """Refuses a batch the replicas cannot share and a mixed precision without a GPU."""
    replicas = strategy.num_replicas_in_sync
    if settings.batch % replicas:
        raise cli.CommandError(
            f"--batch {settings.batch} cannot be split over the {replicas} replicas; use a multiple of {replicas}"
        )
    problem = runtime.precision_problem(settings.precision)
    if problem:
        raise cli.CommandError(problem)


def start_out(out, values, classes):
    """Creates OUT and records the run's settings in OUT/run.json."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        utils.write_json_atomic(out / run_files.RUN_RECORD_NAME, {**values, "classes": classes})
    except (OSError, utils.OutputError) as error:
        raise cli.CommandError(f"{out}: cannot write ({getattr(error, 'strerror', None) or error})") from None


def build(strategy, config, settings):
    """(training model, inference network, optimiser) of a run, made in the strategy's scope and
    seeded, so that fresh layers start alike in every process of the run."""
    import keras

    from pspnet_keras.training.network import build_training_model
    from pspnet_keras.training.optimizer import recipe_optimizer

    keras.utils.set_random_seed(settings.seed)
    with strategy.scope():
        model, network = build_training_model(
            config, settings.crop_size, settings.train_bn, settings.precision, settings.aux_weight
        )
        optimizer = recipe_optimizer(
            model, settings.iterations, settings.lr, settings.momentum, settings.weight_decay, settings.power,
            settings.head_lr_mult, settings.precision,
        )
        model.compile(optimizer=optimizer, jit_compile=False)
        optimizer.build(model.trainable_variables)
    return model, network, optimizer


def run(args):
    """Trains as the command line asks; returns the exit code."""
    out = Path(args.out)
    chief = is_chief(cluster_spec())
    if chief:
        check_out(out, args.resume)
    record = read_run_record(out) if args.resume else None
    values = recipe_values(args, record)
    strategy = distribution_strategy()
    from pspnet_keras.training.data import samples_fingerprint
    from pspnet_keras.training.init_weights import load_init_weights
    from pspnet_keras.training.loop import Trainer

    dataset, samples, val_samples = open_data(values, args)
    init_config, init_path = starting_model(values)
    values = recipe_with_defaults(values, dataset.name, init_config)
    settings = settings_of(values, args)
    check_settings(settings, strategy)
    config = models.ModelConfig(
        name=run_files.FINAL_STEM, depth=init_config.depth, classes=dataset.classes, crop_size=settings.crop_size,
        base_size=values["base_size"], class_names=dataset.class_names, palette=dataset.palette,
        mean_rgb=init_config.mean_rgb,
    )
    quiet = args.quiet or not chief
    samples = checked_samples(samples, "train", args.skip_bad, quiet)
    if val_samples:
        val_samples = checked_samples(val_samples, "val", args.skip_bad, quiet)
    if chief and record is None:
        start_out(out, values, dataset.classes)
    model, network, optimizer = build(strategy, config, settings)
    trainer = Trainer(
        strategy, model, network, optimizer, settings, config, out, samples, val_samples,
        fingerprint=samples_fingerprint(samples, dataset.root), chief=chief, quiet=args.quiet,
    )
    try:
        start = trainer.resume() if args.resume else 0
        if start == 0:
            fresh = load_init_weights(network, init_weights_path(init_config, init_path, quiet), init_config)
            if fresh and not quiet:
                print(f"{PROG}: {', '.join(fresh)} starts fresh ({dataset.classes} classes)", file=sys.stderr)
        final = trainer.run(start)
    except TrainingError as error:
        raise cli.CommandError(str(error)) from None
    except KeyboardInterrupt:
        if chief:
            print(
                f"{PROG}: stopped at iteration {trainer.iteration}; checkpoint in {out / run_files.CHECKPOINT_NAME} "
                "(--resume continues)",
                file=sys.stderr,
            )
        raise
    if final is not None and not args.quiet:
        print(f"wrote {final} and {models.description_path(final)} ({settings.iterations} iterations)")
    return cli.EXIT_OK


def crop_size(text):
    """argparse type: a crop size the network supports (48k - 7)."""
    value = cli.positive_int(text)
    problem = models.crop_size_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def argument_parser():
    """The parser of the command line, every option documented, in groups (data, model, recipe,
    schedule, output)."""
    final, checkpoint = run_files.FINAL_WEIGHTS_NAME, run_files.CHECKPOINT_NAME
    final_description = models.description_path(Path(final)).name
    parser = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Train PSPNet with the paper's recipe (Zhao et al., CVPR 2017, section 4; hszhao/semseg): "
            "softmax cross-entropy plus 0.4 x an auxiliary head's on stage 4, SGD with momentum and the "
            "'poly' learning rate, the new layers at 10x, random scale, rotation, blur, mirror and crop. "
            f"Writes OUT/{final} and OUT/{final_description} (a model pspnet.py -w and evaluate.py -w take), "
            f"OUT/{checkpoint}, OUT/{run_files.LOG_NAME} and TensorBoard logs in OUT/{run_files.TENSORBOARD_DIR}."
        ),
        epilog=(
            "Data: every image and label of the split is read before the first iteration; each problem "
            "(unreadable image, missing label, label of another size, label values neither a class nor "
            "unlabelled) is one line, and the run stops unless --skip-bad. Several GPUs of a machine are used "
            "together (MirroredStrategy); with TF_CONFIG, several machines (MultiWorkerMirroredStrategy), "
            "--batch being the global batch. Long options are also accepted with '_' for '-'. Exit status: 0 "
            "when trained, 1 on an error (data, files, a non-finite loss), 2 for a wrong command line, 130 "
            "when interrupted (Ctrl-C) and 143 when terminated (SIGTERM), both after writing a checkpoint."
        ),
    )
    data = parser.add_argument_group("Data")
    data.add_argument("--data", required=True, type=Path, metavar="ROOT", help="dataset root")
    data.add_argument(
        "--dataset", choices=datasets.DATASET_NAMES,
        help="layout of --data: ade20k, cityscapes, voc2012, or folders (ROOT/images/<split>/<name>.<ext>, "
             "ROOT/labels/<split>/<name>.png with 8-bit class ids and 255 unlabelled, ROOT/classes.txt, "
             "optionally ROOT/palette.txt) (default: the one found at ROOT)",
    )
    data.add_argument(
        "--skip-bad", action="store_true",
        help="leave out the samples with problems instead of stopping (each is still reported)",
    )

    model = parser.add_argument_group("Model")
    model.add_argument(
        "--init", metavar="MODEL_OR_H5",
        help="where training starts: a released model (" + ", ".join(models.RELEASED_MODEL_NAMES) + "; its "
             f"weights as pspnet.py finds them), a released model's .h5, or an earlier run's {final} with "
             f"{final_description} beside it; conv6 starts fresh when the classes differ (default: "
             + ", ".join(f"{name}: {released}" for name, released in recipe.INIT_MODELS.items()) + ")",
    )
    model.add_argument(
        "--crop", type=crop_size, metavar="S",
        help="side of the square training crops, 48k - 7 (default: 473, Cityscapes 713; folders: the --init "
             "model's)",
    )
    model.add_argument(
        "--base-size", type=cli.positive_int, metavar="N",
        help="longer side the final model's sliding-window protocol (-s) scales images to (default: the "
             "dataset's released model's, folders: the --init model's)",
    )
    model.add_argument(
        "--precision", choices=runtime.PRECISIONS,
        help="float32, or bfloat16 / float16 mixed precision (GPU only) (default: float32)",
    )

    recipe_group = parser.add_argument_group("Recipe")
    recipe_group.add_argument(
        "--batch", type=cli.positive_int, metavar="B",
        help=f"global batch, split over the replicas (default: {recipe.BATCH_SIZE})",
    )
    recipe_group.add_argument(
        "--lr", type=cli.number(0, strictly=True), help=f"base learning rate (default: {recipe.BASE_LR})",
    )
    recipe_group.add_argument(
        "--momentum", type=cli.number(0, below=1), help=f"SGD momentum (default: {recipe.MOMENTUM})",
    )
    recipe_group.add_argument(
        "--weight-decay", type=cli.number(0),
        help=f"L2 weight decay added to the gradient, as Caffe does (default: {recipe.WEIGHT_DECAY})",
    )
    recipe_group.add_argument(
        "--power", type=cli.number(0), help=f"power of the poly learning rate policy (default: {recipe.POLY_POWER})",
    )
    recipe_group.add_argument(
        "--aux-weight", type=cli.number(0), help=f"weight of the auxiliary loss (default: {recipe.AUX_WEIGHT})",
    )
    recipe_group.add_argument(
        "--head-lr-mult", type=cli.number(0, strictly=True),
        help="learning rate multiplier of the pyramid module, conv5_4, conv6 and the auxiliary head "
             f"(default: {recipe.HEAD_LR_MULTIPLIER:g})",
    )
    recipe_group.add_argument(
        "--train-bn", action="store_true", default=None,
        help="train the BN layers: batch statistics synchronised over the replicas, moving averages updated, "
             "gamma and beta trained (default: frozen, with the stored statistics, gamma and beta fixed)",
    )
    recipe_group.add_argument(
        "--seed", type=cli.integer(0), metavar="N",
        help=f"seed of the data order, augmentation, dropout and fresh layers (default: {DEFAULT_SEED})",
    )

    schedule = parser.add_argument_group("Schedule")
    schedule.add_argument(
        "--iterations", type=cli.positive_int, metavar="N",
        help="training iterations (default: "
             + ", ".join(f"{name} {count}" for name, count in recipe.ITERATIONS.items()) + ")",
    )
    schedule.add_argument(
        "--val-every", type=cli.integer(0), default=DEFAULT_VAL_EVERY, metavar="N",
        help="measure mIoU on the val split every N iterations and at the end, one crop per image with flip "
             "(evaluate.py's default mode); 0: never (default: %(default)s)",
    )
    schedule.add_argument(
        "--checkpoint-every", type=cli.positive_int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
        help=f"write OUT/{checkpoint} every N iterations (default: %(default)s)",
    )

    output = parser.add_argument_group("Output")
    output.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output directory (default: %(default)s)")
    output.add_argument(
        "--resume", action="store_true",
        help="continue the run in OUT from its checkpoint, with the settings it was started with",
    )
    output.add_argument("-q", "--quiet", action="store_true", help="print errors and warnings only: no progress bars")
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    runtime.configure(verbose=False)
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
