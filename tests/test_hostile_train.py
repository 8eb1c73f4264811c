"""train.py under hostile and careless input: every case ends in one line and an exit status, never a
traceback or a hang, and nothing the user had is lost.

Covered, each class with several cases:
- OUT holding files the run did not write (log.csv, final.json, tensorboard/ ...): a new run refuses
  each name it writes unless --overwrite; no output ever replaces an input (--init and the
  description beside it, a file of the dataset), even with --overwrite;
- paths that are not regular files (FIFO, directory, device, symbolic-link loop) where train.py reads
  run.json, checkpoint.h5, log.csv, the --init weights and their description, and a --data that is
  no folder;
- run.json on --resume: every field checked as its flag is (types, ranges, choices), a relative
  --init taken from OUT, a file that is not a JSON object, nested absurdly deep, huge, not UTF-8;
- a checkpoint's state and arrays checked before anything is assigned;
- TF_CONFIG that is not a cluster of "host:port" workers with this process's task in it;
- flags beyond what the machine holds (--batch, --crop, --iterations, --seed), refused in under a
  second before TensorFlow builds anything;
- nothing half-done: a run that fails before its first iteration leaves OUT as it was, a set whose
  labels are all unlabelled is refused;
- what the messages say: train.py's own flags (--init, never -w), the recipe values away from the
  paper's when the loss explodes, no checkpoint claimed where there is none, a read-only file
  system and the file-size limit named as such, no temporary file left.

The cases refused before the network is built run in this process (train.main); the few that need
a network (a write failing under RLIMIT_FSIZE, a failure before the first iteration) are marked slow.
"""

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import train
import utils
from helpers import file_size_limit
from helpers import folder_snapshot
from pspnet_keras import download
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.training import run_record
from pspnet_keras.training.checkpoint import check_state
from pspnet_keras.training.checkpoint import restore_checkpoint
from pspnet_keras.training.checkpoint import write_checkpoint
from pspnet_keras.training.distribute import cluster_spec
from pspnet_keras.training.distribute import is_chief
from pspnet_keras.training.errors import TrainingError
from pspnet_keras.training.loop import Trainer
from pspnet_keras.training.loop import divergence_advice
from pspnet_keras.training.optimizer import CaffeSGD
from pspnet_keras.training.recipe import Settings
from test_train import calibrated_weights  # noqa: F401  (a module fixture of test_train, used here too)
from test_train import run_train
from test_train import write_folders_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A test that something would block on (a FIFO opened for reading) fails after this many seconds.
CROP = "41"
# The record of a run train.py writes in OUT/run.json (recorded_values), for the --resume cases.
RECORD = {
    "dataset": "folders", "init": "pspnet50_ade20k", "crop": 41, "base_size": 64, "batch": 2, "iterations": 2,
    "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0001, "power": 0.9, "aux_weight": 0.4, "head_lr_mult": 10.0,
    "train_bn": False, "seed": 0, "precision": "float32", "classes": 4,
}
SEED_LIMIT = "must be at most 4294967295 (2^32 - 1, the largest seed keras.utils.set_random_seed takes)"
MEMORY_LINE = re.compile(
    r"train\.py: error: a training step on (\d+) crops? of (\d+) px \(--batch (\d+), --crop (\d+), 4 classes\) "
    r"needs at least [\d.]+ GiB of memory; this machine has [\d.]+ GiB free; use a smaller --batch or --crop"
)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    """A folders dataset of 3 training and 1 validation images of 48x48 pixels, 4 classes."""
    return write_folders_dataset(tmp_path_factory.mktemp("hostile"), {"train": 3, "val": 1}, seed=5, size=48)


@pytest.fixture
def no_tensorflow_work(monkeypatch):
    """Fails the test if train.py gets as far as making its distribution strategy (TensorFlow's first work)."""

    def reached(config):
        raise AssertionError("train.py reached TensorFlow")

    monkeypatch.setattr(train, "distribution_strategy", reached)


def refusal(*args):
    """(exit code, the one line on stderr) of train.main(args) in this process; fails on more lines or output."""
    code, stdout, stderr = run_train(*args)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and not stdout, (code, stdout, stderr)
    return code, lines[0]


def make_special(path, kind):
    """Makes `path` a `kind` of thing that is not a regular file: fifo, directory, device, loop."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/null")
    else:
        path.symlink_to(path.name)


SPECIAL_PROBLEMS = {
    "fifo": "is a FIFO, not a regular file",
    "directory": "is a directory, not a file",
    "device": "is a device, not a regular file",
    "loop": "symbolic link loop",
}


def write_description(weights, classes=4):
    """A user model's description beside the file `weights` (a PSPNet-50 of `classes` classes at crop 41)."""
    config = models.ModelConfig("mine", 50, classes, 41, 64, tuple(f"c{i}" for i in range(classes)),
                                tuple((i, i, i) for i in range(classes)))
    models.description_path(weights).write_text(json.dumps(config.description()))


