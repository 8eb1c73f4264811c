"""export.py under hostile and careless input: every case ends in one line and an exit status, never a
traceback or a hang, and nothing the user had is lost.

Covered, each class with several cases:
- outputs that would replace what the user has: an existing file or SavedModel folder (refused without
  --overwrite); a folder holding the weights, their description or files a SavedModel is not made of
  (refused even with it); -o naming the weights or their description, by a relative path, a symbolic or
  a hard link, or the released model's default weights file (refused even with it);
- the description written beside the export: another model's is replaced only with --overwrite, the
  model's own (the one read beside -w, by any link) is left as it is;
- -o that names no file (empty, '.', '..', '/', a trailing '/'), or a FIFO, a device, a folder, a file
  where the SavedModel folder goes;
- -w that is not a regular file: a FIFO, a device, a symbolic-link loop, a dangling link, a folder, an
  empty path, nothing at all;
- the swap of the new export for the old: a rename failing at each step, a swap that cannot be undone
  either, Ctrl-C and SIGTERM during the write, the swap and the clean-up;
- write failures: the file-size limit (RLIMIT_FSIZE) and a full disk in every format, TensorFlow's
  errors told by their errno, a read-only file system named as such.

The refusals run export.main in this process on small stand-in files (nothing is read before them);
the swap runs it with a stand-in network, writer and check (`fake_export`). Real writes run export.py
in a child process and are marked slow: under RLIMIT_FSIZE, on a full or read-only tmpfs of its own
mount namespace (unshare -m, skipped where it cannot be made), stopped by a signal, and the one real
export over an older SavedModel, shared by the tests that look at it.
"""

import errno
import glob
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import tensorflow as tf

import export
from helpers import folder_snapshot
from pspnet_keras import download
from pspnet_keras import models
from pspnet_keras.export import transaction
from pspnet_keras.export import writers
from pspnet_keras.export.formats import ExportError
from test_export import EXPORT
from test_export import USER_DESCRIPTION
from test_export import listing
from test_export import only_error_line
from test_export import released_h5  # noqa: F401  (a module fixture of test_export, used here too)
from test_export import run_export
from test_export import run_main
from test_export import user_h5  # noqa: F401

# A test that something would block on (a FIFO opened for reading) fails after this many seconds.
HANG_SECONDS = 60
OVERWRITE = "--overwrite"
# Another model's description, where the export's would go.
OTHER_DESCRIPTION = json.dumps(dict(USER_DESCRIPTION, crop_size=137)).encode()
NEW_EXPORT = b"the new export"
# The user model's description as the export writes it beside the file.
WRITTEN_DESCRIPTION = (json.dumps(USER_DESCRIPTION, indent=2) + "\n").encode()
# What an older SavedModel folder holds (every entry a SavedModel is made of), and an older file export.
OLD_SAVED_MODEL = {
    "saved_model.pb": b"old graph", "fingerprint.pb": b"old fingerprint", "keras_metadata.pb": b"old metadata",
    "variables/variables.index": b"old index", "variables/variables.data-00000-of-00001": b"old data",
    "assets/vocabulary.txt": b"old asset", "debug/saved_model_debug_info.pb": b"old debug information",
}
OLD_FILE = b"the old export"
OUTPUTS = {"saved_model": "sm", "keras": "m.keras", "onnx": "m.onnx", "litert": "m.tflite"}
# The file-size limit of the write failures: the description and the staging folder fit, no export does.
FILE_SIZE_LIMIT = 1 << 20
RESULT_LINE = (
    "export.py: wrote {} ({}); opened in {}, its logits on a random crop differ from the Keras network's by at "
    "most 0.0e+00 of the logit range, argmax agrees on 100.000% of the pixels\n"
)


# ---------------------------------------------------------------------------------------
# Helpers and fixtures


def write_files(folder, files):
    """Writes {relative path: bytes} under `folder`; returns the folder."""
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def stand_in_model(folder, name="final.h5"):
    """<folder>/<name>, a stand-in for weights, with the user model's description beside it: enough for every
    check that runs before the weights are read."""
    weights = Path(folder) / name
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"the user's weights")
    models.description_path(weights).write_text(json.dumps(USER_DESCRIPTION))
    return weights


