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

Before TensorFlow starts, everything that can be is checked, each problem one line:
TF_CONFIG, OUT and the files of a run in it (a new run replaces none that exists
unless --overwrite, and never one it reads: the --init weights and their description,
a file of the dataset), run.json field by field when resuming, --data, --init, and
the memory the batch of crops needs. Nothing is written in OUT before the first
iteration is done, so a run that fails before leaves OUT as it was.
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import os
import re
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
from pspnet_keras.training import run_record
from pspnet_keras.training.distribute import cluster_spec
from pspnet_keras.training.distribute import distribution_strategy
from pspnet_keras.training.distribute import is_chief
from pspnet_keras.training.distribute import worker_count
from pspnet_keras.training.errors import TrainingError

PROG = "train.py"
DEFAULT_OUT = "runs/train"
DEFAULT_SEED = 0
DEFAULT_VAL_EVERY = 0
DEFAULT_CHECKPOINT_EVERY = 1000
# The data order counts the samples a run takes (iterations x batch) in int64 (tf.data).
MAX_POSITIONS = 2**63 - 1
# A flag of another command (pspnet.py and evaluate.py take the weights with -w), as library messages name it.
WEIGHTS_FLAG = re.compile(r"(?<![\w-])-w(?![\w-])")


def in_train_terms(message):
    """A library's message with the weights flag of the other commands (-w) named as train.py's (--init)."""
    return WEIGHTS_FLAG.sub("--init", message)


def out_problem(out):
    """Why the run cannot write in OUT, or None: not a directory, on a read-only file system, not writable."""
    if os.path.lexists(out) and not out.is_dir():
        return "not a directory; choose another --out"
    problem = cli.directory_problem(out)
    return f"{problem}; choose another --out" if problem else None


def check_out(out):
    """Refuses an OUT the run cannot write in (out_problem)."""
    problem = out_problem(out)
    if problem:
        raise cli.CommandError(f"{out}: {problem}")


class TensorBoardEntries:
    """The names OUT/tensorboard/ holds when train.py alone wrote in it: TensorFlow's event files
    (`name in TensorBoardEntries()`, for cli.folder_output_problem)."""

    def __contains__(self, name):
        return name.startswith(run_files.EVENT_FILE_PREFIX)


def resumed_output_problem(target):
    """Why a file of the run being resumed cannot be read and replaced, or None."""
    if not os.path.lexists(target):
        return None
    return utils.file_problem(target) or utils.file_problem(target, replace=True)


def board_problem(board, inputs, resume, overwrite):
    """Why the run may not write its TensorBoard logs in `board` (OUT/tensorboard/), or None: a new run
    writes in no folder holding what another program wrote, and in an earlier run's only with
    `overwrite`; a resumed run adds to its own, which must be a folder."""
    if not resume:
        return cli.folder_output_problem(board, TensorBoardEntries(), inputs, overwrite)
    if os.path.lexists(board) and not os.path.isdir(board):
        return "is not a folder; the run's TensorBoard logs go there"
    return None


def run_output_problems(out, inputs, resume, overwrite):
    """(path, problem) of each file of a run (run_files.RUN_FILE_NAMES, tensorboard/) that it may not write.

    None is ever an input of the run (`inputs`, cli.Inputs). A new run writes none that
    exists, unless `overwrite`; a resumed run owns them, which must be regular files it
    can read (a folder, tensorboard/).
    """
    problems = []
    for name in run_files.RUN_FILE_NAMES:
        target = out / name
        if inputs.find(target) is not None:
            problem = cli.output_problem(target, inputs, overwrite=True)
        else:
            problem = resumed_output_problem(target) if resume else cli.output_problem(target, inputs, overwrite)
        if problem:
            problems.append((target, problem))
    board = out / run_files.TENSORBOARD_DIR
    problem = board_problem(board, inputs, resume, overwrite)
    if problem:
        problems.append((board, problem))
    return problems


def check_outputs(out, inputs, resume, overwrite):
    """Refuses a run whose files in OUT it may not write (run_output_problems): one line, the first."""
    held = [name for name in (run_files.RUN_RECORD_NAME, run_files.CHECKPOINT_NAME) if (out / name).is_file()]
    if held and not resume and not overwrite:
        raise cli.CommandError(
            f"{out}: holds a run ({held[0]}); pass --resume to continue it, {cli.OVERWRITE_FLAG} to replace it, "
            "or choose another --out"
        )
    problems = run_output_problems(out, inputs, resume, overwrite)
    if problems:
        target, problem = problems[0]
        raise cli.CommandError(f"{target}: {problem}")


