"""Exports a PSPNet for deployment: a Keras archive, a TF Serving SavedModel, ONNX or LiteRT.

    python export.py -m pspnet50_ade20k --format onnx -o exports/pspnet50_ade20k.onnx
    python export.py -w runs/mine/final.h5 --format saved_model -o exports/mine

Every format holds the network pspnet.py runs (layers_builder.build_pspnet with the
model's weights) at the model's crop size S: float32 (N, S, S, 3) crops in BGR order
with the model's mean subtracted in, float32 (N, S, S, classes) logits out; the
LiteRT file takes one crop at a time. The SavedModel adds a `segment` signature that
runs pspnet.py's default protocol (inference.py) on one uint8 RGB image of any size.

After writing, the file is opened in the runtime it is made for (Keras, TensorFlow,
ONNX Runtime, the LiteRT interpreter) and its logits on a random crop are compared
with the Keras network's; a file that disagrees is removed. Files are written beside
their target and renamed into place. A user model's JSON description (models.py) is
written beside its export, same stem, `.json`.

TensorFlow is imported only after the command line and its files are checked.
"""

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from pspnet_keras import cli
from pspnet_keras import models
from pspnet_keras import runtime
import utils

PROG = "export.py"
PROJECT_DIR = Path(__file__).resolve().parent
EXPORT_REQUIREMENTS = PROJECT_DIR / "requirements-export.txt"

FORMATS = ("keras", "saved_model", "onnx", "litert")
# Default output name of each format: <model><suffix> in the working directory.
DEFAULT_SUFFIXES = {"keras": ".keras", "saved_model": "_saved_model", "onnx": ".onnx", "litert": ".tflite"}
# Python modules each format needs beyond requirements.txt (requirements-export.txt pins them).
DEPENDENCIES = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}
# The ONNX opsets offered (tf2onnx 1.17 would pick 15 by itself); ONNX Runtime 1.32 runs both.
ONNX_OPSETS = (17, 18)
DEFAULT_OPSET = 17
# tf2onnx's einsum optimizer tries every ordering of the letters of each Einsum
# (5040 for conv5_4's) to decompose it; ONNX Runtime runs the Einsum itself as fast
# (bench/README.md, "Deploy"), so it is left out of tf2onnx's optimizer list.
ONNX_SKIPPED_OPTIMIZERS = ("einsum_optimizer",)
# tf2onnx/convert.py: with this variable set, tf2onnx's optimizers change the graph in
# place instead of each working on a deep copy of it, weights included.
ONNX_CATCH_ERRORS_VARIABLE = "TF2ONNX_CATCH_ERRORS"

# Names of the exported inputs and outputs. "data" is the input blob of the Caffe deploy nets.
INPUT_NAME = "data"
LOGITS = "logits"
SEGMENT = "segment"
IMAGE_NAME = "image"
CLASS_IDS = "class_ids"
MAX_PROBABILITY = "max_probability"
SAVED_MODEL_FILE = "saved_model.pb"
# The LiteRT interpreter's notice on stderr when it applies its default CPU delegate.
LITERT_NOTICE = re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$")

# An export passes when its logits on a random crop are within MAX_RELATIVE_DELTA of
# the Keras network's logit range (max - min) and their argmax agrees on at least
# MIN_ARGMAX_AGREEMENT of the pixels.
MAX_RELATIVE_DELTA = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
CHECK_SEED = 2017
PIXEL_RANGE = 255.0


class ExportError(ValueError):
    """An export that failed, or whose file does not compute the Keras network's logits; the message says why."""


# ---------------------------------------------------------------------------------------
# The default protocol as a TensorFlow graph (the SavedModel's `segment` signature)


def scaled_size(height, width, long_side):
    """inference.scaled_size on int32 tensors: longer side `long_side`, aspect kept, in float32 like eval_sub.m."""
    tf = runtime.import_tensorflow()
    side = tf.constant(long_side, tf.float32)
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    tall = height > width
    shorter = tf.where(tall, side / height_f * width_f, side / width_f * height_f)
    shorter = tf.maximum(1, tf.cast(tf.floor(shorter + 0.5), tf.int32))
    return tf.where(tall, long_side, shorter), tf.where(tall, shorter, long_side)