def old_exports(folder, file_format):
    """An older export in `folder`/out (a SavedModel folder of every entry one is made of, or a file) and
    another model's description beside it; returns the export's path."""
    path = folder / "out" / OUTPUTS[file_format]
    if file_format == "saved_model":
        write_files(path, OLD_SAVED_MODEL)
    else:
        write_files(path.parent, {path.name: OLD_FILE})
    models.description_path(path).write_bytes(OTHER_DESCRIPTION)
    return path


def stand_in_writer(file_format):
    """A writer that writes NEW_EXPORT at the path: a file, or for saved_model a SavedModel folder of it."""

    def write(network, config, path, opset):
        if file_format == "saved_model":
            write_files(Path(path), {"saved_model.pb": NEW_EXPORT, "variables/variables.index": NEW_EXPORT})
        else:
            Path(path).write_bytes(NEW_EXPORT)

    return write


@pytest.fixture
def fake_export(monkeypatch):
    """export.main without a network: no weights are loaded, every writer writes NEW_EXPORT, the check passes."""
    monkeypatch.setattr(export, "load_network", lambda config, weights, show_progress: SimpleNamespace(model=None))
    for file_format in OUTPUTS:
        monkeypatch.setitem(writers.WRITERS, file_format, stand_in_writer(file_format))
    monkeypatch.setattr(transaction, "check_export", lambda network, config, file_format, path: (0.0, 1.0))


def interrupting(signum, action, first=False):
    """`action` followed (preceded when `first`) by the signal `signum` sent to this process, as a user's Ctrl-C
    or kill would come."""

    def interrupt(*args, **kwargs):
        if first:
            signal.raise_signal(signum)
        result = action(*args, **kwargs)
        if not first:
            signal.raise_signal(signum)
        return result

    return interrupt


def failing_renames(monkeypatch, failing_calls, code=errno.ENOSPC):
    """Makes the os.rename calls numbered `failing_calls` (from 1) fail with OSError `code`; the others rename."""
    calls = []
    rename = os.rename

    def counted(source, destination):
        calls.append((source, destination))
        if len(calls) in failing_calls:
            raise OSError(code, os.strerror(code))
        rename(source, destination)

    monkeypatch.setattr(os, "rename", counted)