def write_record(out, record=RECORD, text=None):
    """OUT/run.json holding `record` (or the raw `text`); returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    path.write_text(json.dumps(record) if text is None else text)
    return path


# ---------------------------------------------------------------------------------------
# OUT holding files the run did not write; inputs never replaced


@pytest.mark.parametrize("name", ["log.csv", "final.h5", "final.json", "tensorboard"])
def test_a_new_run_refuses_each_file_it_would_write_and_leaves_it(name, dataset_root, tmp_path, no_tensorflow_work):
    out = tmp_path / "out"
    out.mkdir()
    if name == "tensorboard":
        (out / name).mkdir()
        (out / name / "events.out.tfevents.1.host.1.v2").write_bytes(b"an earlier run's events")
    else:
        (out / name).write_bytes(b"the user's own " + name.encode())
    before = folder_snapshot(out)
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--out", out)
    assert (code, line) == (1, f"train.py: error: {out / name}: exists; pass --overwrite to replace it, or choose "
                               "another path")
    assert folder_snapshot(out) == before


@pytest.mark.parametrize("name", ["run.json", "checkpoint.h5"])
def test_a_new_run_in_the_folder_of_a_run_points_to_resume_and_overwrite(name, dataset_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"{}")
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--out", out)
    assert (code, line) == (1, f"train.py: error: {out}: holds a run ({name}); pass --resume to continue it, "
                               "--overwrite to replace it, or choose another --out")
    assert (out / name).read_bytes() == b"{}"


def test_overwrite_accepts_an_earlier_runs_files_and_changes_nothing_before_the_first_iteration(
    dataset_root, tmp_path, no_tensorflow_work
):
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host.1.v2").write_bytes(b"events")
    for name in ("run.json", "checkpoint.h5", "log.csv", "final.h5", "final.json"):
        (out / name).write_bytes(b"earlier " + name.encode())
    before = folder_snapshot(out)
    # The outputs pass; the next check (the batch's memory) stops the run, before any write.
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--batch", 10**9,
                         "--out", out, "--overwrite")
    assert code == 1 and MEMORY_LINE.fullmatch(line), line
    assert folder_snapshot(out) == before


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda out: os.mkfifo(out / "log.csv"), "log.csv: exists and is not a regular file; refusing to replace it"),
        (lambda out: (out / "final.h5").mkdir(), "final.h5: is a directory"),
        (lambda out: (out / "final.json").symlink_to("final.json"), "final.json: symbolic link loop"),
        (lambda out: ((out / "tensorboard").mkdir(), (out / "tensorboard" / "notes.txt").write_text("mine")),
         "tensorboard: holds files that it would lose (notes.txt); refusing to replace it"),
        (lambda out: (out / "tensorboard").write_text("mine"),
         "tensorboard: exists and is not a folder; refusing to replace it"),
    ],
)
def test_overwrite_never_replaces_what_is_not_an_earlier_runs_file(make, problem, dataset_root, tmp_path, hang_guard):
    out = tmp_path / "out"
    out.mkdir()
    make(out)
    before = folder_snapshot(out)
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--out", out,
                         "--overwrite")
    assert (code, line) == (1, f"train.py: error: {out}/{problem}")
    assert folder_snapshot(out) == before


def test_no_output_replaces_the_init_weights_or_their_description_even_with_overwrite(dataset_root, tmp_path):
    out = tmp_path / "runs" / "x"
    out.mkdir(parents=True)
    weights = out / "final.h5"
    weights.write_bytes(b"an earlier run's weights")
    write_description(weights)
    before = folder_snapshot(out)
    for flags in ([], ["--overwrite"]):
        code, line = refusal("--data", dataset_root, "--init", weights, "--out", out, *flags)
        assert (code, line) == (1, f"train.py: error: {weights}: is the --init weights {weights}, which this command "
                                   "reads; it is never replaced"), flags
        assert folder_snapshot(out) == before
    other = tmp_path / "elsewhere.h5"
    other.write_bytes(b"weights")
    write_description(other)
    (out / "final.h5").unlink()
    code, line = refusal("--data", dataset_root, "--init", other, "--out", out, "--overwrite", "--batch", 10**9)
    assert code == 1 and MEMORY_LINE.fullmatch(line), line
    linked = out / "final.h5"
    linked.symlink_to(other)
    code, line = refusal("--data", dataset_root, "--init", other, "--out", out, "--overwrite")
    assert (code, line) == (1, f"train.py: error: {linked}: is the --init weights {other}, which this command "
                               "reads; it is never replaced")
    assert other.read_bytes() == b"weights"


def test_no_output_replaces_a_file_of_the_dataset_even_with_overwrite(tmp_path):
    root = write_folders_dataset(tmp_path / "data", {"train": 2}, seed=1, size=48)
    (root / "log.csv").write_text("the dataset's own log\n")
    before = folder_snapshot(root)
    code, line = refusal("--data", root, "--init", "pspnet50_ade20k", "--crop", CROP, "--out", root, "--overwrite")
    assert (code, line) == (1, f"train.py: error: {root / 'log.csv'}: is a file of the dataset {root / 'log.csv'}, "
                               "which this command reads; it is never replaced")
    assert folder_snapshot(root) == before


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda path: None, "no such folder"),
        (os.mkfifo, "not a folder"),
        (lambda path: path.write_text("a file"), "not a folder"),
        (lambda path: path.symlink_to(path.name), "symbolic link loop"),
    ],
)
def test_data_must_be_a_folder(make, problem, tmp_path, hang_guard, no_tensorflow_work):
    root = tmp_path / "data"
    make(root)
    code, line = refusal("--data", root, "--init", "pspnet50_ade20k", "--out", tmp_path / "out")
    assert (code, line) == (1, f"train.py: error: {root}: {problem}; --data takes a dataset's root folder")


def test_resume_and_overwrite_together_are_a_usage_error(dataset_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data", str(dataset_root), "--out", str(tmp_path), "--resume", "--overwrite"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: --resume continues the run in OUT, --overwrite starts a new one over it: not both"
    )


def test_an_out_on_a_read_only_file_system_is_named_so(dataset_root, tmp_path, monkeypatch):
    statvfs = os.statvfs

    def read_only(path):
        found = statvfs(path)
        return SimpleNamespace(f_flag=found.f_flag | os.ST_RDONLY)

    monkeypatch.setattr(os, "statvfs", read_only)
    # os.access says no, as on a read-only mount (the tests run as root, whom permission bits do not stop)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, line = refusal("--data", dataset_root, "--crop", CROP, "--out", tmp_path / "new" / "out")
    assert (code, line) == (1, f"train.py: error: {tmp_path / 'new' / 'out'}: cannot write in {tmp_path} (read-only "
                               "file system); choose another --out")


# ---------------------------------------------------------------------------------------
# Nothing opens what is not a regular file


@pytest.mark.parametrize("kind", list(SPECIAL_PROBLEMS))
@pytest.mark.parametrize("name", ["checkpoint.h5", "log.csv", "final.h5"])
def test_resume_refuses_a_run_file_that_is_not_a_regular_file(name, kind, dataset_root, tmp_path, hang_guard):
    out = tmp_path / "out"
    write_record(out)
    make_special(out / name, kind)
    code, line = refusal("--data", dataset_root, "--out", out, "--resume")
    assert (code, line) == (1, f"train.py: error: {out / name}: {SPECIAL_PROBLEMS[kind]}")


@pytest.mark.parametrize("kind", list(SPECIAL_PROBLEMS))
def test_resume_refuses_a_run_json_that_is_not_a_regular_file(kind, dataset_root, tmp_path, hang_guard):
    out = tmp_path / "out"
    out.mkdir()
    make_special(out / "run.json", kind)
    code, line = refusal("--data", dataset_root, "--out", out, "--resume")
    assert (code, line) == (1, f"train.py: error: {out / 'run.json'}: {SPECIAL_PROBLEMS[kind]}; there is no run to "
                               f"resume in {out} (start one without --resume)")


def test_resume_refuses_a_tensorboard_that_is_not_a_folder(dataset_root, tmp_path):
    out = tmp_path / "out"
    write_record(out)
    (out / "tensorboard").write_text("mine")
    code, line = refusal("--data", dataset_root, "--out", out, "--resume")
    assert (code, line) == (1, f"train.py: error: {out / 'tensorboard'}: is not a folder; the run's TensorBoard logs "
                               "go there")


@pytest.mark.parametrize("kind", list(SPECIAL_PROBLEMS))
def test_init_weights_and_their_description_must_be_regular_files(kind, dataset_root, tmp_path, hang_guard):
    weights = tmp_path / "weights.h5"
    make_special(weights, kind)
    code, line = refusal("--data", dataset_root, "--init", weights, "--out", tmp_path / "out")
    problem = SPECIAL_PROBLEMS[kind].replace("not a file", "not a weights file")
    assert (code, line) == (1, f"train.py: error: {weights}: {problem}")
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"weights")
    make_special(tmp_path / "mine.json", kind)
    code, line = refusal("--data", dataset_root, "--init", mine, "--out", tmp_path / "out")
    problem = SPECIAL_PROBLEMS[kind].replace("not a file", "not a model description")
    assert (code, line) == (1, f"train.py: error: {tmp_path / 'mine.json'}: {problem} (the description beside the "
                               "--init weights)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# run.json on --resume


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("crop", 100, "100 is not a supported crop size: PSPNet needs 48k - 7 (for example 89 or 137)"),
        ("crop", "41", 'must be an integer, not "41"'),
        ("crop", 41.0, "must be an integer, not 41.0"),
        ("base_size", 0, "must be at least 1, got 0"),
        ("batch", 0, "must be at least 1, got 0"),
        ("batch", True, "must be an integer, not true"),
        ("iterations", -3, "must be at least 1, got -3"),
        ("iterations", None, "must be an integer, not null"),
        ("lr", 0, "must be above 0, got 0"),
        ("lr", -1.5, "must be above 0, got -1.5"),
        ("lr", "0.01", 'must be a number, not "0.01"'),
        ("momentum", 1, "must be below 1, got 1"),
        ("weight_decay", -1e-4, "must be at least 0, got -0.0001"),
        ("power", [0.9], "must be a number, not [0.9]"),
        ("aux_weight", -0.4, "must be at least 0, got -0.4"),
        ("head_lr_mult", 0.0, "must be above 0, got 0.0"),
        ("seed", -1, "must be at least 0, got -1"),
        ("seed", 2**32, f"{SEED_LIMIT}, got 4294967296"),
        ("train_bn", "no", 'must be true or false, not "no"'),
        ("precision", "float64", 'must be one of float32, bfloat16, float16, not "float64"'),
        ("dataset", "coco", 'must be one of ade20k, cityscapes, voc2012, folders, not "coco"'),
        ("init", 5, "must be a released model's name or a weights file's path, not 5"),
        ("init", "", "must be a released model's name or a weights file's path, not \"\""),
        ("classes", 256, "must be an integer 1..255, not 256"),
        ("classes", {"n": 4}, 'must be an integer 1..255, not {"n": 4}'),
    ],
)
def test_every_field_of_run_json_is_checked_as_its_flag(field, value, problem, dataset_root, tmp_path):
    path = write_record(tmp_path / "out", {**RECORD, field: value})
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out", "--resume")
    assert (code, line) == (1, f"train.py: error: {path}: field '{field}' {problem}")


@pytest.mark.parametrize(
    "text, value", [('{"lr": 1e999}', "inf"), ('{"lr": NaN}', "nan"), ('{"lr": -Infinity}', "-inf")]
)
def test_run_json_numbers_beyond_json_are_refused(text, value, dataset_root, tmp_path):
    record = json.dumps({**RECORD, "lr": 0}).replace('"lr": 0', text[1:-1])
    path = write_record(tmp_path / "out", text=record)
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out", "--resume")
    assert (code, line) == (1, f"train.py: error: {path}: field 'lr' must be above 0, got {value}")


def test_a_missing_field_of_run_json_is_named(dataset_root, tmp_path):
    path = write_record(tmp_path / "out", {key: value for key, value in RECORD.items() if key != "seed"})
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out", "--resume")
    assert (code, line) == (1, f"train.py: error: {path}: field 'seed' is missing; not the record of a train.py run")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1, 2]", "not the record of a train.py run (a JSON object is expected)"),
        ('"run"', "not the record of a train.py run (a JSON object is expected)"),
        ("", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
        (b'{"dataset": "\xff"}', "not valid JSON ('utf-8' codec can't decode byte 0xff in position 13"),
        (" " * (2 << 20), "larger than 1024 KiB, too large for the record of a train.py run"),
    ],
)
def test_a_run_json_that_is_no_record_is_one_line(text, problem, dataset_root, tmp_path, no_tensorflow_work):
    out = tmp_path / "out"
    out.mkdir()
    path = out / "run.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, line = refusal("--data", dataset_root, "--out", out, "--resume")
    assert code == 1 and line.startswith(f"train.py: error: {path}: {problem}"), line


def test_a_relative_init_in_run_json_is_taken_from_the_runs_folder(dataset_root, tmp_path, monkeypatch):
    out = tmp_path / "runs" / "mine"
    path = write_record(out, {**RECORD, "init": "../start/model.h5"})
    monkeypatch.chdir(tmp_path)
    code, line = refusal("--data", dataset_root, "--out", "runs/mine", "--resume")
    assert (code, line) == (1, "train.py: error: runs/mine/run.json: field 'init' names runs/mine/../start/model.h5 "
                               "(a relative path in run.json is taken from runs/mine): no such weights file")
    weights = tmp_path / "runs" / "start" / "model.h5"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    write_description(weights)
    # Found, and the same file as --init names from here: the run gets as far as its sizes.
    write_record(out, {**RECORD, "init": "../start/model.h5", "batch": 10**9})
    code, line = refusal("--data", dataset_root, "--out", "runs/mine", "--resume", "--init", "runs/start/model.h5")
    assert code == 1 and MEMORY_LINE.fullmatch(line), line
    assert json.loads(path.read_text())["init"] == "../start/model.h5"


def test_resume_refuses_data_of_other_classes(dataset_root, tmp_path):
    path = write_record(tmp_path / "out", {**RECORD, "classes": 150})
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out", "--resume")
    assert (code, line) == (1, f"train.py: error: {path}: field 'classes' is 150, but --data {dataset_root} has 4 "
                               "classes; resume with the data the run was started on")


def test_a_new_run_records_init_as_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = {**RECORD, "init": "start/model.h5"}
    assert run_record.recorded_values(values, 4)["init"] == str(tmp_path / "start" / "model.h5")
    assert run_record.recorded_values(RECORD, 4)["init"] == "pspnet50_ade20k"


# ---------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture
def tiny_run():
    """(model, optimiser) of a two-variable Keras model with a built CaffeSGD, one step taken."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="conv6")], name="tiny")
    optimizer = CaffeSGD(learning_rate=0.1, momentum=0.9, name="sgd")
    optimizer.apply([tf.ones((3, 2)), tf.ones(2)], model.trainable_variables)
    return model, optimizer


