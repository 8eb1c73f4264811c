"""Each exported file opened in the runtime it is made for, and its logits checked against the Keras network's.

A runtime is called as runtime(path, crops, config) and returns the file's float32
logits for the (N, S, S, 3) `crops`. check_export runs the file's runtime on a
random crop and refuses a file that cannot run or whose logits differ. This module
imports TensorFlow and the runtimes only when a file is opened.
"""

import dataclasses
import os
import re

import numpy as np

from pspnet_keras import runtime
from pspnet_keras.export.formats import INPUT_NAME
from pspnet_keras.export.formats import LOGITS
from pspnet_keras.export.formats import PIXEL_RANGE
from pspnet_keras.export.formats import ExportError

# The LiteRT interpreter's notice on stderr when it applies its default CPU delegate.
LITERT_NOTICE = re.compile(r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$")

# An export passes when its logits on a random crop are within MAX_RELATIVE_DELTA of
# the Keras network's logit range (max - min) and their argmax agrees on at least
# MIN_ARGMAX_AGREEMENT of the pixels.
MAX_RELATIVE_DELTA = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
CHECK_SEED = 2017


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
    """Logits of a LiteRT model run by the LiteRT interpreter (ai-edge-litert), one crop at a time.

    The interpreter's notice that it applies its default CPU delegate (XNNPACK), written
    by its C++ code, is taken out of stderr; anything else it writes is passed on.
    """
    from ai_edge_litert.interpreter import Interpreter

    with runtime.native_stderr(keep=lambda line: not LITERT_NOTICE.match(line)):
        runner = Interpreter(model_path=os.fspath(path)).get_signature_runner(LOGITS)
        return np.concatenate([runner(**{INPUT_NAME: crop[np.newaxis]})[LOGITS] for crop in crops])


RUNTIMES = {"keras": keras_logits, "saved_model": saved_model_logits, "onnx": onnx_logits, "litert": litert_logits}
RUNTIME_NAMES = {"keras": "Keras", "saved_model": "TensorFlow", "onnx": "ONNX Runtime", "litert": "LiteRT"}


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