def mirrored_indices(length, margin):
    """inference.mirrored_indices on tensors: 0..length-1 with `margin` mirrored indices each side.

    NumPy's symmetric padding repeats the reflection for margins beyond the length,
    which makes the indices periodic with period 2 * length.
    """
    tf = runtime.import_tensorflow()
    folded = tf.math.floormod(tf.range(-margin, length + margin), 2 * length)
    return tf.where(folded < length, folded, 2 * length - 1 - folded)


def resize_margin(in_size, out_size):
    """inference.resize_margin on int32 tensors: ceil(in / out) + 2."""
    return (in_size + out_size - 1) // out_size + 2


def resize_axis(images, axis, out_size, rounded):
    """A batch of one (1, H, W, C) float32 image resized along `axis` (1 rows, 2 columns) to out_size.

    MATLAB's imresize 'bilinear' on a mirrored border (inference.resize_image):
    TensorFlow's ScaleAndTranslate with a triangle kernel widened when shrinking, on
    the image padded with the border it reaches, the other axis at scale 1 (a copy).
    `rounded` rounds to whole grey levels in 0..255, as Pillow's 8-bit passes do.
    """
    tf = runtime.import_tensorflow()
    in_size = tf.shape(images)[axis]
    margin = resize_margin(in_size, out_size)
    padded = tf.gather(images, mirrored_indices(in_size, margin), axis=axis)
    scale = tf.cast(out_size, tf.float32) / tf.cast(in_size, tf.float32)
    translation = -tf.cast(margin, tf.float32) * scale
    if axis == 1:
        size, scales, translations = tf.stack([out_size, tf.shape(images)[2]]), [scale, 1.0], [translation, 0.0]
    else:
        size, scales, translations = tf.stack([tf.shape(images)[1], out_size]), [1.0, scale], [0.0, translation]
    resized = tf.raw_ops.ScaleAndTranslate(
        images=padded, size=size, scale=tf.stack(scales), translation=tf.stack(translations),
        kernel_type="triangle", antialias=True,
    )
    return tf.clip_by_value(tf.floor(resized + 0.5), 0.0, PIXEL_RANGE) if rounded else resized


def resize_image(image, height, width):
    """A uint8 (H, W, 3) image resized as inference.resize_image does, as float32 grey levels.

    Pillow resizes in two passes, each rounded to 8 bits, horizontal then vertical
    (src/libImaging/Resample.c, ImagingResampleInner); so does this. A grey level
    can differ where Pillow's fixed-point weights round the other way, and where
    the Pillow installed takes the vertical pass first, as Pillow 13.0 does for some
    sizes (mostly when the height shrinks more than the width).
    """
    tf = runtime.import_tensorflow()
    images = tf.cast(image, tf.float32)[tf.newaxis]
    images = resize_axis(images, 2, width, rounded=True)
    return resize_axis(images, 1, height, rounded=True)[0]


def resize_probabilities(probabilities, height, width):
    """An (h, w, classes) probability map resized to (height, width) as inference.py resizes it."""
    tf = runtime.import_tensorflow()
    maps = resize_axis(probabilities[tf.newaxis], 1, height, rounded=False)
    return resize_axis(maps, 2, width, rounded=False)[0]


def segment_function(network, mean_rgb):
    """pspnet.py's default protocol for one uint8 (H, W, 3) RGB image, as a function of tensors.

    The image is scaled so that its longer side is the crop size (inference.scaled_size,
    resize_image), its mean-subtracted BGR pixels are padded with zeros (the mean
    colour) at the bottom and right, the crop's logits plus the mirrored logits of
    its mirror are softmaxed, and the probabilities of the image's part of the crop
    are resized back to (H, W). Returns {class_ids: uint8 (H, W), max_probability:
    float32 (H, W)}. As in inference.Predictor, the two passes stop at conv6 and the
    x8 Interp upsamples their sum, only over the image's part of the crop.
    """
    tf = runtime.import_tensorflow()
    from layers_builder import split_upsampling

    logits_network, upsampling = split_upsampling(network)
    crop_size = network.input_shape[1]
    mean_rgb = tf.constant(mean_rgb, tf.float32)

    def segment(image):
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        scaled_height, scaled_width = scaled_size(height, width, crop_size)
        data = (resize_image(image, scaled_height, scaled_width) - mean_rgb)[..., ::-1]
        data = tf.pad(data, [[0, crop_size - scaled_height], [0, crop_size - scaled_width], [0, 0]])
        crop = tf.ensure_shape(data, (crop_size, crop_size, 3))[tf.newaxis]
        logits = tf.cast(logits_network(crop, training=False), tf.float32)
        mirrored = tf.cast(logits_network(crop[:, :, ::-1], training=False), tf.float32)
        logits = upsampling.upsample(logits + mirrored[:, :, ::-1], scaled_height, scaled_width)
        probabilities = resize_probabilities(tf.nn.softmax(logits[0], axis=-1), height, width)
        return {
            CLASS_IDS: tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8),
            MAX_PROBABILITY: tf.reduce_max(probabilities, axis=-1),
        }

    return segment