def variable_values(model, optimizer):
    """Copies of the values of every variable of the model and the optimiser."""
    return [variable.numpy().copy() for variable in model.variables + optimizer.variables]


STATE = {"iteration": 1, "position": 2, "seed": 0, "fingerprint": "abc"}


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("iteration", -1, "must be an integer 0..2 (the run's iterations), not -1"),
        ("iteration", 3, "must be an integer 0..2 (the run's iterations), not 3"),
        ("iteration", "1", 'must be an integer 0..2 (the run\'s iterations), not "1"'),
        ("iteration", True, "must be an integer 0..2 (the run's iterations), not true"),
        ("position", 3, "must be 2 (iteration 1 x batch 2), not 3"),
        ("position", None, "must be 2 (iteration 1 x batch 2), not null"),
        ("seed", 7, "must be the run's seed 0, not 7"),
        ("fingerprint", 5, "must be a string, not 5"),
    ],
)
def test_checkpoint_state_fields_are_checked_against_the_run(field, value, problem, tmp_path):
    with pytest.raises(TrainingError) as raised:
        check_state(tmp_path / "checkpoint.h5", {**STATE, field: value}, iterations=2, batch=2, seed=0)
    assert str(raised.value) == f"{tmp_path / 'checkpoint.h5'}: state field '{field}' {problem}"


