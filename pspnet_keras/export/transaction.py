"""`export`: the files written in a staging folder beside their target, checked, and renamed into place together,
or nothing left; what was there before is removed only once the new files are in its place."""

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import utils
from pspnet_keras import models
from pspnet_keras.export.formats import DEFAULT_OPSET
from pspnet_keras.export.runtimes import check_export
from pspnet_keras.export.writers import write_file

# The signals that stop a command (cli.run_command turns both into KeyboardInterrupt).
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# The subfolder of the staging folder that takes what the export replaces, until the new files are in place.
PREVIOUS = "previous"
# The staging folder is named .<the first STAGING_NAME_PART characters of the target's name>.<random>.tmp, so
# that a name as long as the file system allows (NAME_MAX) still leaves room for it.
STAGING_NAME_PART = 64


class PreviousKept(utils.OutputError):
    """A swap that could neither be finished nor undone: the files it replaced are kept where the message says."""


@contextlib.contextmanager
def signals_deferred():
    """Runs the block to its end when SIGINT or SIGTERM arrives, and delivers the first such signal after it;
    the block sees the list of the signals received so far.

    Python runs a signal's handler in the main thread between bytecodes (docs of the
    `signal` module), whichever thread received it, so the handlers are swapped for
    one that records the signal; it is raised again (signal.raise_signal) once the
    usual handlers are back. Outside the main thread, where handlers cannot be set,
    the block runs as it is.
    """
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {
        signum: signal.signal(signum, lambda number, frame: received.append(number)) for signum in STOPPING_SIGNALS
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


def rename(source, destination, done):
    """Renames `source` to `destination` and records the pair in the list `done`."""
    os.rename(source, destination)
    done.append((source, destination))


def undo(done, target, previous, reason):
    """Renames back, last first, each (source, destination) of `done`, after a swap at `target` that stopped
    for `reason`; PreviousKept when one cannot be."""
    for source, destination in reversed(done):
        try:
            os.rename(destination, source)
        except OSError as error:
            raise PreviousKept(
                f"{target}: {reason}, nor put back what the export replaced ({error.strerror or error}); "
                f"it is kept in {previous}"
            ) from None


def swap_in(staged_targets, previous):
    """Renames each (staged path, target) of `staged_targets` onto its target, a file or a folder, moving an
    existing target into the folder `previous` first.

    On an OSError every rename is undone and utils.OutputError says why. Ctrl-C and
    SIGTERM wait for the end of the swap (signals_deferred), which is then undone too,
    so that an interrupted export leaves what was there before.
    """
    done = []
    with signals_deferred() as received:
        try:
            for index, (staged, target) in enumerate(staged_targets):
                if os.path.lexists(target):
                    previous.mkdir(exist_ok=True)
                    rename(target, previous / str(index), done)
                rename(staged, target, done)
        except OSError as error:
            reason = f"cannot write ({error.strerror or error})"
            undo(done, target, previous, reason)
            raise utils.OutputError(f"{target}: {reason}") from None
        if received:
            undo(done, target, previous, "interrupted")


def write_description(config, path, target):
    """Writes the model's JSON description at `path`; utils.OutputError naming `target`, where it goes, when the
    disk refuses."""
    try:
        utils.json_writer(config.description())(path)
    except OSError as error:
        raise utils.OutputError(f"{target}: cannot write ({error.strerror or error})") from None


def make_folders(folder):
    """Creates `folder` and its missing parents; returns those it created, deepest first. When one cannot be
    created, those created are removed and the OSError raised."""
    missing = []
    folder = Path(folder)
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    created = []
    try:
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            created.insert(0, folder)
    except OSError:
        remove_empty_folders(created)
        raise
    return created


def remove_empty_folders(folders):
    """Removes each of `folders` that is empty, in order (deepest first); never anything that holds a file."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def holds_anything(folder):
    """Whether `folder` exists and holds a file or a folder."""
    if not os.path.isdir(folder):
        return False
    with os.scandir(folder) as entries:
        return any(entries)


def clean_up(staging, created, swapped):
    """Removes the staging folder `staging` (when there is one) and all it holds, the new files that failed or
    the ones replaced, unless it keeps what a failed swap could not put back; and, unless the export was
    `swapped` into place, the folders `created` for it. Ctrl-C and SIGTERM wait for the end (signals_deferred)."""
    with signals_deferred():
        if staging is not None and (swapped or not holds_anything(staging / PREVIOUS)):
            shutil.rmtree(staging, ignore_errors=True)
        if not swapped:
            remove_empty_folders(created)


def export(network, config, file_format, path, opset=DEFAULT_OPSET, description=False, before_commit=None):
    """Writes `network` in `file_format` at `path`, checked; returns (delta, argmax agreement).

    The file (a folder for a SavedModel) is written and checked (runtimes.check_export)
    in a staging folder beside `path`; with `description`, the model's JSON description
    (models.description_path) is written there too. Only when the check passes are
    they renamed into place, together (before_commit(), when given, is called just before
    and may raise to stop it); what they replace is removed after that.
    Otherwise the staging folder, and the folders created for `path`, are removed and what
    was at `path` is left as it was:
    ExportError says why the file failed, OSError or utils.OutputError why the disk
    refused (PreviousKept, which keeps the staging folder, when the replaced files
    could not be put back).
    """
    target = Path(path)
    created = []
    staging = None
    swapped = False
    try:
        created = make_folders(target.parent)
        prefix = f".{target.name[:STAGING_NAME_PART]}."
        staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
        staged_targets = [(staging / target.name, target)]
        write_file(network, config, file_format, staged_targets[0][0], opset)
        result = check_export(network, config, file_format, staged_targets[0][0])
        if description:
            json_path = models.description_path(target)
            staged_targets.append((staging / json_path.name, json_path))
            write_description(config, staged_targets[-1][0], json_path)
        if before_commit is not None:
            before_commit()
        swap_in(staged_targets, staging / PREVIOUS)
        swapped = True
        return result
    finally:
        clean_up(staging, created, swapped)