# ---------------------------------------------------------------------------------------
# Writers: each writes one format of `network` at `path`


def crop_spec(network, batch):
    """The tf.TensorSpec of the network's input: float32 (batch, S, S, 3) named "data"; batch None is any."""
    tf = runtime.import_tensorflow()
    return tf.TensorSpec((batch, *network.input_shape[1:]), tf.float32, name=INPUT_NAME)


def logits_function(network):
    """The network's (N, S, S, 3) -> {"logits": float32 (N, S, S, classes)} function, in inference mode."""
    tf = runtime.import_tensorflow()
    return lambda data: {LOGITS: tf.cast(network(data, training=False), tf.float32)}


def write_keras(network, config, path, opset):
    """A Keras archive (keras.saving.save_model): the network's layers, their configs and weights."""
    network.save(path)


def saved_model_archive(network, config, batch=None, segment=True):
    """A keras.export.ExportArchive of the network with its `logits` (and `segment`) signatures.

    `segment` comes first, so that it is also TF Serving's `serving_default`.
    """
    tf = runtime.import_tensorflow()
    import keras

    archive = keras.export.ExportArchive()
    archive.track(network)
    if segment:
        archive.add_endpoint(
            SEGMENT, segment_function(network, config.mean_rgb),
            input_signature=[tf.TensorSpec((None, None, 3), tf.uint8, name=IMAGE_NAME)],
        )
    archive.add_endpoint(LOGITS, logits_function(network), input_signature=[crop_spec(network, batch)])
    return archive


def write_saved_model(network, config, path, opset):
    """A SavedModel directory for TF Serving with the signatures `segment` (default) and `logits`."""
    saved_model_archive(network, config).write_out(path, verbose=False)


def write_onnx(network, config, path, opset, skipped_optimizers=ONNX_SKIPPED_OPTIMIZERS):
    """An ONNX model of the logits at `opset`, input "data" (any batch), output "logits" (tf2onnx).

    tf2onnx's graph optimizers run but for `skipped_optimizers`.
    """
    os.environ.setdefault(ONNX_CATCH_ERRORS_VARIABLE, "FALSE")
    import onnx
    import tf2onnx
    from tf2onnx import optimizer

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    # tf2onnx's default list of optimizers, in its order (tf2onnx/optimizer/__init__.py).
    optimizers = {
        name: factory for name, factory in optimizer._get_optimizers().items() if name not in skipped_optimizers
    }
    model_proto, _ = tf2onnx.convert.from_keras(
        network, input_signature=[crop_spec(network, None)], opset=opset, optimizers=optimizers
    )
    rename_output(model_proto.graph, LOGITS)
    onnx.save(model_proto, path)


def rename_output(graph, name):
    """Gives the one output of an ONNX graph the name `name`, where it is made and where it is read."""
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [name if output == old else output for output in node.output]
        node.input[:] = [name if value == old else value for value in node.input]
    graph.output[0].name = name


def write_litert(network, config, path, opset):
    """A LiteRT (.tflite) model of the logits for one crop, signature "logits", TFLite built-in ops only.

    Converted from a SavedModel of the `logits` signature with a batch of one, the
    path Keras' own LiteRT export takes; the batch is static because LiteRT
    cannot size the einsums of conv5_4 for a dynamic one.
    """
    tf = runtime.import_tensorflow()
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as directory:
        saved_model_archive(network, config, batch=1, segment=False).write_out(directory, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=[LOGITS])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        content = converter.convert()
    Path(path).write_bytes(content)


WRITERS = {"keras": write_keras, "saved_model": write_saved_model, "onnx": write_onnx, "litert": write_litert}


# ---------------------------------------------------------------------------------------
# Runtimes: each opens one format and returns its logits for a batch of crops


def keras_logits(path, crops, config):
    """Logits of a Keras archive opened as pspnet.py opens one (layers_builder.load_keras_archive).

    The archive must hold a network of the crops' side and the model's classes.
    """
    from layers_builder import load_keras_archive

    network = load_keras_archive(path, dataclasses.replace(config, crop_size=crops.shape[1]))
    return np.asarray(network(crops, training=False))