def rewrite(path, change):
    """Applies change(handle) to the HDF5 file at `path`, opened for writing."""
    with h5py.File(path, "r+") as handle:
        change(handle)


def set_attribute(name, value):
    """A change setting attribute `name` of the file."""
    return lambda handle: handle.attrs.__setitem__(name, value)


def replace_dataset(name, data):
    """A change replacing the dataset `name` with `data`."""

    def change(handle):
        del handle[name]
        handle[name] = data

    return change


@pytest.mark.parametrize(
    "change, problem",
    [
        (set_attribute("format", "something else"), "not a checkpoint of train.py"),
        (set_attribute("format", np.arange(3)), "not a checkpoint of train.py"),
        (set_attribute("state", np.int64(5)), "attribute 'state' is not JSON text; not a checkpoint of train.py"),
        (set_attribute("state", "{"), "attribute 'state' is not valid JSON; not a checkpoint of train.py"),
        (set_attribute("state", "[" * 5_000 + "]" * 5_000),
         "attribute 'state' is not valid JSON; not a checkpoint of train.py"),
        (set_attribute("state", "[1]"), "attribute 'state' is not a JSON object; not a checkpoint of train.py"),
        (set_attribute("state", json.dumps({**STATE, "iteration": 9})),
         "state field 'iteration' must be an integer 0..2 (the run's iterations), not 9"),
        (set_attribute("trained", '["other/kernel"]'),
         "trains other variables than this run (another model or --train-bn)"),
        (replace_dataset("model/tiny/conv6/kernel", np.zeros((2, 3), np.float32)),
         "no value of shape (3, 2) for tiny/conv6/kernel"),
        (replace_dataset("model/tiny/conv6/bias", np.array([b"a", b"b"])),
         "the value of tiny/conv6/bias is not numeric (|S1)"),
        (replace_dataset("model/tiny/conv6/bias", np.array([np.nan, 0], np.float32)),
         "the value of tiny/conv6/bias is not finite"),
        (replace_dataset("optimizer/0", np.zeros(5)), "no value of shape () for sgd/iteration"),
        (lambda handle: handle.__delitem__("optimizer/1"), "optimiser state of another optimiser"),
    ],
)
def test_a_checkpoint_is_checked_before_anything_is_assigned(change, problem, tiny_run, tmp_path):
    model, optimizer = tiny_run
    path = tmp_path / "checkpoint.h5"
    write_checkpoint(path, model, optimizer, STATE)
    rewrite(path, change)
    optimizer.apply([tf.ones((3, 2)), tf.ones(2)], model.trainable_variables)
    before = variable_values(model, optimizer)
    with pytest.raises(TrainingError) as raised:
        restore_checkpoint(path, model, optimizer, check=lambda state: check_state(path, state, 2, 2, 0))
    assert str(raised.value).startswith(f"{path}: {problem}"), str(raised.value)
    for value, after in zip(before, variable_values(model, optimizer)):
        np.testing.assert_array_equal(value, after)


