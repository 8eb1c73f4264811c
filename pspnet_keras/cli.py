"""What every command line of the project shares: exit codes, errors, signals, options.

Each command (pspnet.py, evaluate.py, train.py, export.py, weight_converter.py)
parses its arguments with `ArgumentParser`, which accepts every long option with
'-' or '_' between its words, and runs its work through `run_command`, which
turns a `CommandError` into one line on stderr and SIGTERM into the same
clean-up as Ctrl-C. The option groups that several commands take (the model's
-m/-w, Ray's) are here, with the checks of the paths a command writes to.

This module imports nothing heavy, so that a command parses its line and refuses
bad input before TensorFlow loads.
"""

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import utils
from pspnet_keras import models
from pspnet_keras import runtime

# Exit codes of every command of the project.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
# 128 + SIGPIPE, as a shell reports a program that wrote to a pipe whose reader went away.
EXIT_BROKEN_PIPE = 141

# The --ray value without an address: an embedded Ray on this machine (ray.init(address="local")).
RAY_LOCAL = "local"
# The longest JSON value a message shows (shown_value).
SHOWN_CHARACTERS = 40
# The option that lets a command replace an existing output (cli.output_problem).
OVERWRITE_FLAG = "--overwrite"


class CommandError(Exception):
    """A command that cannot be carried out; the message is one line saying why."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that cleanup runs as for Ctrl-C."""


def stop_on_termination():
    """Makes SIGTERM raise Terminated and Ctrl-C KeyboardInterrupt in the main thread, so that a command's
    work cleans up and exits with EXIT_TERMINATED or EXIT_INTERRUPTED (until then, startup.py's handlers
    end the process at once)."""

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stdout_to_devnull():
    """Points stdout at /dev/null after its reader went away, so that Python's flush at exit does not
    fail again (Python's docs, signal module, "Note on SIGPIPE")."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def interruption_exit_code(error):
    """The exit code of a command stopped by Ctrl-C (130) or SIGTERM (143)."""
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


def run_command(prog, run, args, error_prefix="error: ", interrupted_suffix=""):
    """The exit status of a command line whose work is run(args).

    SIGTERM stops the work as Ctrl-C does, a file-size limit is an error of the write that meets it
    (SIGXFSZ ignored); the handlers of the three signals are put back afterwards. A reader of stdout
    that went away (`pspnet.py -g ... | head -1`) stops the work quietly, as SIGPIPE stops other
    programs: EXIT_BROKEN_PIPE. A CommandError prints one line
    `PROG: error: message` on stderr (EXIT_FAILURE); Ctrl-C or SIGTERM prints
    `PROG: interrupted` or `PROG: terminated` (EXIT_INTERRUPTED, EXIT_TERMINATED).
    """
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ)}
    stop_on_termination()
    # A write beyond the file-size limit (ulimit -f) then fails with EFBIG, which the command reports as one
    # line and cleans up after, instead of SIGXFSZ killing the process (setrlimit(2), RLIMIT_FSIZE).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        return run(args)
    except CommandError as error:
        print(f"{prog}: {error_prefix}{error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as error:
        reason = "terminated" if isinstance(error, Terminated) else "interrupted"
        print(f"{prog}: {reason}{interrupted_suffix}", file=sys.stderr)
        return interruption_exit_code(error)
    except BrokenPipeError:
        stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def exit_process(code):
    """Ends the process with status `code` once stdout and stderr are flushed, without tearing down
    the interpreter (os._exit): freeing the modules of TensorFlow, JAX or PyTorch took 0.7-1.8 s after
    a command's outputs were written (bench/README.md, "Time to first result"). A process that
    started Ray, whose session ends in an exit handler (ray.shutdown), exits the usual way."""
    if "ray" in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class _SpellingRecorder:
    """An argument group that records the long options added to it in its parser's spelling table."""

    def __init__(self, group, spellings):
        self.group = group
        self.spellings = spellings

    def add_argument(self, *flags, **options):
        """The group's add_argument, recording each long option."""
        action = self.group.add_argument(*flags, **options)
        for flag in action.option_strings:
            if flag.startswith("--"):
                self.spellings.setdefault(flag.replace("_", "-"), flag)
        return action

    def add_mutually_exclusive_group(self, **options):
        """The group's add_mutually_exclusive_group, recording as this group does."""
        return _SpellingRecorder(self.group.add_mutually_exclusive_group(**options), self.spellings)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser that also takes every long option with '-' or '_' between its words.

    --input-path is read as a declared --input_path, --save_probs as --save-probs;
    --help shows the declared spelling. Arguments after '--' are left alone.
    """

    def __init__(self, *args, **kwargs):
        self.spellings = None
        super().__init__(*args, **kwargs)
        self.spellings = {"--help": "--help"}

    def add_argument(self, *flags, **options):
        if self.spellings is None:
            return super().add_argument(*flags, **options)
        return _SpellingRecorder(super(), self.spellings).add_argument(*flags, **options)

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        return group if self.spellings is None else _SpellingRecorder(group, self.spellings)

    def add_mutually_exclusive_group(self, **kwargs):
        return _SpellingRecorder(super().add_mutually_exclusive_group(**kwargs), self.spellings)

    def declared_spelling(self, argument):
        """`argument` ('--flag' or '--flag=value') with its flag spelt as declared."""
        flag, equals, value = argument.partition("=")
        if flag.startswith("--") and flag not in self.spellings.values():
            flag = self.spellings.get(flag.replace("_", "-"), flag)
        return flag + equals + value

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        spelt = [self.declared_spelling(argument) for argument in args[:end]] + args[end:]
        return super().parse_known_args(spelt, namespace)


def shown_value(value):
    """A JSON value read from a file or the environment as a message shows it, cut to SHOWN_CHARACTERS."""
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARACTERS else text[: SHOWN_CHARACTERS - 3] + "..."


def integer(minimum):
    """argparse type: an integer of at least `minimum`."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