def saved_model_logits(path, crops, config):
    """Logits of the `logits` signature of a SavedModel loaded by TensorFlow."""
    tf = runtime.import_tensorflow()
    signature = tf.saved_model.load(os.fspath(path)).signatures[LOGITS]
    return signature(**{INPUT_NAME: tf.constant(crops)})[LOGITS].numpy()


def onnx_logits(path, crops, config):
    """Logits of an ONNX model run by ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run([LOGITS], {INPUT_NAME: crops})[0]


def litert_logits(path, crops, config):
    """Logits of a LiteRT model run by the LiteRT interpreter (ai-edge-litert), one crop at a time."""
    from ai_edge_litert.interpreter import Interpreter

    with native_stderr_without(LITERT_NOTICE):
        runner = Interpreter(model_path=os.fspath(path)).get_signature_runner(LOGITS)
        return np.concatenate([runner(**{INPUT_NAME: crop[np.newaxis]})[LOGITS] for crop in crops])


@contextlib.contextmanager
def native_stderr_without(pattern):
    """Runs the block with file descriptor 2 caught; then passes on every caught line but those matching `pattern`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not pattern.match(line)))
            sys.stderr.flush()


RUNTIMES = {"keras": keras_logits, "saved_model": saved_model_logits, "onnx": onnx_logits, "litert": litert_logits}
RUNTIME_NAMES = {"keras": "Keras", "saved_model": "TensorFlow", "onnx": "ONNX Runtime", "litert": "LiteRT"}


# ---------------------------------------------------------------------------------------
# Export and check


def check_crops(network, config, count=1):
    """`count` random crops as the network takes them: uniform RGB noise, mean subtracted, BGR (seeded)."""
    side = network.input_shape[1]
    rng = np.random.default_rng(CHECK_SEED)
    pixels = rng.uniform(0, PIXEL_RANGE, (count, side, side, 3)).astype(np.float32)
    return (pixels - np.asarray(config.mean_rgb, dtype=np.float32))[..., ::-1].copy()


def agreement(reference, logits):
    """(largest |logits - reference| / the reference's logit range, share of pixels whose argmax agrees)."""
    reference = np.asarray(reference, dtype=np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape != reference.shape:
        raise ExportError(f"gives logits of shape {logits.shape}, the Keras network {reference.shape}")
    delta = np.max(np.abs(logits - reference)) / (np.ptp(reference) or 1.0)
    agreeing = np.mean(logits.argmax(axis=-1) == reference.argmax(axis=-1))
    return float(delta), float(agreeing)


def check_export(network, config, file_format, path):
    """(delta, argmax agreement) of the file at `path` against `network` on a random crop.

    Raises ExportError when the runtime cannot run the file, when the file's logits
    are further than MAX_RELATIVE_DELTA of the logit range from the network's, or
    when their argmax agrees on fewer than MIN_ARGMAX_AGREEMENT of the pixels.
    """
    from layers_builder import first_line

    crops = check_crops(network, config)
    reference = np.asarray(network(crops, training=False))
    try:
        logits = RUNTIMES[file_format](path, crops, config)
    except Exception as error:  # each runtime raises its own types (ONNX Runtime's come from its C++ bindings)
        raise ExportError(f"{RUNTIME_NAMES[file_format]} cannot run the file ({first_line(error)})") from None
    delta, agreeing = agreement(reference, logits)
    if not (delta <= MAX_RELATIVE_DELTA and agreeing >= MIN_ARGMAX_AGREEMENT):
        raise ExportError(
            f"opened in {RUNTIME_NAMES[file_format]}, its logits on a random crop differ from the Keras network's "
            f"by {delta:.1e} of the logit range (at most {MAX_RELATIVE_DELTA:.0e}) and their argmax agrees on "
            f"{agreeing:.3%} of the pixels (at least {MIN_ARGMAX_AGREEMENT:.1%})"
        )
    return delta, agreeing


def replace(source, target):
    """Renames `source` onto `target`; a SavedModel directory at `target` is swapped out and removed."""
    target = Path(target)
    if target.is_dir():
        old = Path(source).parent / f"{target.name}.old"
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)