def run_inputs(data_root, init_config, init_path):
    """The files the run reads (cli.Inputs), which none of its outputs may replace: the dataset, the --init
    weights (a released model's: where pspnet.py keeps them) and the description beside them."""
    weights = init_path if init_path is not None else download.default_weights_path(init_config.name)
    inputs = cli.Inputs({weights: "the --init weights", models.description_path(weights): "the --init description"})
    inputs.add_folder(data_root, "a file of the dataset")
    return inputs


def data_root_problem(root):
    """Why --data `root` is not a folder to read a dataset from, or None."""
    if os.path.isdir(root):
        return None
    if not os.path.lexists(root):
        return "no such folder"
    return utils.file_problem(root) if os.path.islink(root) and not os.path.exists(root) else "not a folder"


def dataset_layout(requested, root):
    """The layout of --data: --dataset, else the one found there."""
    problem = data_root_problem(root)
    if problem:
        raise cli.CommandError(f"{root}: {problem}; --data takes a dataset's root folder")
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


def same_init(given, recorded):
    """Whether --init `given` names what a run.json's init `recorded` (read_run_record's) does."""
    if given in models.RELEASED_MODELS or recorded in models.RELEASED_MODELS:
        return given == recorded
    return os.path.realpath(given) == os.path.realpath(recorded)


def recipe_values(args, record):
    """{flag dest: value} of the recipe flags: the command line's, or the resumed run's.

    A resumed run keeps its settings; a flag given with another value is refused.
    """
    values = {}
    for dest, flag in run_record.RECIPE_FLAGS.items():
        given = getattr(args, dest)
        if record is None:
            values[dest] = given
            continue
        same = same_init(given, record[dest]) if dest == "init" and given is not None else given == record[dest]
        if given is not None and not same:
            raise cli.CommandError(
                f"{flag} {given}: the run in {args.out} was started with {record[dest]}; a resumed run keeps "
                "its settings (start a new run with another --out to change them)"
            )
        values[dest] = record[dest]
    return values


def check_record_classes(record, dataset, out):
    """Refuses to resume a run of another number of classes than --data's."""
    if record["classes"] != dataset.classes:
        raise cli.CommandError(
            f"{out / run_files.RUN_RECORD_NAME}: field 'classes' is {record['classes']}, but --data {dataset.root} "
            f"has {dataset.classes} classes; resume with the data the run was started on"
        )


def problem_lines(problems):
    """The problem lines of check_samples' result, in sample order."""
    return [line for lines in problems.values() for line in lines]


def checked_samples(samples, split, skip_bad, quiet, root):
    """The samples of a split that can be used, after checking every one.

    Each problem is one line on stderr; any problem stops the run unless skip_bad,
    which leaves those samples out and says how many. A split whose usable labels
    hold no class (every value unlabelled) is refused, as evaluate.py refuses it.
    """
    from pspnet_keras.training.data import check_samples

    problems, labelled = check_samples(samples, description=f"checking {split}", quiet=quiet)
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
    if not labelled:
        raise cli.CommandError(
            f"nothing to learn from the {split} split: no pixel of its {len(good)} labels holds a class of the "
            f"dataset (every value is unlabelled, {datasets.IGNORE_LABEL}); check the labels under {root}"
        )
    return good