positive_int = integer(1)


def number(minimum, below=None, strictly=False):
    """argparse type: a finite number >= minimum (> if `strictly`), and < `below` when given."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strictly and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'above' if strictly else 'at least'} {minimum:g}, got {text}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below:g}, got {text}")
        return value

    return parse


def model_list():
    """The released models, one phrase each, for --help."""
    return "; ".join(
        f"{config.name} (ResNet-{config.depth}, {config.classes} {config.dataset} classes, "
        f"{config.crop_size} px crops)"
        for config in models.RELEASED_MODELS.values()
    )


def add_model_arguments(parser):
    """The -m and -w options of the commands that run a model (pspnet.py, evaluate.py, export.py)."""
    parser.add_argument(
        "-m", "--model", choices=models.RELEASED_MODEL_NAMES, metavar="MODEL",
        help=f"a released model: {model_list()} (default: {models.DEFAULT_MODEL}, or the model "
             "described beside the -w file)",
    )
    parser.add_argument(
        "-w", "--weights", metavar="H5",
        help="Keras-2 HDF5 weights file (default: weights/keras/<model>.h5 next to pspnet.py, "
             "downloaded when missing), or a .keras archive written by export.py --format keras; "
             "with <stem>.json beside it, that user model",
    )


def add_backend_argument(parser):
    """The --backend option of the commands that run on every Keras backend (pspnet.py, evaluate.py)."""
    parser.add_argument(
        "--backend", choices=runtime.BACKENDS,
        help="the Keras backend to run on, set before Keras starts (default: the KERAS_BACKEND variable, "
             "else the 'backend' of ~/.keras/keras.json, else tensorflow); jax and torch need "
             "requirements-jax.txt or requirements-torch.txt installed",
    )


def add_cache_argument(parser):
    """The --no-cache option of the commands that compile the network (pspnet.py, evaluate.py)."""
    parser.add_argument(
        "--no-cache", action="store_true",
        help="neither read nor keep compiled networks in the cache (on JAX: PSPNET_CACHE_DIR, default "
             "~/.cache/pspnet-keras; PSPNET_NO_CACHE=1 does the same); a cached network gives the same results",
    )


def check_backend(parser, tensorflow_only=None):
    """Exits with one line and status 2 when Keras cannot start on the backend chosen for the command:
    one not supported or not installed, or, for a command that runs on TensorFlow only, any other
    (`tensorflow_only` says why it needs TensorFlow)."""
    problem = runtime.backend_problem()
    name = runtime.backend_name()
    if problem is None and tensorflow_only and name != "tensorflow":
        problem = (
            f"{parser.prog} runs on TensorFlow only ({tensorflow_only}), but the Keras backend is {name} "
            f"(from {runtime.backend_source()}): set {runtime.KERAS_BACKEND_VARIABLE}=tensorflow"
        )
    if problem:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {problem}\n")


def protocol(args):
    """The evaluation protocol of a command line's -s, -ms and --flip: {"sliding", "flip", "multi_scale"},
    the keyword arguments of PSPNet.predict and PSPNet.class_map."""
    return {"sliding": args.sliding, "flip": args.flip, "multi_scale": args.multi_scale}


def add_ray_arguments(parser):
    """The options of a run on Ray (pspnet_keras/ray_pool.py), shared by pspnet.py and evaluate.py."""
    parser.add_argument(
        "--ray", nargs="?", const=RAY_LOCAL, metavar="ADDRESS",
        help="share the images out to workers on Ray, each loading the model once (needs python -m pip "
             "install -r requirements-ray.txt): without ADDRESS an embedded Ray on this machine, one worker "
             "per GPU or CPU workers sized to the cores; 'auto' or HOST:PORT joins a running cluster "
             "(ray start), whose machines see the project, the weights, the images and the outputs at the "
             "same paths",
    )
    parser.add_argument(
        "--workers", type=positive_int, metavar="N",
        help="with --ray: the number of workers (default: one per GPU, or one per 4 cores without GPU)",
    )
    parser.add_argument(
        "--gpus-per-worker", type=number(0), metavar="G",
        help="with --ray: each worker's GPUs; 0.5 puts two workers on a GPU (default: 1 where the "
             "cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--cpus-per-worker", type=positive_int, metavar="C",
        help="with --ray: each worker's CPUs, its TensorFlow threads (default: the cores shared out "
             "among the workers)",
    )


def check_ray_arguments(parser, args):
    """Refuses the options of a run on Ray without --ray (exit status 2)."""
    if args.ray is None:
        for flag in ("workers", "gpus_per_worker", "cpus_per_worker"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag.replace('_', '-')} needs --ray")


def existing_ancestor(path):
    """The nearest of `path` and its parents that exists."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def directory_problem(directory, what="the output directory"):
    """Why `directory` cannot be created or written in, or None: its nearest existing ancestor must be
    a directory this process may write in."""
    existing = existing_ancestor(directory)
    if not existing.is_dir():
        return f"cannot create {what} ({existing} is not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing} ({'read-only file system' if is_read_only(existing) else 'permission denied'})"
    return None