def export(network, config, file_format, path, opset=DEFAULT_OPSET, description=False):
    """Writes `network` in `file_format` at `path`, checked; returns (delta, argmax agreement).

    The file is written and checked (check_export) in a temporary directory beside
    `path` and renamed into place only when it passes; otherwise nothing is left
    and ExportError says why (OSError when the disk refuses). With `description`, the model's JSON description
    is written beside it (description_target), in the same all-or-nothing way.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        staged = staging / target.name
        write(network, config, file_format, staged, opset)
        result = check_export(network, config, file_format, staged)
        with utils.AtomicFiles() as files:
            if description:
                files.write(description_target(target), utils.json_writer(config.description()))
            replace(staged, target)
            files.commit()
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write(network, config, file_format, path, opset):
    """Writes the file of `file_format` at `path`; a converter's failure becomes ExportError."""
    from layers_builder import first_line

    try:
        WRITERS[file_format](network, config, os.fspath(path), opset)
    except OSError:
        raise
    except Exception as error:  # TensorFlow's, tf2onnx's and the LiteRT converter's errors have no common type
        raise ExportError(f"cannot write it as {file_format} ({first_line(error)})") from None


def description_target(path):
    """Where the JSON description of a user model goes beside its export: same stem, `.json`."""
    return models.description_path(path)


# ---------------------------------------------------------------------------------------
# Command line


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


def directory_problem(directory):
    """Why files cannot be created in `directory` (made if missing), or None."""
    existing = Path(directory)
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create the output directory ({existing} is not a directory)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing} (permission denied)"
    return None


def check_outputs(path, file_format, description):
    """Refuses outputs that cannot be written, before any work; `description`: the JSON beside it too."""
    problem = directory_problem(path.parent) or output_problem(path, file_format)
    if problem:
        raise cli.CommandError(f"{path}: {problem}")
    if description:
        json_path = description_target(path)
        if os.path.abspath(json_path) == os.path.abspath(path):
            raise cli.CommandError(f"{path}: is where the model's description goes; name the export otherwise")
        problem = utils.file_problem(json_path, replace=True)
        if problem:
            raise cli.CommandError(f"{json_path}: {problem}")


def same_file(json_path, weights):
    """Whether `json_path` is the description the model was read from (beside the weights `weights`)."""
    source = models.description_path(weights)
    return os.path.exists(json_path) and os.path.exists(source) and os.path.samefile(json_path, source)


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
        problem = utils.file_problem(weights)
        if problem == "no such file":
            problem = "no such weights file"
        if problem:
            raise cli.CommandError(f"{weights}: {problem}")


def load_network(config, weights, quiet):
    """The Keras network of the model with its weights, as pspnet.PSPNet loads it."""
    from layers_builder import WeightsError
    from pspnet import PSPNet, WeightsNotFound

    try:
        return PSPNet(config, weights=weights, show_progress=not quiet).model
    except (WeightsError, WeightsNotFound, ValueError) as error:
        raise cli.CommandError(str(error)) from None


def run(args):
    """Exports the model of the command line; returns the exit code."""
    try:
        config = models.resolve_model(args.model, args.weights)
    except models.ModelDescriptionError as error:
        raise cli.CommandError(str(error)) from None
    check_weights(args.weights)
    path = output_path(args, config)
    with_description = not config.released and not same_file(description_target(path), args.weights)
    check_outputs(path, args.format, with_description)
    check_dependencies(args.format)
    runtime.import_tensorflow()
    network = load_network(config, args.weights, args.quiet)
    try:
        delta, agreeing = export(network, config, args.format, path, args.opset, with_description)
    except ExportError as error:
        raise cli.CommandError(f"{path}: {error}; nothing was written") from None
    except utils.OutputError as error:
        raise cli.CommandError(str(error)) from None
    except OSError as error:
        raise cli.CommandError(f"{path}: cannot write ({error.strerror or error})") from None
    if not args.quiet:
        described = f" and {description_target(path)}" if with_description else ""
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
    parser.add_argument(
        "-m", "--model", metavar="MODEL",
        help=f"a released model: {', '.join(models.RELEASED_MODEL_NAMES)} (default: {models.DEFAULT_MODEL}, "
             "or the model described beside the -w file)",
    )
    parser.add_argument(
        "-w", "--weights", metavar="H5",
        help="Keras-2 HDF5 weights file (default: weights/keras/<model>.h5 next to pspnet.py, downloaded "
             "when missing); with <stem>.json beside it, that user model",
    )
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
    return cli.run_command(PROG, run, args)


if __name__ == "__main__":
    sys.exit(main())