def init_weights_path(config, path, quiet):
    """The weights file to start from: `path`, or the released model's, downloaded when missing."""
    try:
        return download.weights_to_load(config, path, show_progress=not quiet)
    except download.WeightsNotFound as error:
        raise cli.CommandError(in_train_terms(str(error))) from None


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
    """recipe.Settings of the recipe values (recipe_with_defaults) and the bookkeeping flags."""
    return recipe.Settings(
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
        raise cli.CommandError(in_train_terms(str(error))) from None


def step_bytes(batch, crop, classes):
    """A lower bound of the memory one training step takes for a batch of `batch` crops of `crop` px:
    the input batch alone (float32 images B x S x S x 3, uint8 labels B x S x S) and the two logit maps
    the loss reads in float32 (B x S x S x classes each, the main and the auxiliary head's). The
    network's activations, kept for the gradients, take many times more."""
    return batch * crop * crop * (3 * 4 + 1 + 2 * classes * 4)


def check_sizes(settings, classes, workers):
    """Refuses, before TensorFlow starts, a run whose data order overflows (iterations x batch samples
    beyond int64) or whose batch of crops cannot fit in this machine's memory (step_bytes, this
    process's share of the global batch)."""
    positions = settings.iterations * settings.batch
    if positions > MAX_POSITIONS:
        raise cli.CommandError(
            f"--iterations {settings.iterations} x --batch {settings.batch} = {positions} samples, more than the "
            f"data order counts ({MAX_POSITIONS}); use fewer iterations"
        )
    share = -(-settings.batch // workers)
    crops = f"{share} crop" + ("s" if share > 1 else "")
    problem = runtime.allocation_problem(
        step_bytes(share, settings.crop_size, classes),
        f"a training step on {crops} of {settings.crop_size} px (--batch {settings.batch}, --crop "
        f"{settings.crop_size}, {classes} classes)",
    )
    if problem:
        raise cli.CommandError(f"{problem}; use a smaller --batch or --crop")


def check_settings(settings, strategy):
    """Refuses a batch the replicas cannot share and a mixed precision without a GPU."""
    from pspnet_keras import backend

    replicas = strategy.num_replicas_in_sync
    if settings.batch % replicas:
        raise cli.CommandError(
            f"--batch {settings.batch} cannot be split over the {replicas} replicas; use a multiple of {replicas}"
        )
    problem = runtime.precision_problem(settings.precision, backend.gpu_names(), cpu_bfloat16=False)
    if problem:
        raise cli.CommandError(problem)


def remove_earlier_run(out):
    """Removes what an earlier run left in OUT that this run replaces (--overwrite; check_outputs allowed
    them): its checkpoint, its final model and its TensorBoard event files."""
    for name in (run_files.CHECKPOINT_NAME, run_files.FINAL_WEIGHTS_NAME, run_files.FINAL_DESCRIPTION_NAME):
        (out / name).unlink(missing_ok=True)
    board = out / run_files.TENSORBOARD_DIR
    if board.is_dir():
        for entry in board.iterdir():
            if entry.name in TensorBoardEntries():
                entry.unlink()


def start_out(out, record, overwrite):
    """Records a new run in OUT/run.json, once its first iteration is done (so that a run that fails
    before leaves OUT as it was); with `overwrite`, removes the earlier run's files first."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            remove_earlier_run(out)
        utils.write_json_atomic(out / run_files.RUN_RECORD_NAME, record)
    except utils.OutputError as error:
        raise TrainingError(str(error)) from None
    except OSError as error:
        raise TrainingError(f"{out}: cannot write ({error.strerror or error})") from None


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


def stop_message(trainer, out, resume):
    """What an interrupted run left in OUT to resume from, in one line."""
    checkpoint = out / run_files.CHECKPOINT_NAME
    at, done = trainer.checkpointed, trainer.iteration
    if at:
        which = "" if at == done else f" of iteration {at}"
        return f"stopped at iteration {done}; checkpoint{which} in {checkpoint} (--resume continues)"
    if resume and at is None and os.path.lexists(checkpoint):
        return f"stopped before the first iteration; {checkpoint} is as it was (--resume continues)"
    if resume or done:
        return (
            f"stopped at iteration {done}, before any checkpoint: there is none in {out} "
            "(--resume starts the run again from its first iteration)"
        )
    return f"stopped before the first iteration; this run wrote nothing in {out}"


def run(args):
    """Trains as the command line asks; returns the exit code.

    Everything that can be checked without TensorFlow is, first: TF_CONFIG, OUT and
    the files of the run in it, run.json when resuming, --data, --init, and the sizes
    the flags ask for (check_sizes). Nothing is written in OUT before the first
    iteration is done.
    """
    out = Path(args.out)
    cluster = cluster_spec()
    chief = is_chief(cluster)
    if chief:
        check_out(out)
    record = run_record.read_run_record(out) if args.resume else None
    values = recipe_values(args, record)
    dataset, samples, val_samples = open_data(values, args)
    if record is not None:
        check_record_classes(record, dataset, out)
    init_config, init_path = starting_model(values)
    values = recipe_with_defaults(values, dataset.name, init_config)
    settings = settings_of(values, args)
    if chief:
        check_outputs(out, run_inputs(args.data, init_config, init_path), args.resume, args.overwrite)
    check_sizes(settings, dataset.classes, max(1, worker_count(cluster)))
    strategy = distribution_strategy(cluster)
    from pspnet_keras.training.data import samples_fingerprint
    from pspnet_keras.training.init_weights import load_init_weights
    from pspnet_keras.training.loop import Trainer

    check_settings(settings, strategy)
    config = models.ModelConfig(
        name=run_files.FINAL_STEM, depth=init_config.depth, classes=dataset.classes, crop_size=settings.crop_size,
        base_size=values["base_size"], class_names=dataset.class_names, palette=dataset.palette,
        mean_rgb=init_config.mean_rgb,
    )
    quiet = args.quiet or not chief
    samples = checked_samples(samples, "train", args.skip_bad, quiet, dataset.root)
    if val_samples:
        val_samples = checked_samples(val_samples, "val", args.skip_bad, quiet, dataset.root)
    model, network, optimizer = build(strategy, config, settings)
    new_record = run_record.recorded_values(values, dataset.classes)
    trainer = Trainer(
        strategy, model, network, optimizer, settings, config, out, samples, val_samples,
        fingerprint=samples_fingerprint(samples, dataset.root), chief=chief, quiet=args.quiet,
        on_first_iteration=(lambda: start_out(out, new_record, args.overwrite)) if chief and record is None else None,
    )
    try:
        start = trainer.resume() if args.resume else 0
        if start == 0:
            fresh = load_init_weights(network, init_weights_path(init_config, init_path, quiet), init_config)
            if fresh and not quiet:
                print(f"{PROG}: {', '.join(fresh)} starts fresh ({dataset.classes} classes)", file=sys.stderr)
        final = trainer.run(start)
    except TrainingError as error:
        raise cli.CommandError(in_train_terms(str(error))) from None
    except KeyboardInterrupt:
        if chief:
            print(f"{PROG}: {stop_message(trainer, out, args.resume)}", file=sys.stderr)
        raise
    if final is not None and not args.quiet:
        print(f"wrote {final} and {models.description_path(final)} ({settings.iterations} iterations)")
    return cli.EXIT_OK


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
            "when interrupted (Ctrl-C) and 143 when terminated (SIGTERM), both after writing a checkpoint of "
            "the iterations done. Nothing is written in OUT before the first iteration is done."
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
        "--crop", type=run_record.RECIPE_TYPES["crop"], metavar="S",
        help="side of the square training crops, 48k - 7 (default: 473, Cityscapes 713; folders: the --init "
             "model's)",
    )
    model.add_argument(
        "--base-size", type=run_record.RECIPE_TYPES["base_size"], metavar="N",
        help="longer side the final model's sliding-window protocol (-s) scales images to (default: the "
             "dataset's released model's, folders: the --init model's)",
    )
    model.add_argument(
        "--precision", choices=runtime.PRECISIONS,
        help="float32, or bfloat16 / float16 mixed precision (GPU only) (default: float32)",
    )

    recipe_group = parser.add_argument_group("Recipe")
    recipe_group.add_argument(
        "--batch", type=run_record.RECIPE_TYPES["batch"], metavar="B",
        help=f"global batch, split over the replicas (default: {recipe.BATCH_SIZE})",
    )
    recipe_group.add_argument(
        "--lr", type=run_record.RECIPE_TYPES["lr"], help=f"base learning rate (default: {recipe.BASE_LR})",
    )
    recipe_group.add_argument(
        "--momentum", type=run_record.RECIPE_TYPES["momentum"], help=f"SGD momentum (default: {recipe.MOMENTUM})",
    )
    recipe_group.add_argument(
        "--weight-decay", type=run_record.RECIPE_TYPES["weight_decay"],
        help=f"L2 weight decay added to the gradient, as Caffe does (default: {recipe.WEIGHT_DECAY})",
    )
    recipe_group.add_argument(
        "--power", type=run_record.RECIPE_TYPES["power"],
        help=f"power of the poly learning rate policy (default: {recipe.POLY_POWER})",
    )
    recipe_group.add_argument(
        "--aux-weight", type=run_record.RECIPE_TYPES["aux_weight"],
        help=f"weight of the auxiliary loss (default: {recipe.AUX_WEIGHT})",
    )
    recipe_group.add_argument(
        "--head-lr-mult", type=run_record.RECIPE_TYPES["head_lr_mult"],
        help="learning rate multiplier of the pyramid module, conv5_4, conv6 and the auxiliary head "
             f"(default: {recipe.HEAD_LR_MULTIPLIER:g})",
    )
    recipe_group.add_argument(
        "--train-bn", action="store_true", default=None,
        help="train the BN layers: batch statistics synchronised over the replicas, moving averages updated, "
             "gamma and beta trained (default: frozen, with the stored statistics, gamma and beta fixed)",
    )
    recipe_group.add_argument(
        "--seed", type=run_record.RECIPE_TYPES["seed"], metavar="N",
        help=f"seed of the data order, augmentation, dropout and fresh layers, 0..{run_record.MAX_SEED} "
             f"(default: {DEFAULT_SEED})",
    )

    schedule = parser.add_argument_group("Schedule")
    schedule.add_argument(
        "--iterations", type=run_record.RECIPE_TYPES["iterations"], metavar="N",
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
    cli.add_overwrite_argument(
        output,
        f"an earlier run's files in OUT ({', '.join(run_files.RUN_FILE_NAMES)} and the event files of "
        f"{run_files.TENSORBOARD_DIR}/; taken away once the new run's first iteration is done)",
    )
    output.add_argument("-q", "--quiet", action="store_true", help="print errors and warnings only: no progress bars")
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error(f"--resume continues the run in OUT, {cli.OVERWRITE_FLAG} starts a new one over it: not both")
    runtime.configure(verbose=False)
    cli.check_backend(parser, tensorflow_only="tf.data and tf.distribute are TensorFlow's")
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