def is_read_only(path):
    """Whether `path` lies on a file system mounted read-only (statvfs(3) ST_RDONLY)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def file_identity(path):
    """(device, inode) of an existing file, None otherwise: two paths of one identity are one file."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def is_within(path, folder):
    """Whether `path`, resolved, is `folder` (resolved) or lies under it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class Inputs:
    """The files a command reads, which none of its outputs may replace, even with --overwrite.

    A file is found by its resolved path (symbolic links) and, when it exists, by its
    identity (hard links). Every existing file under a folder added with add_folder
    (a dataset root, say) is an input too.
    """

    def __init__(self, files=None):
        self.by_path = {}
        self.by_identity = {}
        self.folders = []
        for path, what in (files or {}).items():
            self.add(path, what)

    def add(self, path, what):
        """Adds the file at `path`; `what` names it in messages ("the weights file")."""
        self.by_path.setdefault(os.path.realpath(path), (path, what))
        key = file_identity(path)
        if key is not None:
            self.by_identity.setdefault(key, (path, what))

    def add_folder(self, folder, what):
        """Makes every existing file under `folder` an input; `what` names such a file ("a file of the dataset")."""
        self.folders.append((folder, what))

    def find(self, target):
        """The (path, what it is) of the input that writing `target` would replace, or None."""
        found = self.by_path.get(os.path.realpath(target))
        key = file_identity(target)
        if found is None and key is not None:
            found = self.by_identity.get(key)
        if found is None and os.path.lexists(target):
            found = next(((target, what) for folder, what in self.folders if is_within(target, folder)), None)
        return found

    def inside(self, directory):
        """The (path, what it is) of an input that lies in `directory` or under it, or None."""
        for path, what in list(self.by_path.values()):
            if os.path.lexists(path) and is_within(path, directory):
                return path, what
        for folder, what in self.folders:
            if is_within(folder, directory) and not is_empty_folder(folder):
                return folder, what
        return None


def is_empty_folder(folder):
    """Whether `folder` is a folder holding nothing (False where it cannot be read)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def output_problem(target, inputs=None, overwrite=False):
    """Why a command may not write the file `target`, or None: the rule of every output of the project.

    An input of the command (`inputs`, an Inputs) is never replaced, even with
    `overwrite`; nor is a directory, a device, a FIFO or a socket; an existing file is
    replaced only with `overwrite` (the command's --overwrite).
    """
    found = inputs.find(target) if inputs is not None else None
    if found is not None:
        return f"is {found[1]} {found[0]}, which this command reads; it is never replaced"
    problem = utils.file_problem(target, replace=True)
    if problem:
        return problem
    if not overwrite and os.path.lexists(target):
        return f"exists; pass {OVERWRITE_FLAG} to replace it, or choose another path"
    return None


def folder_output_problem(folder, own_entries, inputs=None, overwrite=False):
    """Why a command may not write the folder `folder` whole (a SavedModel, say), or None.

    A missing folder may be written. An existing one is replaced only with
    `overwrite`, only when it holds nothing but `own_entries` (the names such a folder
    is made of) and no input of the command.
    """
    if not os.path.lexists(folder):
        return None
    if not os.path.isdir(folder) or os.path.islink(folder):
        return output_problem(folder, inputs, overwrite=True) or "exists and is not a folder; refusing to replace it"
    found = inputs.inside(folder) if inputs is not None else None
    if found is not None:
        return f"holds {found[1]} {found[0]}, which this command reads; it is never replaced"
    try:
        foreign = sorted(name for name in os.listdir(folder) if name not in own_entries)
    except OSError as error:
        return f"cannot read ({error.strerror or error})"
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds files that it would lose ({shown}); refusing to replace it"
    if not overwrite:
        return f"exists; pass {OVERWRITE_FLAG} to replace it, or choose another path"
    return None


def add_overwrite_argument(parser, what):
    """The --overwrite option of a command; `what` says what it lets the command replace."""
    parser.add_argument(
        OVERWRITE_FLAG, action="store_true",
        help=f"replace {what} when it exists (never a file the command reads)",
    )
