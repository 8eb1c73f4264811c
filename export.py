"""Exports a PSPNet for deployment: a Keras archive, a TF Serving SavedModel, ONNX or LiteRT.

    python export.py -m pspnet50_ade20k --format onnx -o exports/pspnet50_ade20k.onnx
    python export.py -w runs/mine/final.h5 --format saved_model -o exports/mine

The command line of pspnet_keras/export/, whose docstring says what each format holds:
the options, the checks of the weights, of the output paths (cli.output_problem and
cli.folder_output_problem: the files the command reads are never replaced, an existing
export only with --overwrite) and of the packages the format needs, then
pspnet_keras.export.transaction.export. After writing, the file is opened in the
runtime it is made for (Keras, TensorFlow, ONNX Runtime, the LiteRT interpreter) and
its logits on a random crop are compared with the Keras network's; a file that
disagrees is removed, and what was at the output path is left as it was. A user
model's JSON description (models.py) is written beside its export, same stem, `.json`.

TensorFlow is imported only after the command line and its files are checked.
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import importlib.util
import os
import re
import sys
from pathlib import Path

import utils
from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.download import default_weights_path
from pspnet_keras.export.formats import DEFAULT_OPSET
from pspnet_keras.export.formats import DEPENDENCIES
from pspnet_keras.export.formats import FORMATS
from pspnet_keras.export.formats import ONNX_OPSETS
from pspnet_keras.export.formats import SAVED_MODEL_ENTRIES
from pspnet_keras.export.formats import SAVED_MODEL_SUBFOLDER_NAMES
from pspnet_keras.export.formats import ExportError
from pspnet_keras.export.runtimes import MAX_RELATIVE_DELTA
from pspnet_keras.export.runtimes import MIN_ARGMAX_AGREEMENT
from pspnet_keras.export.runtimes import RUNTIME_NAMES
from pspnet_keras.segmenter import load_network

PROG = "export.py"
PROJECT_DIR = Path(__file__).resolve().parent
EXPORT_REQUIREMENTS = PROJECT_DIR / "requirements-export.txt"
# Default output name of each format: <model><suffix> in the working directory.
DEFAULT_SUFFIXES = {"keras": ".keras", "saved_model": "_saved_model", "onnx": ".onnx", "litert": ".tflite"}


def output_path(args, config):
    """The -o path, or <model><suffix of the format> in the working directory."""
    if args.output_path == "":
        raise cli.CommandError("-o: the output path is empty")
    path = Path(args.output_path or f"{config.name}{DEFAULT_SUFFIXES[args.format]}")
    if path.name in ("", ".", ".."):
        raise cli.CommandError(f"{args.output_path}: names no file or folder to write; name the export itself")
    if args.format != "saved_model" and args.output_path and args.output_path.endswith(os.sep):
        raise cli.CommandError(
            f"{args.output_path}: names a folder; name the file to write, such as "
            f"{path / (config.name + DEFAULT_SUFFIXES[args.format])}"
        )
    return path


def command_inputs(weights, config):
    """The files the command reads, which no export replaces (cli.Inputs): the weights file (a released
    model's default one without -w) and the JSON beside it, the user model's description or the 2017 port's
    Keras-2 config."""
    weights = weights if weights is not None else default_weights_path(config.name)
    inputs = cli.Inputs({weights: "the weights file"})
    json_path = models.description_path(weights)
    if os.path.lexists(json_path):
        inputs.add(json_path, "the JSON beside the weights file" if config.released else "the model's description")
    return inputs


def name_problem(path):
    """Why nothing can be made at `path`, which is not there (its name longer than the file system takes, say),
    or None."""
    return None if os.path.lexists(path) else utils.file_problem(path, replace=True)


def saved_model_leftovers_problem(folder):
    """Why the SavedModel folder `folder` may not be replaced for what its subfolders hold, or None: files that
    are not a SavedModel's (formats.SAVED_MODEL_SUBFOLDER_NAMES) would be lost with it."""
    foreign = []
    for name, pattern in SAVED_MODEL_SUBFOLDER_NAMES.items():
        subfolder = os.path.join(folder, name)
        if os.path.isdir(subfolder) and not os.path.islink(subfolder):
            try:
                entries = sorted(os.listdir(subfolder))
            except OSError as error:
                return f"cannot read {subfolder} ({error.strerror or error})"
            foreign += [f"{name}/{entry}" for entry in entries if not re.fullmatch(pattern, entry)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds files that it would lose ({shown}); refusing to replace it"
    return None


def export_problem(path, file_format, inputs, overwrite):
    """Why the export may not be written at `path`, or None (cli.output_problem; for a SavedModel,
    cli.folder_output_problem and what its subfolders hold, before the question of --overwrite)."""
    if file_format == "keras" and path.suffix != models.KERAS_ARCHIVE_SUFFIX:
        return f"a Keras archive's name must end in {models.KERAS_ARCHIVE_SUFFIX} (keras.saving.load_model goes by it)"
    if file_format == "saved_model":
        return (
            name_problem(path)
            or cli.folder_output_problem(path, SAVED_MODEL_ENTRIES, inputs, overwrite=True)
            or saved_model_leftovers_problem(path)
            or cli.folder_output_problem(path, SAVED_MODEL_ENTRIES, inputs, overwrite)
        )
    return cli.output_problem(path, inputs, overwrite)


def check_outputs(path, file_format, inputs, overwrite, description):
    """Refuses outputs that may not be written; `description`: the model's description beside the export too."""
    problem = cli.directory_problem(path.parent) or export_problem(path, file_format, inputs, overwrite)
    if problem:
        raise cli.CommandError(f"{path}: {problem}")
    if description:
        json_path = models.description_path(path)
        if os.path.abspath(json_path) == os.path.abspath(path):
            raise cli.CommandError(f"{path}: is where the model's description goes; name the export otherwise")
        problem = cli.output_problem(json_path, inputs, overwrite)
        if problem:
            raise cli.CommandError(f"{json_path} (the model's description, written beside the export): {problem}")


def writes_description(config, path, weights):
    """Whether the export at `path` gets the model's JSON description beside it: a user model's, unless
    the file there is the description the model was read from (beside the weights `weights`)."""
    if config.released:
        return False
    existing = cli.file_identity(models.description_path(path))
    return existing is None or existing != cli.file_identity(models.description_path(weights))


def check_dependencies(file_format):
    """Refuses a format whose Python packages are not installed, naming the pip command that installs them."""
    missing = [module for module in DEPENDENCIES.get(file_format, ()) if importlib.util.find_spec(module) is None]
    if missing:
        raise cli.CommandError(
            f"--format {file_format} needs {', '.join(missing)}, not installed: "
            f"python -m pip install -r {EXPORT_REQUIREMENTS}"
        )


def check_weights(weights):
    """Refuses a -w that is not a readable regular file, before anything opens it or the JSON beside it."""
    if weights == "":
        raise cli.CommandError("-w: the weights path is empty")
    if weights is not None:
        problem = utils.file_problem(weights, what="weights file")
        if problem:
            raise cli.CommandError(f"{weights}: {problem}")


def run(args):
    """Exports the model of the command line; returns the exit code."""
    check_weights(args.weights)
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None
    path = output_path(args, config)
    inputs = command_inputs(args.weights, config)
    with_description = writes_description(config, path, args.weights)
    check_outputs(path, args.format, inputs, args.overwrite, with_description)
    check_dependencies(args.format)
    from pspnet_keras.export import transaction

    network = load_network(config, args.weights, show_progress=not args.quiet).model
    try:
        delta, agreeing = transaction.export(
            network, config, args.format, path, args.opset, with_description,
            before_commit=lambda: check_outputs(path, args.format, inputs, args.overwrite, with_description),
        )
    except ExportError as error:
        raise cli.CommandError(f"{path}: {error}; nothing was written") from None
    except transaction.PreviousKept as error:
        raise cli.CommandError(str(error)) from None
    except utils.OutputError as error:
        raise cli.CommandError(f"{error}; nothing was written") from None
    except OSError as error:
        raise cli.CommandError(f"{path}: cannot write ({error.strerror or error}); nothing was written") from None
    if not args.quiet:
        described = f" and {models.description_path(path)}" if with_description else ""
        opset = f" opset {args.opset}" if args.format == "onnx" else ""
        print_result(
            f"{PROG}: wrote {path}{described} ({args.format}{opset}); opened in {RUNTIME_NAMES[args.format]}, its "
            f"logits on a random crop differ from the Keras network's by at most {delta:.1e} of the logit range, "
            f"argmax agrees on {agreeing:.3%} of the pixels"
        )
    return cli.EXIT_OK


def print_result(line):
    """Prints the result line on stdout; a reader that went away (a closed pipe) leaves the export done."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        cli.stdout_to_devnull()


def argument_parser():
    """The parser of the command line, every option documented."""
    parser = cli.ArgumentParser(
        prog=PROG,
        description=(
            "Export a PSPNet for deployment: a Keras archive, a SavedModel for TF Serving, ONNX, or LiteRT. "
            "Every format maps float32 (N, S, S, 3) crops (BGR, the model's mean subtracted; S the crop "
            "size) to float32 (N, S, S, classes) logits, input 'data', output 'logits'; LiteRT takes one crop "
            "at a time. The SavedModel also has the signature 'segment' (its default): one uint8 (H, W, 3) RGB "
            "image of any size to uint8 class ids and float32 maximum probabilities, (H, W) each, by pspnet.py's "
            "default protocol (one crop, longer side scaled to the crop size, mirrored pass)."
        ),
        epilog=(
            "After writing, the file is opened in its runtime (Keras, TensorFlow, ONNX Runtime, the LiteRT "
            "interpreter) and its logits on a random crop are compared with the Keras network's; a file whose "
            f"largest difference exceeds {MAX_RELATIVE_DELTA:.0e} of the logit range, or whose argmax agrees on "
            f"fewer than {MIN_ARGMAX_AGREEMENT:.1%} of the pixels, is removed. A user model's JSON description is "
            "written beside the export (same stem, .json). An existing export and the description beside it are "
            "replaced only with --overwrite, a folder only when it holds nothing but a SavedModel, and only once "
            "the new export has passed; the files the command reads (-w and the JSON beside it) never are. "
            "onnx and litert need the packages of "
            f"{EXPORT_REQUIREMENTS.name}. Long options are also accepted with '_' for '-'. Exit status: 0 when "
            "the file was written and checked, 1 when it was not (nothing is left behind), 2 for a wrong "
            "command line, 130 when interrupted, 143 when terminated."
        ),
    )
    cli.add_model_arguments(parser)
    parser.add_argument(
        "--format", required=True, choices=FORMATS,
        help="keras: a .keras archive (keras.saving.load_model after 'import layers_builder'); saved_model: "
             "a SavedModel directory for TF Serving; onnx: an ONNX model for ONNX Runtime; litert: a .tflite "
             "model for the LiteRT interpreter, batch of one",
    )
    parser.add_argument(
        "-o", "--output-path", metavar="PATH",
        help="the file (the directory for saved_model) to write; missing directories are created "
             "(default: <model>.keras, <model>_saved_model, <model>.onnx or <model>.tflite in the working "
             "directory)",
    )
    cli.add_overwrite_argument(
        parser, "the export (a file, or a folder holding nothing but a SavedModel) and the model's description "
                "beside it",
    )
    parser.add_argument(
        "--opset", type=int, choices=ONNX_OPSETS,
        help=f"ONNX opset of --format onnx (default: {DEFAULT_OPSET})",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true",
        help="print errors only: no download progress, no result line",
    )
    return parser


def main(argv=None):
    """Runs the command line; returns the exit status."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.opset is not None and args.format != "onnx":
        parser.error(f"--opset applies to --format onnx, not {args.format}")
    args.opset = args.opset or DEFAULT_OPSET
    runtime.configure(verbose=False)
    cli.check_backend(parser, tensorflow_only="SavedModel, tf2onnx and LiteRT convert TensorFlow graphs")
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
