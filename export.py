"""Exports a PSPNet for deployment: a Keras archive, a TF Serving SavedModel, ONNX or LiteRT.

    python export.py -m pspnet50_ade20k --format onnx -o exports/pspnet50_ade20k.onnx
    python export.py -w runs/mine/final.h5 --format saved_model -o exports/mine

The command line of pspnet_keras/export/, whose docstring says what each format holds:
the options, the checks of the output path, the weights and the packages the format
needs, then pspnet_keras.export.transaction.export. After writing, the file is opened
in the runtime it is made for (Keras, TensorFlow, ONNX Runtime, the LiteRT
interpreter) and its logits on a random crop are compared with the Keras network's;
a file that disagrees is removed. A user model's JSON description (models.py) is
written beside its export, same stem, `.json`.

TensorFlow is imported only after the command line and its files are checked.
"""

import importlib.util
import os
import sys
from pathlib import Path

import utils
from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.export.formats import DEFAULT_OPSET
from pspnet_keras.export.formats import DEPENDENCIES
from pspnet_keras.export.formats import FORMATS
from pspnet_keras.export.formats import ONNX_OPSETS
from pspnet_keras.export.formats import SAVED_MODEL_FILE
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
    return Path(args.output_path or f"{config.name}{DEFAULT_SUFFIXES[args.format]}")


def output_problem(path, file_format):
    """Why the export cannot be written at `path`, or None; nothing is replaced but a file or a SavedModel."""
    if file_format == "keras" and path.suffix != models.KERAS_ARCHIVE_SUFFIX:
        return f"a Keras archive's name must end in {models.KERAS_ARCHIVE_SUFFIX} (keras.saving.load_model goes by it)"
    if file_format == "saved_model" and path.is_dir():
        if not (path / SAVED_MODEL_FILE).is_file():
            return "is a directory that is not a SavedModel; refusing to replace it"
        return None
    if file_format == "saved_model" and os.path.lexists(path):
        return "exists and is not a SavedModel directory; refusing to replace it"
    return utils.file_problem(path, replace=True)


def check_outputs(path, file_format, description):
    """Refuses outputs that cannot be written, before any work; `description`: the JSON beside it too."""
    problem = cli.directory_problem(path.parent) or output_problem(path, file_format)
    if problem:
        raise cli.CommandError(f"{path}: {problem}")
    if description:
        json_path = models.description_path(path)
        if os.path.abspath(json_path) == os.path.abspath(path):
            raise cli.CommandError(f"{path}: is where the model's description goes; name the export otherwise")
        problem = utils.file_problem(json_path, replace=True)
        if problem:
            raise cli.CommandError(f"{json_path}: {problem}")


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
    """Refuses a -w file that cannot be read, before TensorFlow starts."""
    if weights is not None:
        problem = utils.file_problem(weights, what="weights file")
        if problem:
            raise cli.CommandError(f"{weights}: {problem}")


def run(args):
    """Exports the model of the command line; returns the exit code."""
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None
    check_weights(args.weights)
    path = output_path(args, config)
    with_description = writes_description(config, path, args.weights)
    check_outputs(path, args.format, with_description)
    check_dependencies(args.format)
    from pspnet_keras.export import transaction

    network = load_network(config, args.weights, show_progress=not args.quiet).model
    try:
        delta, agreeing = transaction.export(network, config, args.format, path, args.opset, with_description)
    except ExportError as error:
        raise cli.CommandError(f"{path}: {error}; nothing was written") from None
    except utils.OutputError as error:
        raise cli.CommandError(str(error)) from None
    except OSError as error:
        raise cli.CommandError(f"{path}: cannot write ({error.strerror or error})") from None
    if not args.quiet:
        described = f" and {models.description_path(path)}" if with_description else ""
        opset = f" opset {args.opset}" if args.format == "onnx" else ""
        print(
            f"{PROG}: wrote {path}{described} ({args.format}{opset}); opened in {RUNTIME_NAMES[args.format]}, its "
            f"logits on a random crop differ from the Keras network's by at most {delta:.1e} of the logit range, "
            f"argmax agrees on {agreeing:.3%} of the pixels"
        )
    return cli.EXIT_OK


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
            "written beside the export (same stem, .json). onnx and litert need the packages of "
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
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