@pytest.mark.parametrize("kind", list(SPECIAL_PROBLEMS))
def test_restoring_a_checkpoint_that_is_not_a_regular_file_is_one_line(kind, tiny_run, tmp_path, hang_guard):
    path = tmp_path / "checkpoint.h5"
    make_special(path, kind)
    with pytest.raises(TrainingError) as raised:
        restore_checkpoint(path, *tiny_run)
    assert str(raised.value) == f"{path}: {SPECIAL_PROBLEMS[kind].replace('not a file', 'not a checkpoint')}"


def test_a_checkpoint_that_is_not_hdf5_is_one_line(tiny_run, tmp_path):
    path = tmp_path / "checkpoint.h5"
    path.write_text("not HDF5\n" * 100)
    with pytest.raises(TrainingError) as raised:
        restore_checkpoint(path, *tiny_run)
    assert str(raised.value).startswith(f"{path}: unreadable checkpoint (Unable to ")
    assert "\n" not in str(raised.value)


def tiny_trainer(model, optimizer, out, iterations=2, **settings):
    """A Trainer of the tiny model, for what needs no strategy, data or network of its own."""
    settings = Settings(iterations=iterations, batch=2, crop_size=41, **settings)
    config = models.ModelConfig("final", 50, 2, 41, 64, ("a", "b"), ((0, 0, 0), (1, 1, 1)))
    return Trainer(None, model, model, optimizer, settings, config, out, samples=[], fingerprint="abc")


def test_resume_refuses_a_checkpoint_whose_optimiser_counted_other_iterations(tiny_run, tmp_path):
    model, optimizer = tiny_run
    write_checkpoint(tmp_path / "checkpoint.h5", model, optimizer, {**STATE, "iteration": 2, "position": 4})
    with pytest.raises(TrainingError) as raised:
        tiny_trainer(model, optimizer, tmp_path).resume()
    assert str(raised.value) == (
        f"{tmp_path / 'checkpoint.h5'}: the optimiser has taken 1 iterations but the state field 'iteration' says 2; "
        "not a checkpoint train.py wrote"
    )
    write_checkpoint(tmp_path / "checkpoint.h5", model, optimizer, STATE)
    assert tiny_trainer(model, optimizer, tmp_path).resume() == 1


# ---------------------------------------------------------------------------------------
# TF_CONFIG

