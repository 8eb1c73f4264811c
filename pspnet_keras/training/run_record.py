"""OUT/run.json: the settings a train.py run records when it starts, read back on --resume.

A resumed run keeps the recipe it was started with; run.json is read back field by
field with the checks of the flag each field comes from (the same argparse types), so
that a value no command line could have given is one line naming the file and the field.
"""

import argparse
import json
import os

import utils
from pspnet_keras import cli
from pspnet_keras import datasets
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.training.run_files import RUN_RECORD_NAME

# keras.utils.set_random_seed seeds NumPy's global generator too, which takes seeds 0..2^32 - 1.
MAX_SEED = 2**32 - 1
# A run.json train.py writes is well under 1 KiB; a larger one is no such record.
MAX_RECORD_BYTES = 1 << 20
# Flags that fix what a run computes: a resumed run keeps the values it was started with.
RECIPE_FLAGS = {
    "dataset": "--dataset", "init": "--init", "crop": "--crop", "base_size": "--base-size", "batch": "--batch",
    "iterations": "--iterations", "lr": "--lr", "momentum": "--momentum", "weight_decay": "--weight-decay",
    "power": "--power", "aux_weight": "--aux-weight", "head_lr_mult": "--head-lr-mult", "train_bn": "--train-bn",
    "seed": "--seed", "precision": "--precision",
}
# The choices of the recipe flags that take one, and the fields of run.json besides the recipe's.
RECIPE_CHOICES = {"dataset": datasets.DATASET_NAMES, "precision": runtime.PRECISIONS}
RECORD_FIELDS = (*RECIPE_FLAGS, "classes")


def crop_size(text):
    """argparse type: a crop size the network supports (48k - 7)."""
    value = cli.positive_int(text)
    problem = models.crop_size_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def seed_value(text):
    """argparse type: a seed 0..MAX_SEED, what keras.utils.set_random_seed takes."""
    value = cli.integer(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SEED} (2^32 - 1, the largest seed keras.utils.set_random_seed takes), got {value}"
        )
    return value


# The argparse type of each recipe flag that takes a number; run.json's values go through the same.
RECIPE_TYPES = {
    "crop": crop_size, "base_size": cli.positive_int, "batch": cli.positive_int, "iterations": cli.positive_int,
    "seed": seed_value, "lr": cli.number(0, strictly=True), "momentum": cli.number(0, below=1),
    "weight_decay": cli.number(0), "power": cli.number(0), "aux_weight": cli.number(0),
    "head_lr_mult": cli.number(0, strictly=True),
}
INTEGER_FIELDS = ("crop", "base_size", "batch", "iterations", "seed")


def record_field_problem(field, value):
    """Why the value of a run.json field is not one the command line could have given, or None."""
    if field in RECIPE_CHOICES:
        if not isinstance(value, str) or value not in RECIPE_CHOICES[field]:
            return f"must be one of {', '.join(RECIPE_CHOICES[field])}, not {cli.shown_value(value)}"
    elif field == "init":
        if not isinstance(value, str) or not value:
            return f"must be a released model's name or a weights file's path, not {cli.shown_value(value)}"
    elif field == "train_bn":
        if not isinstance(value, bool):
            return f"must be true or false, not {cli.shown_value(value)}"
    elif field == "classes":
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= models.MAX_CLASSES:
            return f"must be an integer 1..{models.MAX_CLASSES}, not {cli.shown_value(value)}"
    elif isinstance(value, bool) or not isinstance(value, int if field in INTEGER_FIELDS else (int, float)):
        return f"must be {'an integer' if field in INTEGER_FIELDS else 'a number'}, not {cli.shown_value(value)}"
    else:
        try:
            RECIPE_TYPES[field](str(value))
        except argparse.ArgumentTypeError as error:
            return str(error)
    return None


def recorded_init(path, out, init):
    """The --init that run.json records: a released model's name, or a weights file, a relative path taken
    from OUT (the folder of run.json); CommandError when that file cannot be read."""
    if init in models.RELEASED_MODELS:
        return init
    resolved = out / init
    problem = utils.file_problem(resolved, what="weights file")
    if problem:
        relative = "" if os.path.isabs(init) else f" (a relative path in run.json is taken from {out})"
        raise cli.CommandError(f"{path}: field 'init' names {resolved}{relative}: {problem}")
    return str(resolved)


def read_run_record(out):
    """The settings recorded in OUT/run.json (RUN_RECORD_NAME) by the run being resumed, every
    field checked as the command line checks its flag; CommandError naming the file and the field."""
    path = out / RUN_RECORD_NAME
    problem = utils.file_problem(path)
    if problem:
        raise cli.CommandError(f"{path}: {problem}; there is no run to resume in {out} (start one without --resume)")
    try:
        record = json.loads(utils.read_small_file(path, MAX_RECORD_BYTES, "the record of a train.py run"))
    except utils.FileError as error:
        raise cli.CommandError(str(error)) from None
    except (ValueError, RecursionError) as error:
        raise cli.CommandError(f"{path}: not valid JSON ({str(error)[:80]})") from None
    if not isinstance(record, dict):
        raise cli.CommandError(f"{path}: not the record of a train.py run (a JSON object is expected)")
    for field in RECORD_FIELDS:
        if field not in record:
            raise cli.CommandError(f"{path}: field '{field}' is missing; not the record of a train.py run")
        problem = record_field_problem(field, record[field])
        if problem:
            raise cli.CommandError(f"{path}: field '{field}' {problem}")
    return {**record, "init": recorded_init(path, out, record["init"])}


def recorded_values(values, classes):
    """What OUT/run.json records of a new run: the recipe values, --init a released model's name or its
    absolute path (so that --resume works from any folder), and the classes."""
    init = values["init"]
    return {**values, "init": init if init in models.RELEASED_MODELS else os.path.abspath(init), "classes": classes}