def limit_file_size():
    """In the child: files larger than FILE_SIZE_LIMIT cannot be written (EFBIG rather than SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# The shell of run_on_own_tmpfs: a 2 MiB tmpfs at $1 holding a copy of $2, remounted with the options $3,
# then the command; "unchanged" on stdout when the tmpfs still holds what $2 holds.
OWN_TMPFS_SCRIPT = (
    'disk=$1 seed=$2 options=$3; shift 3; '
    'mount -t tmpfs -o size=2m tmpfs "$disk" && cp -a "$seed/." "$disk" && mount -o "remount,$options" "$disk" '
    '|| exit 99; "$@"; code=$?; diff -r "$seed" "$disk" >&2 && echo unchanged; exit $code'
)


def run_on_own_tmpfs(disk, seed, options, *args):
    """Runs export.py *args where `disk` is a tmpfs of its own mount namespace; see OWN_TMPFS_SCRIPT."""
    command = ["unshare", "-m", "sh", "-c", OWN_TMPFS_SCRIPT, "sh", disk, seed, options, sys.executable, EXPORT]
    return subprocess.run([*map(str, command), *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def own_tmpfs(tmp_path_factory):
    """Skips a test where this process cannot mount a tmpfs in a mount namespace of its own (not root)."""
    folder = tmp_path_factory.mktemp("mount_point")
    try:
        made = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder}"], capture_output=True
        )
    except OSError:
        made = None
    if made is None or made.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a mount namespace of its own (unshare -m)")


def stopped(args, staging_glob, signum):
    """export.py *args sent `signum` a second after its staging folder (`staging_glob`) appears."""
    child = subprocess.Popen(
        [sys.executable, str(EXPORT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not glob.glob(staging_glob) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=300)
    return SimpleNamespace(returncode=child.returncode, stdout=stdout, stderr=stderr)


# ---------------------------------------------------------------------------------------
# Outputs that would replace what the user has


@pytest.mark.parametrize("overwrite", [[], [OVERWRITE]])
@pytest.mark.parametrize(
    "weights, output, problem",
    [
        ("sm/final.h5", "sm", "holds the weights file {}/sm/final.h5, which this command reads; it is never replaced"),
        ("a/b/final.h5", "a", "holds the weights file {}/a/b/final.h5, which this command reads; it is never replaced"),
    ],
)
def test_saved_model_folder_holding_the_weights_is_never_replaced(tmp_path, weights, output, problem, overwrite):
    stand_in_model(tmp_path, weights)
    write_files(tmp_path / output, {"README": b"the user's notes", "saved_model.pb": b"old graph"})
    before = folder_snapshot(tmp_path)
    result = run_main("-w", tmp_path / weights, "--format", "saved_model", "-o", tmp_path / output, *overwrite)
    assert result.code == 1
    assert only_error_line(result.stderr) == f"export.py: error: {tmp_path / output}: {problem.format(tmp_path)}"
    assert folder_snapshot(tmp_path) == before


def test_saved_model_folder_around_the_working_directory_weights_is_never_replaced(tmp_path, monkeypatch):
    stand_in_model(tmp_path / "sm")
    monkeypatch.chdir(tmp_path / "sm")
    before = folder_snapshot(tmp_path)
    result = run_main("-w", "final.h5", "--format", "saved_model", "-o", "../sm", OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        "export.py: error: ../sm: holds the weights file final.h5, which this command reads; it is never replaced"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "files, shown",
    [
        ({"README": b"notes"}, "README"),
        ({"assets.extra/tf_serving_warmup_requests": b"warm-up"}, "assets.extra"),
        ({"variables/notes.txt": b"notes"}, "variables/notes.txt"),
        ({"variables/old/variables.index": b"index"}, "variables/old"),
        ({"debug/trace.txt": b"trace"}, "debug/trace.txt"),
        ({f"run{index}.log": b"log" for index in range(5)}, "run0.log, run1.log, run2.log and 2 more"),
    ],
)
def test_folder_holding_what_a_saved_model_is_not_made_of_is_never_replaced(tmp_path, files, shown):
    weights = stand_in_model(tmp_path)
    write_files(tmp_path / "sm", {**OLD_SAVED_MODEL, **files})
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "saved_model", "-o", tmp_path / "sm", OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / 'sm'}: holds files that it would lose ({shown}); refusing to replace it"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "file_format, old",
    [("saved_model", "sm"), ("saved_model", "empty"), ("onnx", "m.onnx"), ("keras", "m.keras"), ("onnx", "dangling")],
)
def test_existing_export_is_replaced_only_with_overwrite(tmp_path, fake_export, file_format, old):
    weights = stand_in_model(tmp_path / "model")
    write_files(tmp_path / "sm", OLD_SAVED_MODEL)
    (tmp_path / "empty").mkdir()
    write_files(tmp_path, {"m.onnx": OLD_FILE, "m.keras": OLD_FILE})
    (tmp_path / "dangling").symlink_to("nowhere")
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", file_format, "-o", tmp_path / old)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / old}: exists; pass --overwrite to replace it, or choose another path"
    )
    assert folder_snapshot(tmp_path) == before
    replaced = run_main("-w", weights, "--format", file_format, "-o", tmp_path / old, OVERWRITE)
    assert replaced.code == 0, replaced.stderr
    if file_format == "saved_model":
        written = {old: "folder", f"{old}/saved_model.pb": NEW_EXPORT, f"{old}/variables": "folder",
                   f"{old}/variables/variables.index": NEW_EXPORT}
    else:
        written = {old: NEW_EXPORT}
    kept = {name: value for name, value in before.items() if name != old and not name.startswith(old + "/")}
    assert folder_snapshot(tmp_path) == {**kept, **written, f"{Path(old).stem}.json": WRITTEN_DESCRIPTION}


WEIGHTS_AS_OUTPUT = ["final{}", "./final{}", "{tmp}/final{}", "symbolic{}", "hard{}", "sub/../final{}"]
DESCRIPTION_AS_OUTPUT = ["final.json", "./symbolic.json", "hard.json", "sub/../final.json"]


@pytest.mark.parametrize(
    "file_format, output, what",
    [("onnx", output, "the weights file") for output in WEIGHTS_AS_OUTPUT]
    + [("keras", output, "the weights file") for output in WEIGHTS_AS_OUTPUT]
    + [("onnx", output, "the model's description") for output in DESCRIPTION_AS_OUTPUT]
    + [("litert", "{tmp}/hard.json", "the model's description")],
)
def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, monkeypatch, file_format, output, what):
    suffix = ".keras" if file_format == "keras" else ".h5"
    weights = stand_in_model(tmp_path, f"final{suffix}")
    for name, target in ((f"symbolic{suffix}", weights.name), ("symbolic.json", "final.json")):
        (tmp_path / name).symlink_to(target)
    os.link(weights, tmp_path / f"hard{suffix}")
    os.link(tmp_path / "final.json", tmp_path / "hard.json")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    output = output.format(suffix, tmp=tmp_path)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights.name, "--format", file_format, "-o", output, OVERWRITE)
    assert result.code == 1
    read = weights.name if what == "the weights file" else "final.json"
    assert only_error_line(result.stderr) == (
        f"export.py: error: {Path(output)}: is {what} {read}, which this command reads; it is never replaced"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("file_format, output", [("onnx", "weights/pspnet50_ade20k.h5"), ("saved_model", "weights")])
def test_released_models_default_weights_are_never_replaced(tmp_path, monkeypatch, file_format, output):
    monkeypatch.setattr(download, "WEIGHTS_DIR", tmp_path / "weights")
    write_files(tmp_path, {"weights/pspnet50_ade20k.h5": b"the released weights"})
    before = folder_snapshot(tmp_path)
    result = run_main("-m", "pspnet50_ade20k", "--format", file_format, "-o", tmp_path / output, OVERWRITE)
    assert result.code == 1
    weights = tmp_path / "weights" / "pspnet50_ade20k.h5"
    problem = "is" if file_format == "onnx" else "holds"
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / output}: {problem} the weights file {weights}, which this command reads; "
        "it is never replaced"
    )
    assert folder_snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------
# The description written beside the export


@pytest.mark.parametrize("file_format", ["keras", "saved_model"])
def test_another_models_description_beside_the_export_needs_overwrite(tmp_path, file_format):
    weights = stand_in_model(tmp_path / "a")
    path = tmp_path / "b" / OUTPUTS[file_format]
    write_files(tmp_path / "b", {models.description_path(path).name: OTHER_DESCRIPTION})
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", file_format, "-o", path)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {models.description_path(path)} (the model's description, written beside the export): "
        "exists; pass --overwrite to replace it, or choose another path"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("kind, problem", [("fifo", "exists and is not a regular file; refusing to replace it"),
                                           ("folder", "is a directory")])
def test_description_place_that_is_not_a_file_is_never_replaced(tmp_path, kind, problem):
    weights = stand_in_model(tmp_path / "a")
    json_path = tmp_path / "b" / "m.json"
    json_path.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(json_path)
    else:
        json_path.mkdir()
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "onnx", "-o", tmp_path / "b" / "m.onnx", OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {json_path} (the model's description, written beside the export): {problem}"
    )
    assert folder_snapshot(tmp_path) == before


def test_another_models_description_is_replaced_with_overwrite(tmp_path, fake_export):
    weights = stand_in_model(tmp_path / "a")
    path = old_exports(tmp_path, "keras")
    result = run_main("-w", weights, "--format", "keras", "-o", path, OVERWRITE)
    assert result.code == 0, result.stderr
    assert result.stdout == RESULT_LINE.format(f"{path} and {path.with_suffix('.json')}", "keras", "Keras")
    assert path.read_bytes() == NEW_EXPORT
    assert json.loads(path.with_suffix(".json").read_text()) == USER_DESCRIPTION
    assert listing(tmp_path / "out") == ["m.json", "m.keras"]


@pytest.mark.parametrize("link", ["same", "symbolic", "hard"])
def test_models_own_description_beside_the_export_is_left_as_it_is(tmp_path, fake_export, link):
    weights = stand_in_model(tmp_path)
    path = tmp_path / ("final.onnx" if link == "same" else "b/final.onnx")
    if link != "same":
        path.parent.mkdir()
        if link == "symbolic":
            path.with_suffix(".json").symlink_to(tmp_path / "final.json")
        else:
            os.link(tmp_path / "final.json", path.with_suffix(".json"))
    identity = os.stat(tmp_path / "final.json").st_ino
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "onnx", "-o", path, OVERWRITE)
    assert result.code == 0, result.stderr
    assert result.stdout == RESULT_LINE.format(path, "onnx opset 17", "ONNX Runtime")
    assert path.read_bytes() == NEW_EXPORT
    assert folder_snapshot(tmp_path) == {**before, str(path.relative_to(tmp_path)): NEW_EXPORT}
    assert os.stat(tmp_path / "final.json").st_ino == identity


# ---------------------------------------------------------------------------------------
# -o and -w that are not what they should be


@pytest.mark.parametrize(
    "file_format, output, problem",
    [
        ("onnx", "", "-o: the output path is empty"),
        ("saved_model", ".", ".: names no file or folder to write; name the export itself"),
        ("saved_model", "..", "..: names no file or folder to write; name the export itself"),
        ("saved_model", "/", "/: names no file or folder to write; name the export itself"),
        ("onnx", "sub/..", "sub/..: names no file or folder to write; name the export itself"),
        ("onnx", "exports/", "exports/: names a folder; name the file to write, such as exports/final.onnx"),
        ("litert", "sub/", "sub/: names a folder; name the file to write, such as sub/final.tflite"),
        ("onnx", "sub", "sub: is a directory"),
        ("onnx", "fifo", "fifo: exists and is not a regular file; refusing to replace it"),
        ("onnx", "device", "device: exists and is not a regular file; refusing to replace it"),
        ("saved_model", "fifo", "fifo: exists and is not a regular file; refusing to replace it"),
        ("saved_model", "file", "file: exists and is not a folder; refusing to replace it"),
        ("saved_model", "link", "link: exists and is not a folder; refusing to replace it"),
        ("onnx", "file/m.onnx", "file/m.onnx: cannot create the output directory ({}/file is not a directory)"),
    ],
)
def test_output_that_cannot_be_an_export_is_refused(tmp_path, monkeypatch, file_format, output, problem):
    weights = stand_in_model(tmp_path)
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"the user's file")
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "device").symlink_to(os.devnull)
    monkeypatch.chdir(tmp_path)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", file_format, "-o", output, OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == f"export.py: error: {problem.format(tmp_path)}"
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "weights, problem",
    [
        ("/dev/null", "is a device, not a regular file"),
        ("loop.h5", "symbolic link loop"),
        ("dangling.h5", "dangling symbolic link"),
        ("folder.h5", "is a directory, not a weights file"),
        ("absent.h5", "no such weights file"),
        ("", None),
    ],
)
def test_weights_that_are_not_a_regular_file_are_named(tmp_path, monkeypatch, weights, problem):
    (tmp_path / "loop.h5").symlink_to("loop.h5")
    (tmp_path / "dangling.h5").symlink_to("absent.h5")
    (tmp_path / "folder.h5").mkdir()
    monkeypatch.chdir(tmp_path)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "onnx", "-o", "m.onnx")
    assert result.code == 1
    expected = f"{weights}: {problem}" if problem else "-w: the weights path is empty"
    assert only_error_line(result.stderr) == f"export.py: error: {expected}"
    assert folder_snapshot(tmp_path) == before


def test_weights_that_are_a_fifo_are_named_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "final.h5")
    (tmp_path / "final.json").write_text(json.dumps(USER_DESCRIPTION))
    result = subprocess.run(
        [sys.executable, str(EXPORT), "-w", "final.h5", "--format", "onnx"],
        capture_output=True, text=True, cwd=tmp_path, timeout=HANG_SECONDS,
    )
    assert result.returncode == 1
    assert only_error_line(result.stderr) == "export.py: error: final.h5: is a FIFO, not a regular file"
    assert listing(tmp_path) == ["final.h5", "final.json"]


@pytest.mark.parametrize(
    "file_format, output, named",
    [
        ("saved_model", "s" * 256, "{}: "),
        ("onnx", "o" * 252 + ".onnx", "{}: "),
        ("saved_model", "s" * 251, "{}.json (the model's description, written beside the export): "),
    ],
)
def test_name_longer_than_the_file_system_takes_is_refused_before_any_work(tmp_path, monkeypatch, file_format,
                                                                           output, named):
    weights = stand_in_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", file_format, "-o", output)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {named.format(Path(output).stem if '.json' in named else output)}cannot write (File "
        "name too long)"
    )
    assert folder_snapshot(tmp_path) == before


def test_longest_name_the_file_system_takes_is_written(tmp_path, monkeypatch, fake_export):
    weights = stand_in_model(tmp_path / "model")
    name = "o" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".onnx")) + ".onnx"
    result = run_main("-w", weights, "--format", "onnx", "-o", tmp_path / name, OVERWRITE)
    assert result.code == 0, result.stderr
    assert (tmp_path / name).read_bytes() == NEW_EXPORT
    assert sorted(os.listdir(tmp_path)) == sorted(["model", name, name.replace(".onnx", ".json")])


# ---------------------------------------------------------------------------------------
# The swap: the old export stays unless the new one is wholly in its place


@pytest.mark.parametrize("failing_call, failing_target", [(1, "sm"), (2, "sm"), (3, "sm.json"), (4, "sm.json")])
def test_rename_failing_at_any_step_of_the_swap_leaves_the_old_export(
    tmp_path, monkeypatch, fake_export, failing_call, failing_target
):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "saved_model")
    before = folder_snapshot(tmp_path)
    failing_renames(monkeypatch, {failing_call})
    result = run_main("-w", weights, "--format", "saved_model", "-o", path, OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {path.parent / failing_target}: cannot write (No space left on device); "
        "nothing was written"
    )
    assert folder_snapshot(tmp_path) == before


def test_swap_that_cannot_be_undone_keeps_the_old_export_and_names_where(tmp_path, monkeypatch, fake_export):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "onnx")
    failing_renames(monkeypatch, {2, 3})
    result = run_main("-w", weights, "--format", "onnx", "-o", path, OVERWRITE)
    assert result.code == 1
    (staging,) = glob.glob(str(path.parent / ".m.onnx.*.tmp"))
    assert only_error_line(result.stderr) == (
        f"export.py: error: {path}: cannot write (No space left on device), nor put back what the export "
        f"replaced (No space left on device); it is kept in {staging}/previous"
    )
    assert (Path(staging) / "previous" / "0").read_bytes() == OLD_FILE
    assert path.with_suffix(".json").read_bytes() == OTHER_DESCRIPTION


@pytest.mark.parametrize("signum, code, reason", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("file_format", ["saved_model", "onnx"])
def test_signal_during_the_write_leaves_the_old_export(tmp_path, monkeypatch, fake_export, file_format, signum, code,
                                                       reason):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, file_format)
    monkeypatch.setitem(writers.WRITERS, file_format, interrupting(signum, stand_in_writer(file_format)))
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", file_format, "-o", path, OVERWRITE)
    assert (result.code, result.stderr, result.stdout) == (code, f"export.py: {reason}\n", "")
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_swap_waits_for_it_and_undoes_it(tmp_path, monkeypatch, fake_export, signum, code):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "saved_model")
    before = folder_snapshot(tmp_path)
    monkeypatch.setattr(os, "rename", interrupting(signum, os.rename))
    result = run_main("-w", weights, "--format", "saved_model", "-o", path, OVERWRITE)
    assert result.code == code
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("output", ["old", "new/deeper/sm"])
def test_signal_during_the_clean_up_of_a_failed_export_waits_for_it(tmp_path, monkeypatch, fake_export, output):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "saved_model") if output == "old" else tmp_path / output

    def failing_check(network, config, file_format, path):
        raise ExportError("opened in TensorFlow, its logits differ")

    monkeypatch.setattr(transaction, "check_export", failing_check)
    rmtree = interrupting(signal.SIGINT, transaction.shutil.rmtree, first=True)
    monkeypatch.setattr(transaction.shutil, "rmtree", rmtree)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "saved_model", "-o", path, OVERWRITE)
    assert (result.code, result.stderr) == (130, "export.py: interrupted\n")
    assert folder_snapshot(tmp_path) == before


def test_signal_once_the_new_export_is_in_place_leaves_it_whole(tmp_path, monkeypatch, fake_export):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "saved_model")
    rmtree = interrupting(signal.SIGTERM, transaction.shutil.rmtree, first=True)
    monkeypatch.setattr(transaction.shutil, "rmtree", rmtree)
    result = run_main("-w", weights, "--format", "saved_model", "-o", path, OVERWRITE)
    assert (result.code, result.stderr) == (143, "export.py: terminated\n")
    assert folder_snapshot(tmp_path / "out") == {
        "sm": "folder", "sm.json": WRITTEN_DESCRIPTION,
        "sm/saved_model.pb": NEW_EXPORT, "sm/variables": "folder", "sm/variables/variables.index": NEW_EXPORT,
    }


# export.main with a stand-in network, writer and check (as fake_export), its stdout a pipe nobody reads.
CLOSED_STDOUT_PROGRAM = """
import os, sys
from pathlib import Path
from types import SimpleNamespace
import export
from pspnet_keras.export import transaction, writers
export.load_network = lambda config, weights, show_progress: SimpleNamespace(model=None)
writers.WRITERS["onnx"] = lambda network, config, path, opset: Path(path).write_bytes(b"the new export")
transaction.check_export = lambda network, config, file_format, path: (0.0, 1.0)
read_end, write_end = os.pipe()
os.close(read_end)
os.dup2(write_end, 1)
sys.exit(export.main(sys.argv[1:]))
"""


def test_reader_of_the_result_line_gone_leaves_the_export_done(tmp_path):
    weights = stand_in_model(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", CLOSED_STDOUT_PROGRAM, "-w", weights, "--format", "onnx", "-o", tmp_path / "m.onnx"],
        capture_output=True, text=True, cwd=EXPORT.parent, timeout=HANG_SECONDS,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert (tmp_path / "m.onnx").read_bytes() == NEW_EXPORT
    assert listing(tmp_path) == ["final.h5", "final.json", "m.json", "m.onnx"]


# ---------------------------------------------------------------------------------------
# Write failures


@pytest.mark.parametrize("code", [errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_write_failure_is_one_line_and_leaves_the_old_export(tmp_path, monkeypatch, fake_export, code):
    weights = stand_in_model(tmp_path)
    path = old_exports(tmp_path, "saved_model")

    def failing_writer(network, config, staged, opset):
        write_files(Path(staged), {"variables/variables.index": b"half"})
        raise OSError(code, os.strerror(code))

    monkeypatch.setitem(writers.WRITERS, "saved_model", failing_writer)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "saved_model", "-o", path, OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {path}: cannot write ({os.strerror(code)}); nothing was written"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize("output", ["new/deeper/m.onnx", "kept/new/m.onnx"])
def test_folders_made_for_a_failed_export_are_removed(tmp_path, monkeypatch, fake_export, output):
    weights = stand_in_model(tmp_path)
    write_files(tmp_path, {"kept/notes.txt": b"the user's notes"})

    def failing_writer(network, config, staged, opset):
        Path(staged).write_bytes(b"half")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setitem(writers.WRITERS, "onnx", failing_writer)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "onnx", "-o", tmp_path / output)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / output}: cannot write (File too large); nothing was written"
    )
    assert folder_snapshot(tmp_path) == before


def test_description_write_failure_names_the_description(tmp_path, monkeypatch, fake_export):
    weights = stand_in_model(tmp_path / "a")
    path = old_exports(tmp_path, "keras")

    def full_disk(data):
        def write(temporary):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write

    monkeypatch.setattr(transaction.utils, "json_writer", full_disk)
    before = folder_snapshot(tmp_path)
    result = run_main("-w", weights, "--format", "keras", "-o", path, OVERWRITE)
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {path.with_suffix('.json')}: cannot write (No space left on device); nothing was written"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "error, found",
    [
        (tf.errors.OutOfRangeError(None, None, "{{function_node SaveV2}} /x/part-00000.tempstate1; File too large "
                                               "[Op:SaveV2]"), errno.EFBIG),
        (tf.errors.ResourceExhaustedError(None, None, "/x/saved_model.pb; No space left on device"), errno.ENOSPC),
        (tf.errors.FailedPreconditionError(None, None, "/x/variables; Read-only file system"), errno.EROFS),
        (tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [1,2] vs. [1,3]"), None),
        (ValueError("the converter failed"), None),
    ],
)
def test_tensorflows_disk_errors_are_told_by_their_errno(error, found):
    assert getattr(writers.disk_error(error), "errno", None) == found
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("ConverterError: the conversion failed") from cause
    except RuntimeError as converter_error:
        assert getattr(writers.disk_error(converter_error), "errno", None) == found


@pytest.mark.slow
@pytest.mark.parametrize("file_format", ["saved_model", "keras", "litert"])
def test_file_size_limit_in_every_format_leaves_the_old_export(tmp_path, user_h5, file_format):  # noqa: F811
    path = old_exports(tmp_path, file_format)
    before = folder_snapshot(tmp_path)
    result = subprocess.run(
        [sys.executable, str(EXPORT), "-w", str(user_h5), "--format", file_format, "-o", str(path), OVERWRITE],
        capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size,
    )
    assert result.returncode == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {path}: cannot write (File too large); nothing was written"
    )
    assert folder_snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("file_format", ["litert"])
def test_full_disk_leaves_the_old_export(tmp_path, own_tmpfs, user_h5, file_format):  # noqa: F811
    seed = tmp_path / "seed"
    path = old_exports(seed, file_format).relative_to(seed)
    disk = tmp_path / "disk"
    disk.mkdir()
    result = run_on_own_tmpfs(disk, seed, "rw", "-w", user_h5, "--format", file_format, "-o", disk / path, OVERWRITE)
    assert result.returncode == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {disk / path}: cannot write (No space left on device); nothing was written"
    )
    assert result.stdout == "unchanged\n"


@pytest.mark.parametrize("output, folder", [("sub/m.onnx", ""), ("out/m.onnx", "out")])
def test_read_only_file_system_is_named(tmp_path, own_tmpfs, output, folder):
    seed = tmp_path / "seed"
    old_exports(seed, "onnx")
    weights = stand_in_model(tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    result = run_on_own_tmpfs(disk, seed, "ro", "-w", weights, "--format", "onnx", "-o", disk / output, OVERWRITE)
    assert result.returncode == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {disk / output}: cannot write in {disk / folder} (read-only file system)"
    )
    assert result.stdout == "unchanged\n"


def test_folder_without_write_permission_is_named(tmp_path, monkeypatch):
    """A folder this process may not write in (os.access says no: the tests run as root, whom permission
    bits do not stop)."""
    weights = stand_in_model(tmp_path)
    (tmp_path / "locked").mkdir(mode=0o555)
    locked = os.fspath(tmp_path / "locked")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != locked and access(path, mode))
    result = run_main("-w", weights, "--format", "onnx", "-o", tmp_path / "locked" / "m.onnx")
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / 'locked' / 'm.onnx'}: cannot write in {tmp_path / 'locked'} (permission denied)"
    )
    assert listing(tmp_path) == ["final.h5", "final.json", "locked"]


# ---------------------------------------------------------------------------------------
# Real exports stopped by a signal, and one real export over an older SavedModel


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, reason", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_during_a_real_export_leaves_the_old_export(tmp_path, user_h5, signum, code, reason):  # noqa: F811
    path = old_exports(tmp_path, "saved_model")
    before = folder_snapshot(tmp_path)
    result = stopped(
        ["-w", user_h5, "--format", "saved_model", "-o", path, OVERWRITE], str(path.parent / ".sm.*.tmp"), signum
    )
    assert (result.returncode, result.stderr, result.stdout) == (code, f"export.py: {reason}\n", "")
    assert folder_snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def replaced_saved_model(tmp_path_factory, user_h5):  # noqa: F811
    """(the CompletedProcess, the output path) of a real export --overwrite over an older SavedModel folder and
    another model's description beside it."""
    path = old_exports(tmp_path_factory.mktemp("replaced"), "saved_model")
    return run_export("-w", user_h5, "--format", "saved_model", "-o", path, OVERWRITE), path


@pytest.mark.slow
def test_real_export_replaces_the_whole_older_saved_model_and_description(replaced_saved_model):
    result, path = replaced_saved_model
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"export.py: wrote {path} and {path.with_suffix('.json')} (saved_model); ")
    assert listing(path.parent) == [
        "sm", "sm.json", "sm/assets", "sm/fingerprint.pb", "sm/saved_model.pb", "sm/variables",
        "sm/variables/variables.data-00000-of-00001", "sm/variables/variables.index",
    ]
    assert json.loads(path.with_suffix(".json").read_text()) == USER_DESCRIPTION
    assert set(tf.saved_model.load(str(path)).signatures) == {"segment", "logits", "serving_default"}


@pytest.mark.slow
def test_real_export_is_not_replaced_without_overwrite(replaced_saved_model, user_h5):  # noqa: F811
    result, path = replaced_saved_model
    assert result.returncode == 0, result.stderr
    before = folder_snapshot(path.parent)
    again = run_main("-w", user_h5, "--format", "saved_model", "-o", path)
    assert again.code == 1
    assert only_error_line(again.stderr) == (
        f"export.py: error: {path}: exists; pass --overwrite to replace it, or choose another path"
    )
    assert folder_snapshot(path.parent) == before