TWO_WORKERS = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": "0"}},
         "field 'task.index' must be an integer 0..1 (cluster.worker lists 2), not \"0\""),
        ({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": 2}},
         "field 'task.index' must be an integer 0..1 (cluster.worker lists 2), not 2"),
        ({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": True}},
         "field 'task.index' must be an integer 0..1 (cluster.worker lists 2), not true"),
        ({"cluster": TWO_WORKERS, "task": {"type": "worker"}},
         "field 'task.index' must be an integer 0..1 (cluster.worker lists 2), not null"),
        ({"cluster": TWO_WORKERS, "task": {"type": "chief", "index": 0}},
         "field 'task.type' must be one of the cluster's task types (worker), not \"chief\""),
        ({"cluster": TWO_WORKERS, "task": "worker"}, "field 'task' must be an object {\"type\": ..., \"index\": ...}, "
                                                     "not \"worker\""),
        ({"cluster": TWO_WORKERS}, "field 'task' is missing (this process's place in the cluster)"),
        ({"task": {"type": "worker", "index": 0}}, "field 'cluster' is missing"),
        ({"cluster": ["127.0.0.1:2222"], "task": {"type": "worker", "index": 0}},
         "field 'cluster' must be an object of task types and their \"host:port\" lists, not [\"127.0.0.1:2222\"]"),
        ({"cluster": {}, "task": {}}, "field 'cluster' must be an object of task types and their \"host:port\" "
                                      "lists, not {}"),
        ({"cluster": {"worker": "127.0.0.1:2222"}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker' must be a non-empty list of \"host:port\" strings, not \"127.0.0.1:2222\""),
        ({"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker' must be a non-empty list of \"host:port\" strings, not []"),
        ({"cluster": {"worker": [2222]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[0]' must be a \"host:port\" string, not 2222"),
        ({"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[0]' must be \"host:port\" with a port 1-65535, not \"localhost\""),
        ({"cluster": {"worker": ["a:0"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[0]' must be \"host:port\" with a port 1-65535, not \"a:0\""),
        ({"cluster": {"worker": ["a:65536"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[0]' must be \"host:port\" with a port 1-65535, not \"a:65536\""),
        ({"cluster": {"worker": [":2222"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[0]' must be \"host:port\" with a port 1-65535, not \":2222\""),
        ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.worker[1]' repeats \"a:1\"; each task needs its own address"),
        ({"cluster": {"chief": ["a:1", "b:1"], "worker": ["c:1"]}, "task": {"type": "worker", "index": 0}},
         "field 'cluster.chief' must list one address (a cluster has one chief), not 2"),
        ({"cluster": {"ps": ["a:1"], "worker": ["c:1"]}, "task": {"type": "ps", "index": 0}},
         "field 'cluster.ps' is not a task type train.py runs (chief or worker)"),
    ],
)
def test_a_tf_config_that_is_no_cluster_is_one_line_naming_the_field(config, problem, dataset_root, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out")
    assert (code, line) == (1, f"train.py: error: TF_CONFIG: {problem}")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{", "not valid JSON (Expecting property name enclosed in double quotes"),
        ("[" * 100_000, "not valid JSON (maximum recursion depth exceeded"),
        ("[1]", "must be a JSON object with 'cluster' and 'task', not [1]"),
        ('"worker"', "must be a JSON object with 'cluster' and 'task', not \"worker\""),
    ],
)
def test_a_tf_config_that_is_not_an_object_is_one_line(text, problem, dataset_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", text)
    code, line = refusal("--data", dataset_root, "--out", tmp_path / "out")
    assert code == 1 and line.startswith(f"train.py: error: TF_CONFIG: {problem}"), line


def test_a_tf_config_cluster_tells_the_chief(monkeypatch):
    for task, chief in ((0, True), (1, False)):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": TWO_WORKERS, "task": {"type": "worker", "index": task}}))
        assert is_chief(cluster_spec()) is chief
    with_chief = {"chief": ["a:1"], "worker": ["b:1"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": with_chief, "task": {"type": "worker", "index": 0}}))
    assert not is_chief(cluster_spec())
    monkeypatch.setenv("TF_CONFIG", "{}")
    assert cluster_spec() == {} and is_chief({})


# ---------------------------------------------------------------------------------------
# Flags beyond what the machine holds: refused at once, before TensorFlow


@pytest.mark.parametrize(
    "flags, share, crop",
    [
        (["--batch", 10**9, "--crop", CROP], 10**9, 41),
        (["--batch", 1, "--crop", 95993], 1, 95993),
        (["--batch", 2, "--crop", 48 * 10**9 - 7], 2, 48 * 10**9 - 7),
    ],
)
def test_a_batch_beyond_the_memory_is_refused_at_once(flags, share, crop, dataset_root, tmp_path, no_tensorflow_work):
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", *flags, "--out", tmp_path / "out")
    found = MEMORY_LINE.fullmatch(line)
    assert code == 1 and found, line
    assert found.groups() == (str(share), str(crop), str(share), str(crop))
    assert not (tmp_path / "out").exists()


def test_a_workers_share_of_the_batch_is_what_it_allocates(monkeypatch):
    settings = Settings(iterations=10, batch=8, crop_size=473)
    sizes = []
    monkeypatch.setattr(runtime, "allocation_problem", lambda size, what: sizes.append(size))
    train.check_sizes(settings, 150, workers=1)
    train.check_sizes(settings, 150, workers=3)
    assert sizes == [8 * 473 * 473 * (12 + 1 + 8 * 150), 3 * 473 * 473 * (12 + 1 + 8 * 150)]


def test_iterations_whose_samples_overflow_the_data_order_are_refused(dataset_root, tmp_path, no_tensorflow_work):
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--batch", 16,
                         "--iterations", 2**60, "--out", tmp_path / "out")
    assert (code, line) == (1, f"train.py: error: --iterations {2**60} x --batch 16 = {2**64} samples, more than the "
                               "data order counts (9223372036854775807); use fewer iterations")


@pytest.mark.parametrize("seed", [str(2**32), str(10**30)])
def test_a_seed_beyond_what_keras_takes_is_a_usage_error(seed, dataset_root, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--data", str(dataset_root), "--seed", seed])
    assert stopped.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"train.py: error: argument --seed: {SEED_LIMIT}, got {seed}"
    assert run_record.seed_value(str(2**32 - 1)) == 2**32 - 1


# ---------------------------------------------------------------------------------------
# Nothing half-done


def unlabel(root, split):
    """Sets every label of a split of a folders dataset to unlabelled (255)."""
    for path in (root / "labels" / split).iterdir():
        with Image.open(path) as label:
            size = label.size
        Image.fromarray(np.full(size[::-1], 255, np.uint8)).save(path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_whose_labels_are_all_unlabelled_is_refused_before_training(split, tmp_path):
    root = write_folders_dataset(tmp_path / "data", {"train": 2, "val": 1}, seed=2, size=48)
    unlabel(root, split)
    out = tmp_path / "out"
    code, line = refusal("--data", root, "--init", "pspnet50_ade20k", "--crop", CROP, "--val-every", 1, "--out", out,
                         "-q")
    count = 2 if split == "train" else 1
    assert (code, line) == (1, f"train.py: error: nothing to learn from the {split} split: no pixel of its {count} "
                               f"labels holds a class of the dataset (every value is unlabelled, 255); check the "
                               f"labels under {root}")
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# Messages


def test_messages_of_the_library_name_init_instead_of_w(tmp_path, monkeypatch):
    config = models.RELEASED_MODELS["pspnet50_ade20k"]
    missing = tmp_path / "weights" / "pspnet50_ade20k.h5"
    advice = download.weights_help(config, missing)
    assert "with -w)" in advice

    def failed(model, config, path, show_progress):
        raise download.WeightsNotFound(f"cannot download the weights of {config.name}: offline. {advice}")

    monkeypatch.setattr(download, "default_weights_path", lambda name: missing)
    monkeypatch.setattr(download, "download_weights", failed)
    monkeypatch.setattr("layers_builder.build_pspnet", lambda config, crop, initialized: None)
    with pytest.raises(train.cli.CommandError) as raised:
        train.init_weights_path(config, None, quiet=True)
    message = str(raised.value)
    assert "(or pass its path with --init)" in message and not re.search(r"(?<![\w-])-w\b", message)
    assert train.in_train_terms("use -w x.h5; my-w.h5 and --weights-w stay") == "use --init x.h5; my-w.h5 and " \
                                                                                 "--weights-w stay"


@pytest.mark.parametrize(
    "changes, advice",
    [
        ({}, "try a lower --lr than 0.01"),
        ({"aux_weight": 50.0}, "try a lower --lr than 0.01, or values nearer the recipe's for --aux-weight 50 "
                               "(the recipe's is 0.4)"),
        ({"lr": 1.0, "aux_weight": 50.0, "head_lr_mult": 100.0},
         "try a lower --lr than 1 (the recipe's is 0.01), or values nearer the recipe's for --head-lr-mult 100 "
         "(the recipe's is 10), --aux-weight 50 (the recipe's is 0.4)"),
        ({"momentum": 0.99, "weight_decay": 0.1}, "try a lower --lr than 0.01, or values nearer the recipe's for "
                                                   "--momentum 0.99 (the recipe's is 0.9), --weight-decay 0.1 (the "
                                                   "recipe's is 0.0001)"),
    ],
)
def test_a_diverging_run_names_the_recipe_values_away_from_the_papers(changes, advice):
    assert divergence_advice(Settings(iterations=10, batch=2, crop_size=41, **changes)) == advice


@pytest.mark.parametrize(
    "checkpointed, iteration, resume, has_checkpoint, message",
    [
        (3, 3, False, True, "stopped at iteration 3; checkpoint in {out}/checkpoint.h5 (--resume continues)"),
        (2, 3, True, True, "stopped at iteration 3; checkpoint of iteration 2 in {out}/checkpoint.h5 (--resume "
                           "continues)"),
        (0, 2, False, False, "stopped at iteration 2, before any checkpoint: there is none in {out} (--resume "
                             "starts the run again from its first iteration)"),
        (0, 0, True, False, "stopped at iteration 0, before any checkpoint: there is none in {out} (--resume "
                            "starts the run again from its first iteration)"),
        (None, 0, True, True, "stopped before the first iteration; {out}/checkpoint.h5 is as it was (--resume "
                              "continues)"),
        (None, 0, False, False, "stopped before the first iteration; this run wrote nothing in {out}"),
        (0, 0, False, False, "stopped before the first iteration; this run wrote nothing in {out}"),
    ],
)
def test_an_interrupted_run_says_what_it_left_to_resume(checkpointed, iteration, resume, has_checkpoint, message,
                                                        tmp_path):
    if has_checkpoint:
        (tmp_path / "checkpoint.h5").write_bytes(b"")
    trainer = SimpleNamespace(checkpointed=checkpointed, iteration=iteration)
    assert train.stop_message(trainer, tmp_path, resume) == message.format(out=tmp_path)


@pytest.mark.parametrize("error", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_file_system_when_writing_a_checkpoint_is_named_so(error, tiny_run, tmp_path, monkeypatch):
    model, optimizer = tiny_run

    def fail(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(utils.tempfile, "mkstemp", fail)
    trainer = tiny_trainer(model, optimizer, tmp_path)
    trainer.checkpointed = 0
    with pytest.raises(TrainingError) as raised:
        trainer.checkpoint()
    assert str(raised.value) == (
        f"{tmp_path / 'checkpoint.h5'}: cannot write ({os.strerror(error)}); training stopped at iteration 1 "
        "(no checkpoint)"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_file_size_limit_when_writing_the_log_is_one_line(tmp_path):
    from pspnet_keras.training.run_log import RunLog

    row = {"iteration": 1, "loss": 1.0, "main_loss": 1.0, "aux_loss": 1.0, "lr": 0.01, "images_per_s": 2.0,
           "val_miou": None}
    with pytest.raises(TrainingError) as raised, RunLog(tmp_path, 0) as log:
        log.write(row)
        written = (tmp_path / "log.csv").read_bytes()
        with file_size_limit(len(written)):
            log.write({**row, "iteration": 2, "loss": 0.5})
    assert str(raised.value) == f"{tmp_path / 'log.csv'}: cannot write (File too large)"
    assert (tmp_path / "log.csv").read_bytes() == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["log.csv", "tensorboard"]


@pytest.fixture
def wide_run():
    """(model, optimiser) of a Keras model of 256 KiB of weights, a built CaffeSGD."""
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(256, name="conv6")], name="wide")
    optimizer = CaffeSGD(learning_rate=0.1, momentum=0.9, name="sgd")
    optimizer.apply([tf.ones((256, 256)), tf.ones(256)], model.trainable_variables)
    return model, optimizer


def test_the_file_size_limit_when_writing_a_checkpoint_is_one_line_and_leaves_no_temporary_file(
    wide_run, tmp_path
):
    model, optimizer = wide_run
    trainer = tiny_trainer(model, optimizer, tmp_path)
    trainer.checkpointed = 0
    with pytest.raises(TrainingError) as raised, file_size_limit(64 * 1024):
        trainer.checkpoint()
    assert str(raised.value) == (
        f"{tmp_path / 'checkpoint.h5'}: cannot write (File too large); training stopped at iteration 1 (no checkpoint)"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_file_size_limit_when_writing_the_final_model_is_one_line_and_writes_neither_file(
    wide_run, tmp_path
):
    model, optimizer = wide_run
    trainer = tiny_trainer(model, optimizer, tmp_path)
    trainer.checkpointed = 1
    with pytest.raises(TrainingError) as raised, file_size_limit(64 * 1024):
        trainer.write_final()
    assert str(raised.value) == (
        f"{tmp_path / 'final.h5'}: cannot write (File too large); training stopped at iteration 1 (the last "
        "checkpoint is at iteration 1)"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# End to end, with a network


def limited_train(size, *args):
    """`python train.py *args` with the size of the files it writes capped at `size` (RLIMIT_FSIZE,
    SIGXFSZ ignored); returns the CompletedProcess."""

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *map(str, args)],
        capture_output=True, text=True, preexec_fn=cap, timeout=600,
    )


@pytest.mark.slow
def test_train_py_under_a_file_size_limit_stops_at_the_checkpoint_with_one_line(
    dataset_root, calibrated_weights, tmp_path  # noqa: F811
):
    out = tmp_path / "out"
    finished = limited_train(8 << 20, "--data", dataset_root, "--init", calibrated_weights, "--crop", CROP, "--batch",
                             1, "--iterations", 1, "--lr", "1e-4", "--out", out, "-q")
    assert finished.returncode == 1, finished.stderr
    assert finished.stderr.strip().splitlines() == [
        f"train.py: error: {out / 'checkpoint.h5'}: cannot write (File too large); training stopped at iteration 1 "
        "(no checkpoint)"
    ]
    assert sorted(path.name for path in out.iterdir()) == ["log.csv", "run.json", "tensorboard"]


@pytest.mark.slow
def test_a_run_that_fails_before_its_first_iteration_leaves_out_as_it_was(dataset_root, tmp_path):
    weights = tmp_path / "mine.h5"
    weights.write_bytes(b"not HDF5")
    write_description(weights)
    out = tmp_path / "out"
    code, line = refusal("--data", dataset_root, "--init", weights, "--crop", CROP, "--batch", 1, "--out", out, "-q")
    assert code == 1 and line.startswith(f"train.py: error: {weights}: not a readable HDF5 weights file ("), line
    assert not out.exists()
    # The corrected command is not refused for a run that never was.
    code, line = refusal("--data", dataset_root, "--init", "pspnet50_ade20k", "--crop", CROP, "--batch", 10**9,
                         "--out", out)
    assert code == 1 and MEMORY_LINE.fullmatch(line), line
